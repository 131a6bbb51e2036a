"""GEMV over a QuantMatrix as a Pallas kernel (Triton lowering): y [M, N] = x [M, K] . W.T for
few rows M (1 to 64), reading each weight's codes once and dequantizing in registers.

The oracle is ktjax.device_quant.linear / dequantize (jnp); tests run this kernel in
interpret mode against it. Each program owns `block_rows` weight rows and walks K in wide
tiles (GemvTuning.values values: several code groups per load, so a load moves kilobytes,
not one group's 16 bytes). The codes are viewed as [N, units, width]: a unit is one code
group (8-bit) or one chunk of 2h values (4-bit: byte j holds value j in its low nibble and value
h + j in its high one, so the two nibbles are two "parts" of the unit, each with its own x
slice and, for Q4_K, its own group). Below DOT_ROWS rows the math is FMA in "dot first"
form, sum_j w_j x_j = S * sum_j q_j x_j + (bias - Mn) * sum_j x_j per group, so the only
per-value work is the code's conversion and one FMA; from DOT_ROWS rows the dequantized
tiles go through Triton's dot (tensor cores; wgmma needs the rows).

Codes become floats by the exponent trick (0x4B000000 | q is 2^23 + q as float32; one
integer OR and one float subtract, exact) instead of an int-to-float conversion, which runs
at a quarter of the FMA rate on Hopper and would bound a 4-bit GEMV below HBM speed.

Tiles are powers of two, as Triton needs. `GemvTuning` holds the launch shape;
KTJAX_QUANT_GEMV overrides it (e.g. "rows=16,values=1024,warps=4") for measurements.
device_quant.linear routes rows here where KTJAX_QUANT_KERNEL says (docs/kernel-notes.md).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ktjax.device_quant import QuantMatrix
from ktjax.kernels import pallas_triton

SUPPORTED_ROWS = (1, 2, 4, 8, 16, 32, 64)
# From this many rows the tiles multiply on the tensor cores (Triton dot needs M >= 16);
# below, FMA math (decode is bandwidth-bound, and wgmma would waste most of its M).
DOT_ROWS = 16
_MAGIC = 0x4B000000            # float32 bits of 2^23: OR a code < 2^23 into the mantissa
_MAGIC_F = float(1 << 23)


@dataclasses.dataclass(frozen=True)
class GemvTuning:
    """Launch shape: weight rows per program (0: block_rows_for), values of K per loop step
    (the largest power-of-two tile up to this that divides K; tensor-core rows: also within
    dot_values), Triton warps / stages."""
    rows: int = 0
    values: int = 512
    warps: int = 4
    stages: int = 2
    magic: bool = True     # the exponent trick (False: plain int-to-float conversion)


def tuning_from_env() -> GemvTuning:
    """GemvTuning with KTJAX_QUANT_GEMV's "key=value,..." overrides (keys: the fields)."""
    spec = os.environ.get("KTJAX_QUANT_GEMV", "").strip()
    if not spec:
        return GemvTuning()
    fields = {f.name: f.type for f in dataclasses.fields(GemvTuning)}
    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"KTJAX_QUANT_GEMV: expected key=integer with keys "
                             f"{', '.join(fields)}; got {item!r}")
        values[key] = bool(int(value)) if key == "magic" else int(value)
    return GemvTuning(**values)


def block_rows_for(n: int, rows: int = 1) -> int:
    """Weight rows per program (0: none divides N). FMA rows: 8, so a [8, 512] float32 tile
    is 32 registers a thread at 4 warps and a matrix gives many programs; tensor-core rows:
    32 where N still gives >= 128 programs, else 16 (a Triton dot needs N >= 16)."""
    if rows < DOT_ROWS:
        return 8 if n % 8 == 0 else 0
    for b in (32, 16):
        if n % b == 0 and (n // b >= 128 or b == 16):
            return b
    return 0


def dot_values(rows: int, block_rows: int, x_bytes: int, stages: int) -> int:
    """Values of K per loop step that keep a tensor-core tile's shared memory within half of
    the GPU's: Triton stages x's [rows, values] tile per pipeline stage and converts the
    dequantized [block_rows, values] tile to the dot's layout there (a 1024-value tile at
    64 rows asked 345 KB of the H100's 227 KB; 7 Dec)."""
    per_value = (max(stages, 1) * rows + block_rows) * x_bytes
    v = 16
    while 2 * v * per_value <= pallas_triton.shared_memory_limit() // 2:
        v *= 2
    return v


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the kernel views one QuantMatrix layout (all static)."""
    parts: int          # code parts per unit: 2 nibbles (4-bit) or 1 (8-bit)
    width: int          # values of one part = codes per unit row (h, or the group)
    per_part_groups: int  # groups per unit in the per-group fields: 2 (Q4_K) or 1
    units_per_scale: int  # units per scale group (d / dmin / int8 scale)
    offset: int

    @property
    def unit(self) -> int:
        return self.parts * self.width


def _layout(qm: QuantMatrix) -> _Layout | None:
    if qm.bits == 4:
        h = qm.half
        if qm.group not in (h, 2 * h):
            return None
        lay = _Layout(2, h, 2 if qm.group == h else 1, 0, qm.offset)
    else:
        lay = _Layout(1, qm.group, 1, 0, qm.offset)
    if qm.scale_group % lay.unit or not _pow2(lay.width):
        return None
    return dataclasses.replace(lay, units_per_scale=qm.scale_group // lay.unit)


def tile_units(units: int, unit: int, values: int) -> int:
    """Units per loop step: the largest power of two <= values / unit that divides units."""
    t = 1
    while t * 2 * unit <= values and units % (t * 2) == 0:
        t *= 2
    return t


def supported(qm: QuantMatrix, rows: int, block_rows: int | None = None) -> bool:
    """Whether the kernel takes this matrix (one layer: 2-D codes, or a stack with its layer
    bound) and row count."""
    n = qm.shape[-2]
    block_rows = block_rows or block_rows_for(n, rows)
    lay = _layout(qm)
    return qm.codes.ndim == (2 if qm.layer is None else 3) and rows in SUPPORTED_ROWS and \
        block_rows > 0 and _pow2(block_rows) and n % block_rows == 0 and lay is not None and \
        (rows < DOT_ROWS or block_rows >= 16)


def _codes_to_float(c: jax.Array, bits: int, offset: int, magic: bool) -> jax.Array:
    """uint8 nibbles (0..15) or int8 codes -> float32 q - offset, exactly."""
    if not magic:
        q = c.astype(jnp.float32)
        return q - offset if offset else q
    if bits == 4:     # c in 0..15
        f = jax.lax.bitcast_convert_type(c.astype(jnp.int32) | _MAGIC, jnp.float32)
        return f - (_MAGIC_F + offset)
    f = jax.lax.bitcast_convert_type(c.astype(jnp.int32) + (_MAGIC + 128), jnp.float32)
    return f - (_MAGIC_F + 128 + offset)     # int8: shifted to 0..255 first


def _kernel(layer_ref, x_ref, codes_ref, *refs, present, lay: _Layout, bits: int, block_rows: int,
            tile: int, n_tiles: int, magic: bool, gathered: bool):
    out_ref = refs[-1]
    f = dict(zip(present, refs[:-1]))
    r = block_rows
    rows = pl.ds(pl.program_id(0) * r, r)
    if gathered:      # one x row a program, times its own matrix of the stack
        x_rows = [pl.program_id(1)]
        layer = layer_ref[x_rows[0]]
    else:             # every x row times one matrix of the stack
        x_rows = list(range(x_ref.shape[0]))
        layer = layer_ref[0]               # the weights' arrays are [L, N, ...]
    m = len(x_rows)

    def per_scale(ref, t):                 # d / dmin / scale of each unit of tile t: [R, T]
        ups = lay.units_per_scale
        if tile >= ups:
            n_s = tile // ups
            a = ref[layer, rows, pl.ds(t * n_s, n_s)].astype(jnp.float32)
            return a if ups == 1 else \
                jnp.broadcast_to(a[:, :, None], (r, n_s, ups)).reshape(r, tile)
        a = ref[layer, rows, pl.ds(jax.lax.div(t * tile, ups), 1)].astype(jnp.float32)
        return jnp.broadcast_to(a, (r, tile))

    def per_group(ref, t, p):              # sub-scale / sub-min / bias of part p: [R, T]
        if lay.per_part_groups == 1:
            return ref[layer, rows, pl.ds(t * tile, tile)].astype(jnp.float32)
        return ref[layer, rows, pl.ds(t * tile, tile), p].astype(jnp.float32)

    def terms(t, p):
        """(S, C) of part p's groups in tile t, each [R, T]: value = S * q + C."""
        s = per_scale(f["scale"], t)
        if "sub_scale" in f:
            s = s * per_group(f["sub_scale"], t, p)
        c = None
        if "min_scale" in f:
            c = -(per_scale(f["min_scale"], t) * per_group(f["sub_min"], t, p))
        if "bias" in f:
            b = per_group(f["bias"], t, p)
            c = b if c is None else c + b
        return s, c

    def part_codes(raw, p):                # [R, T, width] float32 q - offset
        if bits == 4:
            raw = raw & 15 if p == 0 else raw >> 4
        return _codes_to_float(raw, bits, lay.offset, magic)

    def x_part(t, p, row):                 # [T, width] (row int) or [M, T, width] (row None)
        cols = pl.ds(p * lay.width, lay.width)
        idx = (slice(None) if row is None else row, pl.ds(t * tile, tile), cols)
        return x_ref[idx].astype(jnp.float32)

    def step(t, acc):
        raw = codes_ref[layer, rows, pl.ds(t * tile, tile), :]    # both nibbles: one load
        for p in range(lay.parts):
            q = part_codes(raw, p)
            s, c = terms(t, p)
            if m >= DOT_ROWS:
                w = s[:, :, None] * q
                if c is not None:
                    w = w + c[:, :, None]
                dt = x_ref.dtype    # bf16 activations: bf16 tiles; float32: full precision
                xs = x_part(t, p, None).reshape(m, tile * lay.width).astype(dt)
                acc = acc + pallas_triton.dot(xs, w.reshape(r, tile * lay.width).astype(dt),
                                              trans_b=True,
                                              precision=jax.lax.Precision.HIGHEST)
                continue
            for i, row in enumerate(x_rows):
                xm = x_part(t, p, row)
                term = s * jnp.sum(q * xm[None], axis=-1)              # [R, T]
                if c is not None:
                    term = term + c * jnp.sum(xm, axis=-1)[None, :]
                part = jnp.sum(term, axis=-1)[None, :]                 # [1, R]
                if m > 1:
                    part = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (m, r), 0) == i,
                                     part, 0.0)
                acc = acc + part
        return acc

    acc = jax.lax.fori_loop(0, n_tiles, step, jnp.zeros((m, r), jnp.float32))
    out_ref[pl.ds(x_rows[0], 1) if gathered else slice(None), rows] = acc


def _views(qm: QuantMatrix, lay: _Layout, present: list[str]) -> list[jax.Array]:
    """The codes as [L, N, units, width] and the fields as [L, N, units(, 2)] (L = 1 for
    one layer): reshapes of contiguous arrays, so XLA makes no copy."""
    *_, n, k = qm.shape
    units = k // lay.unit
    out = [qm.codes.reshape(-1, n, units, lay.width)]
    for name in present:
        a = getattr(qm, name)
        if name in ("sub_scale", "sub_min", "bias") and lay.per_part_groups == 2:
            a = a.reshape(-1, n, units, 2)
        out.append(a.reshape(-1, *a.shape[-2:]) if a.ndim < 4 else a)
    return out


def gemv(qm: QuantMatrix, x: jax.Array, block_rows: int | None = None,
         tuning: GemvTuning | None = None, interpret: bool = False) -> jax.Array:
    """y [M, N] float32 = x [M, K] . W.T for one layer's QuantMatrix (2-D codes, or stacked
    with its layer bound); launch shape from `tuning` (default: tuning_from_env(), read
    here, outside the jit's cache), block_rows overriding its rows."""
    return _gemv(qm, x, None, block_rows, tuning or tuning_from_env(), interpret)


def gathered_gemv(qm: QuantMatrix, index: jax.Array, x: jax.Array,
                  tuning: GemvTuning | None = None, interpret: bool = False) -> jax.Array:
    """y [P, N] float32, y[p] = x[p] . W[index[p]].T over a stack of matrices [S, N, K]
    (MoE decode: each (token, expert) pair's row times its expert's matrix of a pool), every
    row's matrix read in place; FMA math at any P <= 64 (one row a program)."""
    return _gemv(qm, x, index.astype(jnp.int32), None, tuning or tuning_from_env(), interpret)


def gathered_supported(qm: QuantMatrix, pairs: int) -> bool:
    """Whether gathered_gemv takes this stack ([S, N, K] codes, no layer bound) and pairs."""
    n = qm.shape[-2]
    return qm.codes.ndim == 3 and qm.layer is None and 0 < pairs <= 64 and \
        block_rows_for(n) > 0 and _layout(qm) is not None


@functools.partial(jax.jit, static_argnames=("block_rows", "tuning", "interpret"))
def _gemv(qm: QuantMatrix, x: jax.Array, index: jax.Array | None, block_rows: int | None,
          tuning: GemvTuning, interpret: bool) -> jax.Array:
    m, k = x.shape
    *_, n, _ = qm.shape
    lay = _layout(qm)
    gathered = index is not None
    math_rows = 1 if gathered else m       # x rows one program multiplies
    block_rows = block_rows or tuning.rows or block_rows_for(n, math_rows)
    ok = gathered_supported(qm, m) if gathered else supported(qm, m, block_rows)
    if lay is None or not ok:
        raise ValueError(f"the Pallas GEMV takes no {qm.bits}-bit group {qm.group} matrix "
                         f"[{n}, {k}] with {m} rows and {block_rows} rows per program")
    units = k // lay.unit
    values = tuning.values if math_rows < DOT_ROWS else \
        min(tuning.values, dot_values(m, block_rows, x.dtype.itemsize, tuning.stages))
    tile = tile_units(units, lay.unit, values)
    present = [name for name in ("scale", "sub_scale", "min_scale", "sub_min", "bias")
               if getattr(qm, name) is not None]
    kernel = functools.partial(
        _kernel, present=tuple(present), lay=lay, bits=qm.bits, block_rows=block_rows,
        tile=tile, n_tiles=units // tile, magic=tuning.magic, gathered=gathered)
    extra = {} if interpret else \
        {"compiler_params": pallas_triton.compiler_params(tuning.warps, tuning.stages)}
    layers = index if gathered else \
        jnp.reshape(0 if qm.layer is None else qm.layer, (1,)).astype(jnp.int32)
    return pl.pallas_call(
        kernel, grid=(n // block_rows, m) if gathered else (n // block_rows,),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        interpret=interpret, **extra,
    )(layers, x.reshape(m, units, lay.unit), *_views(qm, lay, present))
