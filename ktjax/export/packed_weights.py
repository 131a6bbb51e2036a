"""A loaded model's weights as one memory-mappable file: the host kernels' packed matrices
byte for byte, and the XLA arrays as they went to the device, so a later process neither
dequantizes nor repacks.

Layout: magic (8 bytes) | header length (u64 LE) | header (JSON) | sections, each 4096-byte
aligned. The header holds the params tree (dicts; arrays, host weights, expert sets (with
their stored activation and biases), quantized device matrices, hybrid expert stacks and
layer stacks naming their sections) and every section's offset, size and XXH64 digest. The
file is untrusted input: the header is parsed and bounds-checked before any section is
touched, every section is hashed before use, packed matrices are rebuilt only from layouts
the packers make (cpu_kernels/store/serialize.h) and quantized device matrices only with
arrays that fit their layout."""
from __future__ import annotations

import json
import os
import struct
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import _native, device_quant
from ktjax.device_quant import QuantMatrix
from ktjax.errors import ArtifactError, KernelError
from ktjax.export.manifest import is_int
from ktjax.host import moe as host_moe
from ktjax.host.native import native_call
from ktjax.weights import DeviceExperts, HostExperts, HostWeight, LayerStack, hybrid_types

MAGIC = b"KTJAXPW1"
ALIGN = 4096
HASH_CHUNK = 1 << 22
MAX_HEADER = 1 << 28
_DTYPES = ("float32", "bfloat16", "float16", "int32", "int8", "uint8")
_MEMORY_KINDS = ("device", "pinned_host")
# HybridExperts fields that are not arrays: written as they are (ints, the dtype name)
_HYBRID_STATICS = {"window": int, "defer": int, "prefill_min_tokens": int, "n_experts": int,
                   "dtype": str}
_HYBRID_ARRAYS = ("slots", "pool_start", "gate", "up", "down", "gate_bias", "up_bias",
                  "down_bias")


class HandleTaken(ArtifactError):
    """A recorded weight handle is in use in this process (another model holds it)."""


class _Writer:
    def __init__(self, fh: BinaryIO, start: int):
        self.fh, self.pos, self.sections = fh, start, []

    def add(self, buf: np.ndarray) -> int:
        buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        self.pos = -(-self.pos // ALIGN) * ALIGN
        self.fh.seek(self.pos)
        self.fh.write(memoryview(buf))
        digest = native_call(_native.hash64, buf, HASH_CHUNK)
        self.sections.append({"offset": self.pos, "size": int(buf.nbytes), "xxh64": digest})
        self.pos += buf.nbytes
        return len(self.sections) - 1


def _encode(node: Any, w: _Writer) -> dict:
    if isinstance(node, dict):
        return {"dict": {str(k): _encode(v, w) for k, v in node.items()}}
    if isinstance(node, LayerStack):
        return {"layer_stack": _encode(node.stack, w)}
    if isinstance(node, DeviceExperts):
        return {"device_experts": {k: _encode(getattr(node, k), w) for k in ("gate", "up", "down")}}
    if isinstance(node, (HostWeight, HostExperts)):
        mats = []
        for h in node.handles:
            layouts = native_call(_native.packed_layout, h)
            for i, lay in enumerate(layouts):
                lay["section"] = w.add(native_call(_native.packed_bytes, h, i))
            mats.append(layouts)
        if isinstance(node, HostExperts):
            return {"host_experts": {"handles": list(node.handles), "mats": mats,
                                     "epilogues": [_encode_epilogue(h, w) for h in node.handles]}}
        return {"host_weight": {"handles": list(node.handles), "mats": mats,
                                "out_features": node.out_features, "splits": list(node.splits)}}
    if isinstance(node, QuantMatrix):
        return {"quant_matrix": {
            "arrays": {k: _encode_optional(getattr(node, k), w)
                       for k in device_quant.ARRAY_FIELDS},
            "layout": {k: getattr(node, k) for k in device_quant.LAYOUT_FIELDS},
            "splits": list(node.splits)}}
    if isinstance(node, hybrid_types()):
        return {"hybrid_experts": _encode_hybrid(node, w)}
    if isinstance(node, jax.Array):
        a = np.asarray(node)
        if a.dtype.name not in _DTYPES:
            raise ArtifactError(f"cannot export an array of dtype {a.dtype}")
        out = {"dtype": a.dtype.name, "shape": list(a.shape), "section": w.add(a)}
        kind = getattr(node.sharding, "memory_kind", None)
        if kind not in (None, "device"):      # a hybrid stack's streamed weights: pinned_host
            out["memory_kind"] = kind
        return {"array": out}
    raise ArtifactError(f"cannot export a params node of type {type(node).__name__}")


def _encode_optional(node: Any, w: _Writer) -> dict | None:
    return None if node is None else _encode(node, w)


def _encode_hybrid(node, w: _Writer) -> dict:
    """A HybridExperts at rest (no layer or carried state bound): its host sets as an
    expert stack, its device pool and streamed weights as nodes, its settings as values."""
    if node.layer is not None or node.carried is not None:
        raise ArtifactError("cannot export a hybrid expert stack bound to a layer")
    act = node.activation
    return {"host": _encode(HostExperts(handles=node.handles), w),
            "activation": {"kind": act.kind, "alpha": act.alpha, "limit": act.limit},
            **{k: getattr(node, k) for k in _HYBRID_STATICS},
            "arrays": {k: _encode_optional(getattr(node, k), w) for k in _HYBRID_ARRAYS},
            "stream": None if node.stream is None else
            [_encode_optional(x, w) for x in node.stream]}


_BIASES = ("gate_bias", "up_bias", "down_bias")


def _encode_epilogue(handle: int, w: _Writer) -> dict | None:
    """An expert set's stored activation and biases (gpt-oss), biases as sections."""
    ep = host_moe.stored_epilogue(handle)
    if ep is None:
        return None
    out = {k: ep[k] for k in ("activation", "alpha", "limit")}
    for k in _BIASES:
        b = ep[k]
        out[k] = None if b is None else {"shape": list(b.shape), "section": w.add(b)}
    return out


def _decode_epilogue(ep: Any, r: "_Reader") -> dict | None:
    """The adopt_packed form of an exported epilogue (the native side checks its values and
    shapes against the expert set)."""
    if ep is None:
        return None
    if not isinstance(ep, dict) or not isinstance(ep.get("activation"), str) or not all(
            isinstance(ep.get(k), (int, float)) and not isinstance(ep.get(k), bool)
            for k in ("alpha", "limit")):
        raise ArtifactError(f"{r.path}: an expert set's epilogue is malformed")
    out = {"activation": ep["activation"], "alpha": float(ep["alpha"]),
           "limit": float(ep["limit"])}
    for k in _BIASES:
        b = ep.get(k)
        if b is None:
            out[k] = None
            continue
        shape = _field(b, "shape", list, r.path)
        data, _ = r.section(_field(b, "section", int, r.path))
        if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape) or \
                data.nbytes != shape[0] * shape[1] * 4:
            raise ArtifactError(f"{r.path}: an expert set's {k} of shape {shape} has "
                                f"{data.nbytes} bytes")
        out[k] = np.array(data.view(np.float32).reshape(shape))
    return out


def _data_start(header_len: int) -> int:
    return -(-(16 + header_len) // ALIGN) * ALIGN


def write(path: str | os.PathLike, params: dict) -> dict:
    """Write `params` (ktjax.models.loader.load_params) to `path` (through a temporary file,
    so a reader never sees half of one); returns {"size", "header_xxh64"} for the manifest."""
    path = os.fspath(path)
    body_path, tmp = f"{path}.body.tmp", f"{path}.tmp"
    try:
        with open(body_path, "wb") as body:  # sections first: the header names their places
            w = _Writer(body, 0)
            tree = _encode(params, w)
        header = json.dumps({"tree": tree, "sections": w.sections, "chunk": HASH_CHUNK}).encode()
        with open(tmp, "wb") as fh, open(body_path, "rb") as body:
            fh.write(MAGIC + struct.pack("<Q", len(header)) + header)
            fh.seek(_data_start(len(header)))
            while block := body.read(1 << 24):
                fh.write(block)
        os.replace(tmp, path)
    finally:
        for p in (body_path, tmp):
            if os.path.exists(p):
                os.unlink(p)
    return {"size": os.path.getsize(path),
            "header_xxh64": native_call(_native.hash64, np.frombuffer(header, np.uint8))}


def _header(buf: np.ndarray, path: str) -> tuple[dict, int]:
    if len(buf) < 16 or bytes(buf[:8]) != MAGIC:
        raise ArtifactError(f"{path}: not a ktjax packed-weights file (bad magic)")
    (n,) = struct.unpack("<Q", bytes(buf[8:16]))
    if n > MAX_HEADER or 16 + n > len(buf):
        raise ArtifactError(f"{path}: truncated: its header of {n} bytes does not fit the "
                            f"file's {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[16:16 + n]))
    except ValueError as e:
        raise ArtifactError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list) \
            or not isinstance(header.get("tree"), dict) or header.get("chunk") != HASH_CHUNK:
        raise ArtifactError(f"{path}: the header lacks its tree, sections or hash chunk size")
    return header, _data_start(n)


class _Reader:
    """Sections of a mapped file, each bounds-checked and hashed once, on first use."""

    def __init__(self, path: str, buf: np.ndarray, sections: list, start: int):
        self.path, self.buf, self.sections, self.start = path, buf, sections, start
        self.adopted: list[int] = []  # store handles made so far (released if reading fails)

    def section(self, i: Any, hashed: bool = True) -> tuple[np.ndarray, int]:
        """(bytes of section i, its recorded digest); `hashed`: checked here."""
        if not isinstance(i, int) or not 0 <= i < len(self.sections):
            raise ArtifactError(f"{self.path}: the header names section {i!r}, which it lacks")
        s = self.sections[i]
        try:
            off, size, digest = int(s["offset"]), int(s["size"]), int(s["xxh64"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{self.path}: section {i} lacks offset, size or digest") from None
        begin = self.start + off
        if off < 0 or size < 0 or not 0 <= digest < 2 ** 64 or begin + size > len(self.buf):
            raise ArtifactError(f"{self.path}: truncated: section {i} ({size} bytes at {begin}) "
                                f"ends past the file's {len(self.buf)} bytes")
        view = self.buf[begin:begin + size]
        if hashed and native_call(_native.hash64, view, HASH_CHUNK) != digest:
            raise ArtifactError(f"{self.path}: section {i} does not match its digest (corrupt)")
        return view, digest


def _field(node: dict, key: str, kind: type, path: str):
    v = node.get(key) if isinstance(node, dict) else None
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise ArtifactError(f"{path}: a params node lacks a valid {key!r}")
    return v


def _decode(node: Any, r: _Reader, device, handles: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ArtifactError(f"{r.path}: malformed params tree node")
    (kind, body), = node.items()
    if kind == "dict":
        if not isinstance(body, dict):
            raise ArtifactError(f"{r.path}: malformed params dict")
        return {k: _decode(v, r, device, handles) for k, v in body.items()}
    if kind == "layer_stack":
        return LayerStack(_decode(body, r, device, handles))
    if kind == "device_experts":
        return DeviceExperts(*(_decode(_field(body, k, dict, r.path), r, device, handles)
                               for k in ("gate", "up", "down")))
    if kind == "array":
        dtype = _field(body, "dtype", str, r.path)
        shape = _field(body, "shape", list, r.path)
        if dtype not in _DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ArtifactError(f"{r.path}: an array has dtype {dtype!r} and shape {shape}")
        memory = body.get("memory_kind", "device")
        if memory not in _MEMORY_KINDS:
            raise ArtifactError(f"{r.path}: an array has memory kind {memory!r}")
        data, _ = r.section(_field(body, "section", int, r.path))
        dt = jnp.dtype(dtype)
        if data.nbytes != int(np.prod(shape, dtype=object)) * dt.itemsize:
            raise ArtifactError(f"{r.path}: an array of shape {shape} {dtype} has "
                                f"{data.nbytes} bytes")
        where = device if memory == "device" else \
            jax.sharding.SingleDeviceSharding(device, memory_kind=memory)
        return jax.device_put(data.view(dt).reshape(shape), where)
    if kind == "quant_matrix":
        return _decode_quant_matrix(body, r, device, handles)
    if kind == "hybrid_experts":
        return _decode_hybrid(body, r, device, handles)
    if kind in ("host_weight", "host_experts"):
        recorded = _field(body, "handles", list, r.path)
        mats = _field(body, "mats", list, r.path)
        if len(mats) != len(recorded) or not recorded:
            raise ArtifactError(f"{r.path}: a host weight has {len(recorded)} handles and "
                                f"{len(mats)} matrix lists")
        if kind == "host_experts":
            epilogues = body.get("epilogues", [None] * len(recorded))
            if not isinstance(epilogues, list) or len(epilogues) != len(recorded):
                raise ArtifactError(f"{r.path}: a host expert stack has {len(recorded)} handles "
                                    "and a different number of epilogues")
            return HostExperts(handles=tuple(
                _adopt(r, h, m, handles, _decode_epilogue(ep, r))
                for h, m, ep in zip(recorded, mats, epilogues)))
        out = tuple(_adopt(r, h, m, handles) for h, m in zip(recorded, mats))
        splits = _field(body, "splits", list, r.path)
        return HostWeight(handles=out, out_features=_field(body, "out_features", int, r.path),
                          splits=tuple(int(x) for x in splits))
    raise ArtifactError(f"{r.path}: unknown params node kind {kind!r}")


def _decode_optional(node: Any, r: _Reader, device, handles: str) -> Any:
    return None if node is None else _decode(node, r, device, handles)


def _decode_quant_matrix(body: Any, r: _Reader, device, handles: str) -> QuantMatrix:
    arrays = _field(body, "arrays", dict, r.path)
    layout = _field(body, "layout", dict, r.path)
    splits = _field(body, "splits", list, r.path)
    if set(arrays) != set(device_quant.ARRAY_FIELDS) or \
            set(layout) != set(device_quant.LAYOUT_FIELDS) or \
            not isinstance(layout["format"], str) or \
            not all(is_int(v) for k, v in layout.items() if k != "format") or \
            not all(is_int(x) for x in splits):
        raise ArtifactError(f"{r.path}: a quantized matrix's fields are malformed")
    qm = QuantMatrix(**{k: _decode_optional(v, r, device, handles) for k, v in arrays.items()},
                     **layout, splits=tuple(splits))
    problem = device_quant.layout_problem(qm)
    if problem:
        raise ArtifactError(f"{r.path}: a quantized matrix is inconsistent: {problem}")
    return qm


def _decode_hybrid(body: Any, r: _Reader, device, handles: str):
    from ktjax import hybrid_experts            # only models with hybrid stacks need it
    from ktjax.expert_activation import ExpertActivation
    act = _field(body, "activation", dict, r.path)
    arrays = _field(body, "arrays", dict, r.path)
    stream = body.get("stream")
    statics = {k: _field(body, k, kind, r.path) for k, kind in _HYBRID_STATICS.items()}
    if set(arrays) != set(_HYBRID_ARRAYS) or not (stream is None or isinstance(stream, list)) \
            or not isinstance(act.get("kind"), str) or not all(
            isinstance(act.get(k), (int, float)) and not isinstance(act.get(k), bool)
            for k in ("alpha", "limit")):
        raise ArtifactError(f"{r.path}: a hybrid expert stack's fields are malformed")
    host = _decode(_field(body, "host", dict, r.path), r, device, handles)
    if not isinstance(host, HostExperts):
        raise ArtifactError(f"{r.path}: a hybrid expert stack's host sets are malformed")
    try:
        activation = ExpertActivation(act["kind"], float(act["alpha"]), float(act["limit"]))
    except KernelError as e:
        raise ArtifactError(f"{r.path}: {e}") from None
    return hybrid_experts.HybridExperts(
        handles=host.handles, activation=activation, **statics,
        **{k: _decode_optional(v, r, device, handles) for k, v in arrays.items()},
        stream=None if stream is None else
        tuple(_decode_optional(x, r, device, handles) for x in stream),
        device_memory=jax.sharding.SingleDeviceSharding(device, memory_kind="device"))


def _adopt(r: _Reader, handle: Any, layouts: Any, handles: str, epilogue: dict | None = None
           ) -> int:
    if not isinstance(handle, int) or not isinstance(layouts, list) or not layouts:
        raise ArtifactError(f"{r.path}: a host weight's handle or matrices are malformed")
    buffers, digests = [], []
    for lay in layouts:
        data, digest = r.section(_field(lay, "section", int, r.path), hashed=False)
        buffers.append(data)
        digests.append(digest)  # adopt_packed hashes while it reads
    at = handle if handles == "recorded" else 0
    try:
        h = native_call(_native.adopt_packed, layouts, buffers, digests, at, HASH_CHUNK,
                        epilogue)
        r.adopted.append(h)
        return h
    except KernelError as e:
        if "is taken" in str(e):
            raise HandleTaken(f"{r.path}: weight handle {handle} is in use in this process "
                              "(another model is loaded)") from None
        raise ArtifactError(f"{r.path}: {e}") from None


def read(path: str | os.PathLike, device: jax.Device, handles: str = "recorded") -> dict:
    """The params tree of `path`, arrays on `device`, packed weights in the native store
    under their recorded handle numbers (`handles="recorded"`, what exported programs name;
    HandleTaken if one is in use) or fresh ones ("fresh")."""
    path = os.fspath(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else \
        np.zeros(0, np.uint8)
    header, start = _header(buf, path)
    reader = _Reader(path, buf, header["sections"], start)
    try:
        params = _decode(header["tree"], reader, device, handles)
        if not isinstance(params, dict):
            raise ArtifactError(f"{path}: the params tree is not a dict")
    except BaseException:
        for h in reader.adopted:
            _native.release_weight(h)
        raise
    return params
