"""GGUF file access: metadata as plain Python values, tensors as memory-mapped views.

Nothing is copied here: tensor data stays in the OS page cache until the loader converts it.
Every structural problem (bad magic, truncation, duplicate or overlapping tensors) becomes a
GGUFError naming the file and the offending key or tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ktjax.errors import GGUFError

_MISSING = object()


@dataclass(frozen=True)
class TensorView:
    """One tensor of a GGUF file. `shape` is the numpy (row-major) shape: GGUF's ne reversed."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray  # raw memory-mapped bytes/elements, as gguf.GGUFReader exposes them
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to str/int/float/bool/list values."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/struct/IndexError/OSError
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.metadata: dict[str, Any] = {}
        for name, field in reader.fields.items():
            try:
                self.metadata[name] = field.contents()
            except Exception as e:
                raise GGUFError(f"{self.path}: metadata key {name!r} is corrupt ({e})") from e
        self.tensors: dict[str, TensorView] = {}
        file_size = os.path.getsize(self.path)
        for t in reader.tensors:
            if t.name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {t.name!r} appears twice")
            end = int(t.data_offset) + int(t.n_bytes)
            if end > file_size:
                raise GGUFError(
                    f"{self.path}: truncated: tensor {t.name!r} ends at byte {end} "
                    f"but the file has {file_size} bytes")
            self.tensors[t.name] = TensorView(
                name=t.name,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                qtype=gguf.GGMLQuantizationType(int(t.tensor_type)),
                data=t.data,
                n_bytes=int(t.n_bytes),
            )

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture"))

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Metadata value for `key`; a missing required key is a GGUFError naming it."""
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return default

    def file_type_name(self) -> str:
        """Most common quant type among 2-D tensors (what `ktjax info` calls the quant mix head)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) >= 2:
                counts[t.qtype.name] = counts.get(t.qtype.name, 0) + t.n_elements
        return max(counts, key=counts.get) if counts else "none"
