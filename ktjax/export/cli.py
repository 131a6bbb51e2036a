"""The command line of export and warm starts: `ktjax export`, and the --artifacts /
--precompile options every command that loads a model takes (through `warm_options`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from ktjax.export.kinds import DEFAULT_KINDS, SAMPLER_KINDS

if TYPE_CHECKING:  # program_set imports jax: only where a command runs
    from ktjax.export.program_set import ProgramSpec


def add_warm_args(ap: argparse.ArgumentParser, precompile_default: bool) -> None:
    """--artifacts DIR, --fallback-compile, --precompile / --no-precompile."""
    g = ap.add_argument_group("start-up")
    g.add_argument("--artifacts", metavar="DIR", default=None,
                   help="load packed weights and compiled programs from a folder `ktjax "
                        "export` wrote (its engine settings become the defaults)")
    g.add_argument("--fallback-compile", action="store_true",
                   help="artifacts made for another model, rules, settings or machine: warn "
                        "and compile instead of stopping with an error")
    g.add_argument("--precompile", action=argparse.BooleanOptionalAction,
                   default=precompile_default,
                   help="compile every program this command can reach before it starts, so "
                        f"none compiles mid-stream (default: {'on' if precompile_default else 'off'})")


def warm_options(a: argparse.Namespace) -> dict:
    """LLM keyword arguments of the start-up options."""
    return {"artifacts": a.artifacts, "fallback": "compile" if a.fallback_compile else "error"}


def _engine_config(a: argparse.Namespace):
    from ktjax.engine.config import EngineConfig
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    kw = {"max_model_len": a.max_model_len, "rules": a.rules}
    if getattr(a, "kv_cache_dtype", None) is not None:
        kw["kv_cache_dtype"] = a.kv_cache_dtype
    return EngineConfig(**{k: v for k, v in kw.items() if k in fields})


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SAMPLER_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"program kinds are some of {','.join(SAMPLER_KINDS)}")
    return kinds


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_export_parser(sub) -> None:
    from ktjax.engine.config import EngineConfig
    e = sub.add_parser("export", help="compile a configuration's programs and write them with "
                                      "the packed weights, for fast starts (--artifacts)")
    e.add_argument("model", metavar="MODEL", help="GGUF path or catalog name")
    e.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact folder")
    e.add_argument("--rules", default=None, help="placement rules file or profile")
    e.add_argument("--max-model-len", type=_positive, default=None,
                   help="context per sequence (default: the model's, at most 4096)")
    e.add_argument("--batch", type=_positive, default=1,
                   help="most sequences running together (default: 1)")
    e.add_argument("--kinds", type=_kinds, default=DEFAULT_KINDS,
                   help=f"programs to build, some of {','.join(SAMPLER_KINDS)} "
                        f"(default: {','.join(DEFAULT_KINDS)})")
    if "kv_cache_dtype" in {f.name for f in dataclasses.fields(EngineConfig)}:
        e.add_argument("--kv-cache-dtype", default=None, help="KV cache element type")
    e.set_defaults(fn=cmd_export)


def cmd_export(a: argparse.Namespace) -> None:
    from ktjax.export.artifacts import export

    def progress(i: int, n: int, name: str) -> None:
        sys.stderr.write(f"\r\x1b[Kcompiling {i + 1}/{n} {name}")
        sys.stderr.flush()

    from ktjax.export.program_set import ProgramSpec
    m = export(a.model, a.output, _engine_config(a), ProgramSpec(batch=a.batch, kinds=a.kinds),
               on_program=progress)
    seconds = sum(p["compile_seconds"] for p in m["programs"].values())
    sys.stderr.write(f"\r\x1b[K{len(m['programs'])} programs ({seconds:.0f} s of compiling) "
                     f"and {m['weights']['size'] / 2**20:.1f} MiB of weights in {a.output}\n")


def generate_spec(llm, prompt_ids: list[int], params) -> ProgramSpec:
    """The programs one `ktjax generate` run reaches: its prompt's prefill and the decode
    steps up to prompt + max_tokens, with its sampler."""
    from ktjax.export.program_set import ProgramSpec
    greedy = params.temperature == 0 and params.repetition_penalty == 1 and \
        params.presence_penalty == 0 and params.frequency_penalty == 0
    return ProgramSpec(batch=1, kinds=("greedy",) if greedy else ("sample",),
                       prompt_tokens=len(prompt_ids),
                       max_tokens=len(prompt_ids) + params.max_tokens)


def precompile_generate(llm, prompt_ids: list[int], params) -> None:
    from ktjax.export.warm import compile_all
    compile_all(llm.engine.programs, llm.engine_config, generate_spec(llm, prompt_ids, params))


def precompile_chat(llm, params) -> None:
    """Every program of one conversation with `params`' sampler, any prompt length."""
    from ktjax.export.program_set import ProgramSpec
    from ktjax.export.warm import compile_all
    kinds = generate_spec(llm, [0], params).kinds
    compile_all(llm.engine.programs, llm.engine_config, ProgramSpec(batch=1, kinds=kinds))
