"""What an exported artifact depends on, measured the same way at export and at load: the
model file, the placement, the engine settings, the software and the machine. Two identities
are compared field by field (ktjax.export.manifest), so a refusal names what differs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from typing import Any, Mapping

import jax
import jaxlib

import ktjax
from ktjax import _native
from ktjax.gguf.reader import GGUFFile

# CPU flags (as /proc/cpuinfo names them) that decide which instructions a compiled program
# may hold: XLA compiles for the host's features, and code built for one level must never run
# on a lower one.
_CODEGEN_FLAGS = re.compile(r"^(sse\w*|ssse3|avx\w*|amx\w*|fma\w*|f16c|bmi\d|popcnt|abm|movbe|"
                            r"adx|aes|pclmulqdq|vpclmulqdq|vaes|gfni|sha_ni|lzcnt|prfchw)$")
_SAMPLES = 16            # pieces of the tensor data hashed besides the header
_SAMPLE_BYTES = 1 << 16


def model_identity(f: GGUFFile) -> dict[str, Any]:
    """Size, a digest of everything before the tensor data (header, metadata, tensor index:
    names, shapes, types, offsets) and of 16 evenly spaced 64 KiB samples of the data. Content
    only: a copy of the file elsewhere is the same model. Measured once per GGUFFile (a load
    asks twice: for the tokenizer and for the check)."""
    if f not in _measured:
        _measured[f] = _model_identity(f)
    return dict(_measured[f])


_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_identity(f: GGUFFile) -> dict[str, Any]:
    size = os.path.getsize(f.path)
    with open(f.path, "rb") as fh:
        header = hashlib.sha256(fh.read(f.data_start)).hexdigest()
        samples = hashlib.sha256()
        span = max(size - f.data_start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            fh.seek(f.data_start + span * i // (_SAMPLES - 1))
            samples.update(fh.read(_SAMPLE_BYTES))
    return {"size": size, "header_sha256": header, "data_samples_sha256": samples.hexdigest()}


def placement_identity(rules_file: os.PathLike, placement: Mapping[str, Any]) -> dict[str, Any]:
    """The rules file's name and content digest, and a digest of the decisions it made
    (tensor -> placement, format): the packed weights follow from those."""
    decisions = sorted((p, d.placement, d.format) for p, d in placement.items())
    with open(rules_file, "rb") as fh:
        content = hashlib.sha256(fh.read()).hexdigest()
    return {"rules_file": os.path.basename(os.fspath(rules_file)), "rules_sha256": content,
            "decisions_sha256": hashlib.sha256(json.dumps(decisions).encode()).hexdigest()}


def _native_sha256() -> str:
    h = hashlib.sha256()
    with open(_native.__file__, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cpu_features() -> list[str]:
    """The codegen-relevant CPU flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return sorted(f for f in line.split(":", 1)[1].split()
                                  if _CODEGEN_FLAGS.match(f))
    except OSError:
        pass
    return []


def software_identity() -> dict[str, Any]:
    return {"ktjax": ktjax.__version__, "native_sha256": _native_sha256(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__}


def machine_identity(device: jax.Device) -> dict[str, Any]:
    return {"platform": device.platform, "device_kind": device.device_kind,
            "cpu_features": cpu_features(), "isa": _native.detected_isa()}
