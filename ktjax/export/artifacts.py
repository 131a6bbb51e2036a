"""Artifact folders: `export` compiles a configuration's programs and writes them with the
model's packed weights and a manifest; `Artifacts` opens one for a later process (LLM's
`artifacts=`), checks it against that load, and hands out weights and executables.

Executables are jax.experimental.serialize_executable's: deserializing one is loading
machine code (it runs no compiler). A serialized executable is code, so an artifact folder
must be trusted like a package; the checks here (sizes, digests, identity) catch corrupt,
truncated, stale and foreign artifacts, not a malicious one (docs/kernel-notes.md, "Export and
warm reload")."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import re
import time
from typing import Callable

import jax
from jax.experimental import serialize_executable

from ktjax.engine.config import EngineConfig
from ktjax.engine.programs import ProgramCache, ProgramSource
from ktjax.errors import ArtifactError, KernelError
from ktjax.export import identity, manifest, packed_weights
from ktjax.export.program_set import Key, ProgramSpec, key_name, reachable
from ktjax.gguf.reader import GGUFFile
from ktjax.host import moe_async

log = logging.getLogger("ktjax.export")

WEIGHTS_FILE = "weights.ktw"
TOKENIZER_FILE = "tokenizer.json"
PROGRAMS_DIR = "programs"
ENGINE_FIELDS = ("max_model_len", "kv_cache_tokens", "page_size", "dtype", "attention",
                 "kv_cache_dtype")
MAX_PROGRAM_BYTES = 1 << 30
_FFI_TARGET = re.compile(r'custom_call_target\s*=\s*"([^"]+)"|stablehlo\.custom_call\s+@(\w+)')


def engine_settings(ec: EngineConfig) -> dict:
    """The resolved settings that shape the programs (fields an EngineConfig has)."""
    return {f: str(getattr(ec, f)) if f == "dtype" else getattr(ec, f)
            for f in ENGINE_FIELDS if hasattr(ec, f)}


def current_identity(f: GGUFFile, rules_file: os.PathLike, placement, ec: EngineConfig) -> dict:
    return {"model": identity.model_identity(f),
            "placement": identity.placement_identity(rules_file, placement),
            "engine": engine_settings(ec), "software": identity.software_identity(),
            "machine": identity.machine_identity(ec.device)}


def _trees(programs: ProgramCache, key: Key):
    """(in_tree, out_tree) of a program, rebuilt from the engine's own specs: pytree
    definitions are not serializable, and never unpickled from a file."""
    out = (0, programs._kv_spec) if key[0] == "score" or key[2] is None else \
        (0, 0, programs._kv_spec)
    return jax.tree.structure((programs.lower_args(key), {})), jax.tree.structure(out)


@contextlib.contextmanager
def _cache_off():
    """The persistent cache off (JAX decides once per process whether to use it; resetting
    its state makes it decide again)."""
    try:
        from jax._src.compilation_cache import reset_cache
    except ImportError:  # a JAX without it: the flag alone, read at each compile
        def reset_cache() -> None:
            pass
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        reset_cache()


def _check_arguments(compiled: jax.stages.Compiled, programs: ProgramCache, key: Key,
                     folder: str, name: str) -> None:
    """The executable takes the shapes and dtypes this engine passes (a manifest edited to
    other engine settings must not reach a step)."""
    want = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(programs.lower_args(key))]
    got = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(compiled.args_info)]
    if got != want:
        diff = next(((g, w) for g, w in zip(got, want) if g != w), (len(got), len(want)))
        raise ArtifactError(f"{folder}: program {name} was compiled for other argument "
                            f"shapes than this engine's (e.g. {diff[0]} for {diff[1]})")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def handle_base(f: GGUFFile) -> int:
    """First store handle of `f`'s weights in an export: a range of 2^36 handles picked by
    the model's header digest, so a process that loads other models (from their GGUF files,
    whose handles count from 1, or from their own artifacts) finds these numbers free."""
    return (int(identity.model_identity(f)["header_sha256"][:5], 16) + 1) << 36


def export(model: str | os.PathLike | None, out_dir: str | os.PathLike,
           config: EngineConfig | None = None, spec: ProgramSpec = ProgramSpec(),
           on_program: Callable[[int, int, str], None] | None = None) -> dict:
    """Load `model` under `config`, then write its packed weights, the programs `spec`
    reaches under its engine settings, and the manifest to `out_dir`; returns the manifest.
    on_program(i, n, name) is called before each program compiles (progress)."""
    from ktjax import _native
    from ktjax.api import LLM
    from ktjax.models.catalog import resolve_model
    base = handle_base(GGUFFile(resolve_model(model)))
    _native.store_advance(base)
    _native.moe_site_advance(base)   # host MoE call sites, which the programs name, likewise
    llm = LLM(model, config)
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, PROGRAMS_DIR), exist_ok=True)
    ec, programs = llm.engine_config, llm.engine.programs
    weights = packed_weights.write(os.path.join(out_dir, WEIGHTS_FILE), llm.engine.params)
    tokenizer = llm.tokenizer.hf_json().encode()
    with open(os.path.join(out_dir, TOKENIZER_FILE), "wb") as fh:
        fh.write(tokenizer)
    keys = reachable(spec, ec.max_model_len, ec.page_size, ec.max_step_tokens)
    entries, targets = {}, set()
    for i, key in enumerate(keys):
        name = key_name(key)
        if on_program:
            on_program(i, len(keys), name)
        t0 = time.perf_counter()
        lowered = programs.lower(key)
        targets.update(a or b for a, b in _FFI_TARGET.findall(lowered.as_text()))
        # Compiled afresh: an XLA CPU executable read from the persistent cache serializes
        # without its kernels' code ("Function wrapped_iota not found" at load).
        with _cache_off():
            compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        data, in_tree, out_tree = serialize_executable.serialize(compiled)
        if (in_tree, out_tree) != _trees(programs, key):
            raise ArtifactError(f"program {name}: its argument or result structure is not the "
                                "one ktjax.export rebuilds at load (update export._trees)")
        rel = f"{PROGRAMS_DIR}/{name}.xla"
        with open(os.path.join(out_dir, rel), "wb") as fh:
            fh.write(data)
        entries[name] = {"file": rel, "size": len(data), "sha256": _sha256(data),
                         "compile_seconds": round(seconds, 3)}
    m = {"format": manifest.FORMAT,
         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         **current_identity(GGUFFile(llm.model_path), llm.rules_file, llm.placement, ec),
         "ffi_targets": sorted(targets), "program_spec": dataclasses.asdict(spec),
         "moe_sites": [[site, *spec[:3], list(spec[3])]
                       for site, spec in sorted(moe_async.SITES.items()) if site >= base],
         "weights": {"file": WEIGHTS_FILE, **weights},
         "tokenizer": {"file": TOKENIZER_FILE, "size": len(tokenizer),
                       "sha256": _sha256(tokenizer)},
         "programs": entries}
    manifest.write(out_dir, m)
    return m


class Artifacts:
    """An opened artifact folder (manifest read; files read on use)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.manifest = manifest.read(self.folder)
        self.loaded: list[str] = []     # program names deserialized
        self.compiled: list[str] = []   # program names missing here, compiled on demand

    def engine_config(self, base: EngineConfig | None, options: dict) -> EngineConfig:
        """The engine settings the artifacts were made with, under `base` and `options`
        (a config passed in full is used as it is: a different setting is a mismatch)."""
        if base is not None:
            return dataclasses.replace(base, **options)
        recorded = {k: v for k, v in self.manifest["engine"].items()
                    if k in {f.name for f in dataclasses.fields(EngineConfig)}}
        bad = {k: v for k, v in recorded.items()
               if not (v is None or isinstance(v, (str, int)) and not isinstance(v, bool))}
        if bad:
            raise ArtifactError(f"{self.folder}: malformed engine settings {bad}")
        return EngineConfig(**{**recorded, **options})

    def check(self, f: GGUFFile, rules_file, placement, ec: EngineConfig) -> None:
        """ArtifactMismatchError naming every identity field that differs from this load,
        or an FFI target the programs call that this build lacks."""
        manifest.check(self.manifest, current_identity(f, rules_file, placement, ec),
                       self.folder)
        from ktjax import _native
        known = set(_native.ffi_targets()) | set(_native.cuda_ffi_targets())
        missing = [t for t in self.manifest["ffi_targets"]
                   if isinstance(t, str) and t.startswith("ktjax_") and t not in known]
        if missing:
            raise ArtifactError(f"{self.folder}: the programs call FFI targets this build "
                                f"lacks: {', '.join(missing)}")

    def tokenizer_json(self, f: GGUFFile) -> str | None:
        """The exported `tokenizers` model when the artifacts are of this model file and the
        file is intact; None otherwise (the tokenizer is then built from the metadata, and a
        foreign model is refused by `check`)."""
        entry = self.manifest.get("tokenizer")
        if not isinstance(entry, dict) or \
                self.manifest["model"] != identity.model_identity(f):
            return None
        path = os.path.join(self.folder, TOKENIZER_FILE)
        if not os.path.isfile(path) or os.path.getsize(path) != entry.get("size"):
            raise ArtifactError(f"{path}: missing, or not the {entry.get('size')} bytes the "
                                "manifest records")
        with open(path, "rb") as fh:
            data = fh.read()
        if _sha256(data) != entry.get("sha256"):
            raise ArtifactError(f"{path}: its SHA-256 does not match the manifest (corrupt)")
        return data.decode()

    def load_params(self, device: jax.Device, handles: str = "recorded") -> dict:
        w = self.manifest["weights"]
        path = os.path.join(self.folder, WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise ArtifactError(f"{path}: missing")
        if os.path.getsize(path) != w.get("size"):
            raise ArtifactError(f"{path}: {os.path.getsize(path)} bytes, the manifest "
                                f"records {w.get('size')} (truncated or replaced)")
        if handles == "recorded":
            self._reserve_moe_sites()
        return packed_weights.read(path, device, handles)

    def _reserve_moe_sites(self) -> None:
        """The host MoE call sites the programs name, under their recorded ids (HandleTaken
        when this process holds one: the caller then loads under fresh numbers and compiles)."""
        for site, tokens, hidden, top_k, handles in self.manifest["moe_sites"]:
            try:
                moe_async.reserve_site(tokens, hidden, top_k, tuple(handles), at=site)
            except KernelError as e:
                if "is taken" in str(e):
                    raise packed_weights.HandleTaken(
                        f"{self.folder}: host MoE site {site} is in use in this process "
                        "(another model is loaded)") from None
                raise ArtifactError(f"{self.folder}: {e}") from None

    def source(self, programs: ProgramCache, device: jax.Device) -> ProgramSource:
        """ProgramCache.source: a program from the folder, or None (logged) when the folder
        lacks it, so the cache compiles it."""
        from ktjax.host.ffi import register_targets
        register_targets()  # the executables call them; XLA resolves them as it loads one
        return _Source(self, programs, device)

    def _program_bytes(self, name: str, entry) -> bytes:
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise ArtifactError(f"{self.folder}: the manifest entry of program {name} is "
                                "malformed")
        path = os.path.join(self.folder, PROGRAMS_DIR, f"{name}.xla")  # never a path from the file
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != entry["size"] or size > MAX_PROGRAM_BYTES:
            raise ArtifactError(f"{path}: {size if size >= 0 else 'no'} bytes, the manifest "
                                f"records {entry['size']} (truncated or missing)")
        with open(path, "rb") as fh:
            data = fh.read()
        if _sha256(data) != entry["sha256"]:
            raise ArtifactError(f"{path}: its SHA-256 does not match the manifest (corrupt)")
        return data


class _Source:
    """An artifact folder's programs as ProgramCache.source."""

    def __init__(self, artifacts: Artifacts, programs: ProgramCache, device: jax.Device):
        self.artifacts, self.programs, self.device = artifacts, programs, device

    def holds(self, key: Key) -> bool:
        return key_name(key) in self.artifacts.manifest["programs"]

    def __call__(self, key: Key) -> jax.stages.Compiled | None:
        a, name = self.artifacts, key_name(key)
        entry = a.manifest["programs"].get(name)
        if entry is None:
            log.warning("%s: no program %s in the artifacts; compiling it", a.folder, name)
            a.compiled.append(name)
            return None
        in_tree, out_tree = _trees(self.programs, key)
        compiled = serialize_executable.deserialize_and_load(
            a._program_bytes(name, entry), in_tree, out_tree,
            backend=self.device.client, execution_devices=[self.device])
        _check_arguments(compiled, self.programs, key, a.folder, name)
        a.loaded.append(name)
        return compiled
