"""Crafted GGUF files for bad-input tests: parse a well-formed file into editable parts and
write them back, so a test can change one key's type, a tensor's dims or offset, duplicate a
key, or append raw bytes that no writer would produce. Independent of ktjax's reader."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as V

_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
           V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
           V.FLOAT64: "<d"}


@dataclass
class Field:
    key: str
    vtype: int
    value: Any = None
    etype: int | None = None   # arrays: element type
    raw: bytes | None = None   # the encoded value as is (after the type), overriding value


@dataclass
class TensorInfo:
    name: str
    dims: list[int]            # GGUF order (ne), innermost first
    type_id: int
    offset: int


@dataclass
class Crafted:
    version: int
    fields: list[Field]
    tensors: list[TensorInfo]
    data: bytes                # the data section, from its aligned start
    alignment: int = 32
    n_tensors: int | None = None   # overrides the header's counts
    n_kv: int | None = None

    def field(self, key: str) -> Field:
        return next(f for f in self.fields if f.key == key)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)

    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version,
                                              len(self.tensors) if self.n_tensors is None
                                              else self.n_tensors,
                                              len(self.fields) if self.n_kv is None
                                              else self.n_kv))
        for f in self.fields:
            out += _string(f.key) + struct.pack("<I", f.vtype)
            out += f.raw if f.raw is not None else _value(f.vtype, f.value, f.etype)
        for t in self.tensors:
            out += _string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.type_id, t.offset)
        out += bytes(-len(out) % self.alignment)
        return bytes(out) + self.data

    def write(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any, etype: int | None) -> bytes:
    if vtype == V.STRING:
        return _string(value)
    if vtype == V.ARRAY:
        return struct.pack("<IQ", etype, len(value)) + b"".join(
            _value(etype, v, None) for v in value)
    return struct.pack(_SCALAR[V(vtype)], value)


def nested_array(depth: int) -> bytes:
    """The encoding of an array holding an array holding ... (depth levels) of nothing."""
    return struct.pack("<IQ", V.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", V.UINT8, 0)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode()

    def value(self, vtype: int) -> tuple[Any, int | None]:
        if vtype == V.STRING:
            return self.string(), None
        if vtype == V.ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            return [self.value(etype)[0] for _ in range(n)], etype
        return self.take(_SCALAR[V(vtype)]), None


def parse(source: str | Path | bytes) -> Crafted:
    """The parts of a well-formed GGUF file (a path, or the file's bytes)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    r = _Reader(data)
    assert data[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    fields = []
    for _ in range(n_kv):
        key, vtype = r.string(), r.take("<I")
        value, etype = r.value(vtype)
        fields.append(Field(key, vtype, value, etype))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        tensors.append(TensorInfo(name, dims, r.take("<I"), r.take("<Q")))
    alignment = next((f.value for f in fields if f.key == "general.alignment"), 32)
    start = -(-r.pos // alignment) * alignment
    return Crafted(version, fields, tensors, data[start:], alignment)
