"""GGUF file access: metadata as plain Python values, tensors as memory-mapped views.

The layout constants (value types, quant block sizes) are the `gguf` package's, copied in
ggml_types; the parse is our own because gguf.GGUFReader builds one numpy object per
vocabulary string, which takes tens of seconds on a 262k-token vocabulary. Nothing is copied: tensor bytes stay in the page
cache until the loader converts them. Every structural problem (bad magic, truncation,
duplicate tensors or keys, unknown types, misaligned or overlapping tensor data, sizes past
64 bits) is a GGUFError naming the file and the key or tensor; so is a metadata key that ktjax
reads holding a value of the wrong type or out of range (gguf/metadata_schema.py), checked
here so that no model family ever divides by, allocates from or loops over a bad value.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ktjax.errors import GGUFError, TensorError, UnsupportedModelError
from ktjax.gguf.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from ktjax.gguf.metadata_schema import check_metadata

_MISSING = object()
_U64 = struct.Struct("<Q")
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# Bytes an array element takes at least: a string its length field, an array its header.
_MIN_ELEMENT_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
# Arrays of arrays deeper than this are refused (no model key nests at all; llama.cpp refuses
# any nesting) rather than parsed recursively into a RecursionError.
MAX_ARRAY_DEPTH = 8
# As ggml: at most 4 dimensions, and no tensor of 2^63 elements or bytes or more.
MAX_DIMS = 4
_INT64_MAX = 2**63 - 1
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorView:
    """One tensor of a GGUF file. `shape` is the numpy (row-major) shape: GGUF's ne reversed.
    `data` is the tensor's raw bytes (uint8), memory-mapped."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: np.ndarray, path: str):
        # a memoryview: slicing a np.memmap per value made the tokenizer's 10^5 strings cost
        # seconds (docs/kernel-notes.md, "Export and warm reload")
        self.buf, self.pos, self.path = memoryview(buf), 0, path
        self.what = "the header"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated or corrupt while reading {self.what} "
                            f"(needs bytes {self.pos}..{self.pos + n}, file has {len(self.buf)})")
        out = memoryview(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: invalid UTF-8 in {self.what}") from e

    def strings(self, count: int) -> list[str]:
        """`count` strings in one loop: a vocabulary's 10^5 through string() took 0.1 s."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack, append = _U64.unpack_from, out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                n = unpack(buf, pos)[0]
                pos += 8
                if pos + n > end:
                    break
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: invalid UTF-8 in {self.what}") from e
        if len(out) < count:
            raise GGUFError(f"{self.path}: truncated or corrupt while reading {self.what} "
                            f"(string {len(out)} of {count} runs past the file's {end} bytes)")
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: {self.what} nests arrays deeper than "
                                f"{MAX_ARRAY_DEPTH} levels")
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:   # numeric arrays in one read
                dtype = np.dtype(_SCALARS[etype].replace("?", "u1"))
                arr = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
                return arr.astype(bool).tolist() if etype == GGUFValueType.BOOL else arr.tolist()
            if etype not in _MIN_ELEMENT_BYTES:
                raise GGUFError(f"{self.path}: unknown array element type {etype} in {self.what}")
            if count * _MIN_ELEMENT_BYTES[etype] > len(self.buf) - self.pos:
                raise GGUFError(f"{self.path}: truncated or corrupt while reading {self.what} "
                                f"(an array of {count} elements cannot fit in the "
                                f"{len(self.buf) - self.pos} bytes left)")
            if etype == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(etype, depth + 1) for _ in range(count)]
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: unknown value type {vtype} in {self.what}")
        return self.scalar(_SCALARS[vtype])


class _Tensors(dict):
    """name -> TensorView; looking up a name the file lacks is a TensorError naming it."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __missing__(self, name: str):
        raise TensorError(f"{self.path}: required tensor {name!r} is missing")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a GGUF file alone, without the model checks or tensors (the
    vocabulary-only files of llama.cpp's tokenizer suite have no tensors)."""
    path = os.fspath(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    if bytes(cur.take(4)) != b"GGUF" or cur.scalar("<I") not in (2, 3):
        raise GGUFError(f"{path}: not a GGUF file of version 2 or 3")
    _, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        cur.what = f"metadata entry {i}"
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    return meta


class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to str/int/float/bool/list values."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: no such GGUF file")
        if os.path.getsize(self.path) == 0:
            raise GGUFError(f"{self.path}: empty file, not GGUF")
        buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(buf, self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            cur.what = f"metadata entry {i}"
            key = cur.string()
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key!r} appears twice")
            cur.what = f"metadata key {key!r}"
            self.metadata[key] = cur.value(cur.scalar("<I"))
        check_metadata(self.metadata, self.path, n_tensors)

        infos = []
        for i in range(n_tensors):
            cur.what = f"tensor info {i}"
            name = cur.string()
            cur.what = f"tensor info of {name!r}"
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions "
                                f"(expected 1..{MAX_DIMS})")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        data_start = -(-cur.pos // alignment) * alignment
        self.data_start = data_start  # bytes before it: header, metadata, tensor index
        self.tensors: dict[str, TensorView] = _Tensors(self.path)
        spans = []
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            if offset % alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} is not a "
                                f"multiple of the alignment {alignment}")
            view = self._view(buf, name, dims, type_id, data_start + offset)
            self.tensors[name] = view
            if view.n_bytes:
                spans.append((offset, offset + view.n_bytes, name))
        _check_disjoint(spans, self.path)

    def _view(self, buf: np.ndarray, name: str, dims: list[int], type_id: int,
              start: int) -> TensorView:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} has unknown quant type id {type_id}") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:  # exact: Python ints do not wrap as an int64 product would
            n *= d
        if max(dims) > _INT64_MAX or n > _INT64_MAX or n // block * block_bytes > _INT64_MAX:
            raise GGUFError(f"{self.path}: tensor {name!r} of dimensions {dims} has 2^63 "
                            "elements or bytes or more")
        if dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} row of {dims[0]} elements is not a "
                            f"multiple of the {qtype.name} block size {block}")
        end = start + n // block * block_bytes
        if end > len(buf):
            raise GGUFError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} "
                            f"but the file has {len(buf)} bytes")
        return TensorView(name, tuple(reversed(dims)), qtype, buf[start:end])

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


def _check_disjoint(spans: list[tuple[int, int, str]], path: str) -> None:
    """Tensor data ranges [start, end) of the data section must not overlap (llama.cpp
    refuses such files; two weights sharing bytes are a corrupt or crafted file)."""
    spans = sorted(spans)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise GGUFError(f"{path}: tensor {second!r} data (from offset {start}) overlaps "
                            f"tensor {first!r} (up to offset {end})")
