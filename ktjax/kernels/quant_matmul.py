"""Decode GEMV over a QuantMatrix as a Pallas kernel (Triton lowering): y [M, N] = x [M, K] .
W.T for few rows M (<= 64), reading each weight's codes once and dequantizing in registers;
from 16 rows the tiles go through Triton's dot (tensor cores), below that plain FMA.

The oracle is ktjax.device_quant.linear / dequantize (jnp); tests run this kernel in
interpret mode against it. Each program owns `block_rows` weight rows (block_rows_for) and
walks K one code group at a time (4-bit: one chunk of 2h values, low and high nibbles as two
[rows, h] tiles, so no tile is reshaped or concatenated), `unroll` groups per loop step.
Tiles are powers of two, as Triton needs: the engine's row buckets are, and N must divide
by 8.

device_quant.linear uses it on a GPU for 2 to 64 rows, where it measured faster than XLA's
forms (one row: XLA's reduction; KTJAX_QUANT_KERNEL overrides; docs/kernel-notes.md).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ktjax.device_quant import ARRAY_FIELDS, QuantMatrix

warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

_FIELDS = ARRAY_FIELDS[1:]          # the scales and mins a value may need
SUPPORTED_ROWS = (1, 2, 4, 8, 16, 32, 64)
# From this many rows the tiles multiply on the tensor cores (Triton dot needs M >= 16);
# below, FMA math (decode is bandwidth-bound, and wgmma would waste most of its M).
DOT_ROWS = 16


def block_rows_for(n: int) -> int:
    """Weight rows per program: 32, or fewer so a matrix of few rows still gives the GPU's
    SMs a few programs each (>= 256 programs where N allows); 0 if 8 does not divide N."""
    for b in (32, 16, 8):
        if n % b == 0 and (n // b >= 256 or b == 8):
            return b
    return 0


def supported(qm: QuantMatrix, rows: int, block_rows: int | None = None) -> bool:
    """Whether the kernel takes this matrix (one layer: 2-D codes) and row count."""
    n = qm.shape[-2]
    block_rows = block_rows or block_rows_for(n)
    return qm.codes.ndim == 2 and rows in SUPPORTED_ROWS and block_rows > 0 and \
        n % block_rows == 0


def _kernel(x_ref, codes_ref, *refs, present, qm_static, block_rows, unroll, k):
    out_ref = refs[-1]
    fields = dict(zip(present, refs[:-1]))
    bits, half, group, scale_group, offset = qm_static
    i = pl.program_id(0)
    rows = pl.ds(i * block_rows, block_rows)
    m = x_ref.shape[0]

    def col(ref, idx):
        return ref[rows, pl.ds(idx, 1)].astype(jnp.float32)          # [block_rows, 1]

    def terms(g):
        """(S, Mn, bias) of group g for this program's rows, each [block_rows, 1]."""
        sg = jax.lax.div(g * group, scale_group)     # traced ints: plain division lowers
        s = col(fields["scale"], sg)
        if "sub_scale" in fields:
            s = s * col(fields["sub_scale"], g)
        mn = None
        if "min_scale" in fields:
            mn = col(fields["min_scale"], sg) * col(fields["sub_min"], g)
        b = col(fields["bias"], g) if "bias" in fields else None
        return s, mn, b

    def values(q, g):
        s, mn, b = terms(g)
        w = s * (q - offset if offset else q)
        if mn is not None:
            w = w - mn
        if b is not None:
            w = w + b
        return w

    def dot_rows(w, xs):          # [block_rows, t] . [m, t] -> [m, block_rows]
        if m >= DOT_ROWS:
            dt = x_ref.dtype         # bf16 activations: bf16 tiles; float32: full precision
            return pl_triton.dot(xs.astype(dt), w.astype(dt), trans_b=True,
                                 precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(w[None, :, :] * xs[:, None, :], axis=-1)

    if bits == 4:
        step = 2 * half                       # values per chunk

        def chunk(c, acc):
            codes = codes_ref[rows, pl.ds(c * half, half)]
            lo = (codes & 15).astype(jnp.float32)
            hi = (codes >> 4).astype(jnp.float32)
            x_lo = x_ref[:, pl.ds(c * step, half)].astype(jnp.float32)
            x_hi = x_ref[:, pl.ds(c * step + half, half)].astype(jnp.float32)
            acc = acc + dot_rows(values(lo, jax.lax.div(c * step, group)), x_lo)
            return acc + dot_rows(values(hi, jax.lax.div(c * step + half, group)), x_hi)
    else:
        step = group

        def chunk(c, acc):
            q = codes_ref[rows, pl.ds(c * group, group)].astype(jnp.float32)
            return acc + dot_rows(values(q, c), x_ref[:, pl.ds(c * group, group)]
                                  .astype(jnp.float32))

    def body(j, acc):
        for u in range(unroll):
            acc = chunk(j * unroll + u, acc)
        return acc

    acc = jax.lax.fori_loop(0, k // step // unroll, body,
                            jnp.zeros((m, block_rows), jnp.float32))
    out_ref[:, rows] = acc


@functools.partial(jax.jit, static_argnames=("block_rows", "unroll", "interpret"))
def gemv(qm: QuantMatrix, x: jax.Array, block_rows: int | None = None, unroll: int = 2,
         interpret: bool = False) -> jax.Array:
    """y [M, N] float32 = x [M, K] . W.T for one layer's QuantMatrix (2-D codes);
    block_rows None: block_rows_for(N)."""
    m, k = x.shape
    n = qm.shape[-2]
    block_rows = block_rows or block_rows_for(n)
    step = 2 * qm.half if qm.bits == 4 else qm.group
    while unroll > 1 and (k // step) % unroll:
        unroll //= 2
    present = [f for f in _FIELDS if getattr(qm, f) is not None]
    kernel = functools.partial(
        _kernel, present=tuple(present), block_rows=block_rows, unroll=unroll, k=k,
        qm_static=(qm.bits, qm.half, qm.group, qm.scale_group, qm.offset))
    extra = {}
    if not interpret:
        extra["compiler_params"] = pl_triton.CompilerParams(num_warps=4, num_stages=3)
    return pl.pallas_call(
        kernel, grid=(n // block_rows,),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        interpret=interpret, **extra,
    )(x, qm.codes, *(getattr(qm, f) for f in present))
