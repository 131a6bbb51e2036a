"""Quantized matrices on the device: codes and scales as device arrays, dequantized inside the
jitted step so XLA fuses the dequantization into the matmul that reads them.

One handle, `QuantMatrix`, holds every format (ktjax.rules' device formats):

- `keep`: a GGUF tensor's blocks repacked losslessly — Q8_0, Q4_0, Q4_1, Q4_K as 4- or 8-bit
  codes with the file's own float16 scales (and 6-bit sub-scales and mins), Q5_K / Q6_K as
  one int8 code per value. Dequantized values are bit-identical to gguf.quants' (the same
  float32 operations in the same order).
- `int8`: symmetric int8 codes, one float32 scale per group of 128 values along K (per row
  when K is not a multiple of 128).
- `int4`: asymmetric 4-bit codes (scale and min, float16) per group of 32 values, the Q4_1
  layout.
- layers of one parameter that mix K-quants (Q4_K_M files) share one widened layout
  (`widen_to_k8`: int8 codes, sub-scales and mins per 16), still bit-identical.

A value is  S * (q - offset) - Mn  (K-quants: S = d * sc and Mn = dmin * m per sub-block)
or  S * q + bias  (Q4_1 / int4). 4-bit codes keep GGUF's nibble order: byte j of a chunk of
2h values holds value j (low nibble) and value h + j (high nibble), h = 16 for Q4_0 / Q4_1 /
int4 and 32 for Q4_K, so the K-quant's bytes are taken as they are.

`linear(qm, x)` picks the matmul form by the number of rows (a static shape): the Pallas GEMV
of ktjax/kernels/quant_matmul.py where KTJAX_QUANT_KERNEL asks for it (PALLAS_AUTO_ROWS says
when `auto` does); else few rows (decode) multiply and reduce in one fusion, and more rows
dequantize to the activation dtype and run a dot (docs/kernel-notes.md, "gpu-quant").
"""
from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import pytree
from ktjax.errors import TensorError
from ktjax.gguf.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
QK_K = 256
# GGUF types `keep` repacks; other quantized types are dequantized to the engine dtype.
KEEP_QTYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K)
# K-quants that may mix across the layers of one parameter (Q4_K_M / Q5_K_M files give some
# layers' attn_v / ffn_down Q6_K): such a parameter is held in one common 8-bit layout.
K_MIX_QTYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
QUANT_FORMATS = ("int8", "int4")
INT8_GROUP = 128
INT4_GROUP = 32
# Rows (tokens of a step) up to which a matmul multiplies and reduces over the codes instead
# of dequantizing to a matrix and calling a dot; KTJAX_QUANT_REDUCE_ROWS overrides.
REDUCE_MAX_ROWS = 8


@pytree.dataclass
class QuantMatrix:
    """A [.., N, K] matrix (leading axes: stacked layers) as codes and scales.

    codes: uint8 [.., N, K/2] (bits 4, nibbles as the module docstring says) or int8 [.., N, K].
    scale: [.., N, K/scale_group], float16 or float32 (GGUF d / our scale).
    sub_scale, sub_min: [.., N, K/group] 6-bit (uint8) or int8 sub-block scales and mins.
    min_scale: [.., N, K/scale_group] float16 (GGUF dmin).
    bias: [.., N, K/group] float16, added (Q4_1's m, int4's min).
    """

    codes: jax.Array
    scale: jax.Array
    sub_scale: jax.Array | None = None
    min_scale: jax.Array | None = None
    sub_min: jax.Array | None = None
    bias: jax.Array | None = None
    bits: int = pytree.field(pytree_node=False, default=8)
    half: int = pytree.field(pytree_node=False, default=0)
    group: int = pytree.field(pytree_node=False, default=32)
    scale_group: int = pytree.field(pytree_node=False, default=32)
    offset: int = pytree.field(pytree_node=False, default=0)
    format: str = pytree.field(pytree_node=False, default="")
    splits: tuple[int, ...] = pytree.field(pytree_node=False, default=())  # fused: rows each
    # Inside the scan over layers a stacked matrix rides whole with the layer bound here
    # (weights.bind_layer): a kernel then reads the layer in place, where a slice the scan
    # took would be copied out before a custom call could read it.
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> "QuantMatrix":
        return self.replace(layer=layer)

    def layer_slice(self) -> "QuantMatrix":
        """The bound layer's matrix (2-D codes), or this one when no layer is bound."""
        if self.layer is None:
            return self
        return self.replace(layer=None, **{f: getattr(self, f)[self.layer] for f in ARRAY_FIELDS
                                           if getattr(self, f) is not None})

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, k = self.codes.shape
        return (*lead, n, k * (2 if self.bits == 4 else 1))

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays())

    def arrays(self) -> list:
        return [a for a in (getattr(self, f) for f in ARRAY_FIELDS) if a is not None]


ARRAY_FIELDS = ("codes", "scale", "sub_scale", "min_scale", "sub_min", "bias")
LAYOUT_FIELDS = ("bits", "half", "group", "scale_group", "offset", "format")


def layout_problem(qm: QuantMatrix) -> str | None:
    """What makes `qm`'s arrays disagree with its layout fields (a QuantMatrix read from an
    untrusted file), or None."""
    if qm.bits not in (4, 8) or qm.format not in ("keep", *QUANT_FORMATS) or qm.codes is None:
        return f"bits {qm.bits}, format {qm.format!r}"
    *lead, n, k = qm.shape
    if qm.codes.dtype != (np.uint8 if qm.bits == 4 else np.int8):
        return f"{qm.bits}-bit codes of dtype {qm.codes.dtype}"
    if min(qm.group, qm.scale_group) <= 0 or k % qm.scale_group or qm.scale_group % qm.group \
            or (qm.bits == 4 and (qm.half <= 0 or k % (2 * qm.half))):
        return f"groups {qm.group} / {qm.scale_group} (half {qm.half}) for {k} columns"
    per_group, per_scale = (*lead, n, k // qm.group), (*lead, n, k // qm.scale_group)
    want = {"scale": per_scale, "min_scale": per_scale, "sub_scale": per_group,
            "sub_min": per_group, "bias": per_group}
    for name, shape in want.items():
        a = getattr(qm, name)
        if a is not None and tuple(a.shape) != shape:
            return f"{name} of shape {tuple(a.shape)}, expected {shape}"
    if (qm.min_scale is None) != (qm.sub_min is None) or qm.scale is None:
        return "scale, or min_scale without sub_min"
    if qm.splits and sum(qm.splits) != n:
        return f"splits {qm.splits} for {n} rows"
    return None


def concat_rows(mats: list[QuantMatrix]) -> QuantMatrix | None:
    """Matrices of one layout and input size stacked along their output rows, with `splits`
    (several projections of one input as one matmul: one kernel instead of several), or None
    when their layouts differ."""
    first = mats[0]
    if any(getattr(m, f) != getattr(first, f) for m in mats for f in LAYOUT_FIELDS) or \
            any(m.shape[:-2] != first.shape[:-2] or m.shape[-1] != first.shape[-1] or
                m.splits for m in mats):
        return None
    fields = {}
    for name in ARRAY_FIELDS:
        parts = [getattr(m, name) for m in mats]
        if any((p is None) != (parts[0] is None) or
               (p is not None and p.dtype != parts[0].dtype) for p in parts):
            return None
        fields[name] = None if parts[0] is None else jnp.concatenate(parts, axis=-2)
    return first.replace(**fields, splits=tuple(m.shape[-2] for m in mats))


# ---- dequantization (jnp: the step's fusion and the oracle for any kernel) -----------------

def _repeat(a: jax.Array, times: int) -> jax.Array:
    return a if times == 1 else jnp.repeat(a, times, axis=-1)


def _group_codes(qm: QuantMatrix) -> jax.Array:
    """The codes as float32 [.., N, K/group, group] in K order (offset applied)."""
    *lead, n, k = qm.shape
    if qm.bits == 4:
        c = qm.codes.reshape(*lead, n, k // (2 * qm.half), qm.half)
        q = jnp.stack([c & 15, c >> 4], axis=-2)        # [.., C, 2, h]: low then high half
    else:
        q = qm.codes
    q = q.reshape(*lead, n, k // qm.group, qm.group).astype(jnp.float32)
    return q - qm.offset if qm.offset else q


def _group_terms(qm: QuantMatrix) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(S, Mn, bias) per group, float32 [.., N, K/group]: value = S*q - Mn or S*q + bias."""
    r = qm.scale_group // qm.group
    s = _repeat(qm.scale.astype(jnp.float32), r)
    if qm.sub_scale is not None:
        s = s * qm.sub_scale.astype(jnp.float32)
    mn = None
    if qm.min_scale is not None:
        mn = _repeat(qm.min_scale.astype(jnp.float32), r) * qm.sub_min.astype(jnp.float32)
    bias = None if qm.bias is None else qm.bias.astype(jnp.float32)
    return s, mn, bias


def dequantize(qm: QuantMatrix, dtype=jnp.float32) -> jax.Array:
    """The matrix [.., N, K] in `dtype` (float32: bit-identical to gguf.quants for `keep`)."""
    s, mn, bias = _group_terms(qm)
    w = s[..., None] * _group_codes(qm)
    if mn is not None:
        w = w - mn[..., None]
    if bias is not None:
        w = w + bias[..., None]
    return w.reshape(qm.shape).astype(dtype)


def reduce_max_rows() -> int:
    """KTJAX_QUANT_REDUCE_ROWS (default REDUCE_MAX_ROWS), checked."""
    value = os.environ.get("KTJAX_QUANT_REDUCE_ROWS", str(REDUCE_MAX_ROWS))
    if not value.isdigit():
        raise ValueError(f"KTJAX_QUANT_REDUCE_ROWS must be a row count (0 or more), "
                         f"got {value!r}")
    return int(value)


# Rows for which `auto` takes the Pallas GEMV on a GPU: none until the wide-tile GEMV has
# run on one. The first GEMV was the default for 2..64 rows (H100, 14336 x 4096, us, XLA
# form / GEMV: Q4_K 468/295 at 4 rows, 1346/69 at 16, 4831/111 at 64); the wide-tile one
# that replaced it failed to compile there at 16+ rows (shared memory; bounded since, not
# yet run on a GPU; docs/kernel-notes.md), so a GPU step keeps XLA's forms by default.
PALLAS_AUTO_ROWS: tuple[int, ...] = ()


def use_pallas_kernel(rows: int) -> bool:
    """KTJAX_QUANT_KERNEL: 'auto' (default: the Pallas GEMV for PALLAS_AUTO_ROWS on a GPU,
    the XLA forms elsewhere), 'xla' (the fusions) or 'pallas' (the GEMV wherever it takes
    the shape)."""
    value = os.environ.get("KTJAX_QUANT_KERNEL", "auto")
    if value not in ("auto", "xla", "pallas"):
        raise ValueError(f"KTJAX_QUANT_KERNEL must be auto, xla or pallas, got {value!r}")
    if value == "auto":
        return jax.default_backend() == "gpu" and rows in PALLAS_AUTO_ROWS
    return value == "pallas"


def linear(qm: QuantMatrix, x: jax.Array) -> jax.Array:
    """y = x @ W.T in float32, x [.., K] (any float dtype) -> [.., N]."""
    *lead, k = x.shape
    rows = math.prod(lead)
    n = qm.shape[-2]
    x2 = x.reshape(rows, k)
    if use_pallas_kernel(rows):
        from ktjax.kernels import quant_matmul   # imports this module
        if quant_matmul.supported(qm, rows):
            y = quant_matmul.gemv(qm, x2, interpret=jax.default_backend() != "gpu")
            return y.reshape(*lead, n)
    qm = qm.layer_slice()
    if rows <= reduce_max_rows():
        # one fusion: codes -> values -> products -> sums over K. Output rows ordered
        # [N, rows]: the reductions of one weight row are neighbours, so its codes come from
        # HBM once and from cache for the other rows.
        y = jnp.sum(dequantize(qm)[:, None, :] * x2.astype(jnp.float32)[None], axis=-1).T
    else:
        w = dequantize(qm, x.dtype if x.dtype != jnp.float32 else jnp.float32)
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return y.reshape(*lead, n)


# ---- repacking GGUF blocks (numpy, at load time) -------------------------------------------

def _blocks(raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> np.ndarray:
    """A [N, K] tensor's bytes as blocks [N, K/block, block_bytes]."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    n, k = shape
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(n, k // elems, nbytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K 12-byte scale fields [.., 12] -> 6-bit (sc, m) [.., 8] (gguf's unpacking)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _flat(a: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(n, -1)


def _pack_q8_0(b, n, k):
    return dict(codes=_flat(b[..., 2:], n).view(np.int8), scale=_f16(b[..., 0:2])), \
        dict(bits=8, group=32, scale_group=32)


def _pack_q4_0(b, n, k):
    return dict(codes=_flat(b[..., 2:], n), scale=_f16(b[..., 0:2])), \
        dict(bits=4, half=16, group=32, scale_group=32, offset=8)


def _pack_q4_1(b, n, k):
    return dict(codes=_flat(b[..., 4:], n), scale=_f16(b[..., 0:2]), bias=_f16(b[..., 2:4])), \
        dict(bits=4, half=16, group=32, scale_group=32)


def _k_fields(b, n):
    sc, mn = _k_scale_min(b[..., 4:16])
    return dict(scale=_f16(b[..., 0:2]), min_scale=_f16(b[..., 2:4]),
                sub_scale=_flat(sc, n), sub_min=_flat(mn, n))


def _pack_q4_k(b, n, k):
    return dict(codes=_flat(b[..., 16:], n), **_k_fields(b, n)), \
        dict(bits=4, half=32, group=32, scale_group=QK_K)


def _pack_q5_k(b, n, k):
    qh = b[..., 16:48][..., None, :]                            # [n, nb, 1, 32]
    qs = b[..., 48:].reshape(n, -1, 4, 32)
    low = np.stack([qs & 15, qs >> 4], axis=-2).reshape(n, -1, 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1    # bit i: sub-block i
    q = (low | (high << 4)).astype(np.int8)
    return dict(codes=_flat(q, n), **_k_fields(b, n)), \
        dict(bits=8, group=32, scale_group=QK_K)


def _pack_q6_k(b, n, k):
    ql = b[..., 0:128].reshape(n, -1, 2, 1, 64)
    ql = (ql >> np.array([0, 4], np.uint8)[:, None]) & 15       # [n, nb, 2, 2, 64]
    ql = ql.reshape(n, -1, 8, 32)
    qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
    qh = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [n, nb, 2, 4, 32]
    qh = qh.reshape(n, -1, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    return dict(codes=_flat(q, n), scale=_f16(b[..., 208:210]),
                sub_scale=_flat(b[..., 192:208], n).view(np.int8)), \
        dict(bits=8, group=16, scale_group=QK_K)


_PACKERS: dict[T, Callable] = {T.Q8_0: _pack_q8_0, T.Q4_0: _pack_q4_0, T.Q4_1: _pack_q4_1,
                               T.Q4_K: _pack_q4_k, T.Q5_K: _pack_q5_k, T.Q6_K: _pack_q6_k}


def pack_gguf(raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> tuple[dict, dict]:
    """A GGUF matrix's blocks -> (numpy arrays, static fields) of its `keep` QuantMatrix."""
    qtype = T(qtype)
    if qtype not in _PACKERS:
        raise TensorError(f"format keep on the device has no packed layout for {qtype.name}")
    n, k = shape
    return _PACKERS[qtype](_blocks(raw, qtype, (n, k)), n, k)


def widen_to_k8(packed: tuple[dict, dict], n: int, k: int) -> tuple[dict, dict]:
    """A packed Q4_K / Q5_K / Q6_K matrix in the layout all three share, losslessly: int8
    codes, f16 d and dmin per 256, int8 sub-scale and uint8 sub-min per 16 (Q6_K: mins 0,
    and S*q - 0*0 = S*q exactly), so layers of mixed K-quant types stack."""
    arrays, st = packed
    codes = arrays["codes"]
    if st["bits"] == 4:
        c = codes.reshape(n, k // (2 * st["half"]), 1, st["half"])
        codes = np.concatenate([c & 15, c >> 4], axis=2).reshape(n, k).astype(np.int8)
    r = st["group"] // 16
    sub_min = arrays.get("sub_min")
    out = dict(codes=codes, scale=arrays["scale"],
               sub_scale=np.repeat(arrays["sub_scale"].astype(np.int8), r, axis=-1),
               min_scale=arrays.get("min_scale", np.zeros_like(arrays["scale"])),
               sub_min=np.zeros((n, k // 16), np.uint8) if sub_min is None else
               np.repeat(sub_min, r, axis=-1))
    return out, dict(bits=8, group=16, scale_group=QK_K)


def quantize_int8(w: np.ndarray) -> tuple[dict, dict]:
    """A float32 [N, K] matrix -> symmetric int8 codes, float32 scale per group of 128."""
    n, k = w.shape
    g = INT8_GROUP if k % INT8_GROUP == 0 else k
    wg = w.reshape(n, k // g, g)
    scale = np.abs(wg).max(axis=-1) / 127.0
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
    q = np.clip(np.rint(wg * inv[..., None]), -127, 127).astype(np.int8)
    return dict(codes=q.reshape(n, k), scale=scale.astype(np.float32)), \
        dict(bits=8, group=g, scale_group=g)


def quantize_int4(w: np.ndarray) -> tuple[dict, dict]:
    """A float32 [N, K] matrix -> asymmetric 4-bit codes, float16 scale and min per 32."""
    n, k = w.shape
    g = INT4_GROUP
    if k % g:
        raise TensorError(f"format int4 needs the input dimension to be a multiple of {g}, "
                          f"got {k}")
    wg = w.reshape(n, k // g, g)
    lo = wg.min(axis=-1).astype(np.float16)
    d = ((wg.max(axis=-1) - lo.astype(np.float32)) / 15.0).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.where(d32 > 0, 1.0 / np.where(d32 > 0, d32, 1.0), 0.0)
    q = np.clip(np.rint((wg - lo.astype(np.float32)[..., None]) * inv[..., None]), 0, 15)
    q = q.astype(np.uint8).reshape(n, k // g, 2, g // 2)
    return dict(codes=(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2), scale=d,
                bias=lo), dict(bits=4, half=g // 2, group=g, scale_group=g)


def stack_to_device(per_layer: list[tuple[dict, dict]], fmt: str, stacked: bool,
                    device: jax.Device | None) -> QuantMatrix:
    """Layers' packed arrays -> one QuantMatrix ([L, ...] when `stacked`) on `device`."""
    statics = per_layer[0][1]
    if any(s != statics for _, s in per_layer[1:]):
        raise TensorError("the layers of one parameter pack to different layouts "
                          "(different quant types); use one format for them")
    names = per_layer[0][0].keys()
    arrays = {name: np.stack([p[name] for p, _ in per_layer]) if stacked else
              per_layer[0][0][name] for name in names}
    return QuantMatrix(**{k: jax.device_put(v, device) for k, v in arrays.items()},
                       **statics, format=fmt)


def packed_nbytes(qtype: T, shape: tuple[int, int], fmt: str, k_mixed: bool = False) -> int:
    """Bytes of the device arrays the loader makes for one [N, K] matrix in `fmt` (keep:
    from a GGUF tensor of `qtype`; `k_mixed`: in the common layout of mixed K-quant layers)
    — what `ktjax info --rules` reports."""
    n, k = shape
    if fmt == "keep" and k_mixed:
        return n * k + 2 * n * (k // 16) + 4 * n * (k // QK_K)
    if fmt == "int8":
        return n * k + n * (k // (INT8_GROUP if k % INT8_GROUP == 0 else k)) * 4
    if fmt == "int4":
        return n * k // 2 + n * (k // INT4_GROUP) * 4
    qtype = T(qtype)
    sub = n * (k // 32)
    supers = n * (k // QK_K)
    return {T.Q8_0: n * k + sub * 2, T.Q4_0: n * k // 2 + sub * 2,
            T.Q4_1: n * k // 2 + sub * 4, T.Q4_K: n * k // 2 + 2 * sub + 4 * supers,
            T.Q5_K: n * k + 2 * sub + 4 * supers,
            T.Q6_K: n * k + n * (k // 16) + 2 * supers}[qtype]
