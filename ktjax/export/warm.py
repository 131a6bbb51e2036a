"""How LLM starts from artifacts or precompiles: the few calls api.py makes."""
from __future__ import annotations

import dataclasses
import os
import warnings

import jax.numpy as jnp

from ktjax.engine.config import EngineConfig
from ktjax.engine.programs import ProgramCache
from ktjax.errors import ArtifactError
from ktjax.export.artifacts import Artifacts
from ktjax.export.packed_weights import HandleTaken
from ktjax.export.program_set import ProgramSpec, reachable
from ktjax.gguf.tokenizer import Tokenizer
from ktjax.models import loader

FALLBACKS = ("error", "compile")


def open_artifacts(folder: str | os.PathLike | None, fallback: str) -> Artifacts | None:
    if fallback not in FALLBACKS:
        raise ArtifactError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if folder is None:
        return None
    try:
        return Artifacts(folder)
    except ArtifactError as e:  # no manifest, or an unreadable one
        _fall_back(e, fallback)
        return None


def tokenizer(artifacts: Artifacts | None, fallback: str, gguf_file) -> Tokenizer:
    """The model's tokenizer, its `tokenizers` model read from the artifacts when they hold
    this model's (building Gemma's vocabulary takes seconds)."""
    hf_json = None
    if artifacts is not None:
        try:
            hf_json = artifacts.tokenizer_json(gguf_file)
        except ArtifactError as e:
            _fall_back(e, fallback)
    return Tokenizer.from_gguf_metadata(gguf_file.metadata, hf_json)


def engine_config(artifacts: Artifacts | None, config: EngineConfig | None,
                  options: dict) -> EngineConfig:
    """The unresolved config: the artifacts' settings as defaults when there are any."""
    if artifacts is not None:
        return artifacts.engine_config(config, options)
    return dataclasses.replace(config or EngineConfig(), **options)


def _fall_back(problem: Exception, fallback: str) -> None:
    if fallback != "compile":
        raise problem
    warnings.warn(f"{problem} -- loading the model and compiling instead", stacklevel=4)


def load_params(artifacts: Artifacts | None, fallback: str, gguf_file, spec, placement,
                rules_file, ec: EngineConfig) -> tuple[dict, Artifacts | None]:
    """(params, the artifacts whose programs to use or None): from the artifacts when they
    fit this load; otherwise an ArtifactError, or with fallback="compile" a warning and the
    GGUF file (the packed weights still, if only their handle numbers are taken)."""
    if artifacts is not None:
        try:
            artifacts.check(gguf_file, rules_file, placement, ec)
            return artifacts.load_params(ec.device), artifacts
        except HandleTaken as e:
            _fall_back(ArtifactError(f"{e}: its programs cannot be used in this process"),
                       fallback)
            return artifacts.load_params(ec.device, handles="fresh"), None
        except ArtifactError as e:
            _fall_back(e, fallback)
    return loader.load_params(gguf_file, spec, placement, jnp.dtype(ec.dtype), ec.device), None


def attach(programs: ProgramCache, artifacts: Artifacts | None, ec: EngineConfig,
           precompile: bool | ProgramSpec) -> None:
    """Programs from the artifacts first; with `precompile`, every program of the spec (True:
    ProgramSpec()) loaded or compiled now, so none compiles mid-stream."""
    if artifacts is not None:
        programs.source = artifacts.source(programs, ec.device)
    if precompile:
        compile_all(programs, ec, precompile if isinstance(precompile, ProgramSpec)
                    else ProgramSpec())


def compile_all(programs: ProgramCache, ec: EngineConfig, spec: ProgramSpec) -> None:
    """Load or compile every program `spec` reaches under `ec`, under one progress bar."""
    keys = reachable(spec, ec.max_model_len, ec.page_size, ec.max_step_tokens)
    programs.compile([k[1:] for k in keys if k[0] == "step"])
    for k in keys:
        if k[0] == "score":
            programs.scorer(k[1])
