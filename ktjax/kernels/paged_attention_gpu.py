"""Paged attention for CUDA programs: one Pallas kernel (Triton lowering) for every step.

The same kernel serves decode (one query per row), prefill chunks and steps that mix both,
GQA/MQA of any group size, sliding windows, soft-capping, MLA's latent cache and int8 pages:
paged_attention_ref.paged_attention's contract, read where the pages lie instead of gathered.

Work split: one program per (row, KV head, block of query rows, split of the context). The
query rows of a program are the (token, head) pairs of one KV group, so a page of keys is
read once for all the heads that share it (decode: the group's heads; prefill: several
tokens x heads), and the scores are one [rows, keys] matmul. A program folds its keys with
an online softmax: first its share of the cached pages (pages_per_block pages per step, via
the row's block table), then, in split 0 only, the step's own keys (k_new, causal). Splits
(flash-decoding) let one long sequence fill the GPU; their partial results (unnormalized
output, running max, sum) are combined in jnp afterwards.

int8 pages (kv_quant.Int8Pages): the key scale multiplies the score column and the value
scale the probability column, so the int8 rows are converted, never dequantized in memory.
MLA (`values_in_keys` = d): the latent cache is read once; the values are the keys' first d
dims. A key of d + rope dims (512 + 64) is read as two power-of-2 parts (Triton's blocks
must be powers of 2): the value dims, then the rope dims widened to the next power of 2 (at
least 16, what Triton's dot needs) by reading back into the value dims, where the query's
part holds zeros (DeepSeek's 512 + 64 reads nothing twice; a test model's 32 + 8 reads 8).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ktjax.errors import KernelError
from ktjax.kernels import kv_quant, pallas_triton

MASK = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite: fully masked blocks stay NaN-free
TARGET_PROGRAMS = 264                            # ~2 waves of an H100/H200's 132 SMs
MIN_BLOCK = 16                                   # Triton's dot needs every dim >= 16


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def key_parts(head_dim: int, values_in_keys: int | None) -> tuple[tuple[int, int], ...]:
    """(offset in the key, width) of the key's parts, each a power of 2: the whole key, or
    (MLA) the d value dims then the rest widened to a power of 2 >= 16 that ends at the key's
    end (its first columns overlap the value dims; the query's copy of them is zero)."""
    d = values_in_keys or head_dim
    rest = head_dim - d
    if rest == 0:
        return ((0, d),)
    w = max(_next_pow2(rest), MIN_BLOCK)
    return ((0, d), (head_dim - w, w))


def _query_parts(q: jax.Array, head_dim: int, values_in_keys: int | None) -> jax.Array:
    """q [..., head_dim] laid out as key_parts reads the key: widened parts zero-padded in
    front, so the overlapped key columns add nothing to the score."""
    parts = key_parts(head_dim, values_in_keys)
    if len(parts) == 1:
        return q
    (_, d), (_, w) = parts
    rest = q[..., d:]
    pad = jnp.zeros((*q.shape[:-1], w - rest.shape[-1]), q.dtype)
    return jnp.concatenate([q[..., :d], pad, rest], axis=-1)


@dataclass(frozen=True)
class Blocks:
    """One launch's tiling: query rows per program, pages per step of the context loop, new
    keys per step of the step's own loop, and Triton's warps and pipeline stages."""

    block_m: int
    pages_per_block: int
    block_new: int
    num_warps: int
    num_stages: int


def shared_memory_bytes(blocks: Blocks, *, page_size: int, head_dim: int, value_dim: int,
                        values_in_keys: int | None, kv_itemsize: int, new_itemsize: int,
                        compute_itemsize: int, int8: bool) -> int:
    """An upper estimate of the shared memory the Triton kernel asks for: each loop's loads
    are buffered num_stages deep (the context loop's K and V tiles, their int8 scales, the
    page ids; the step's own keys and values; the loops run one after the other, so Triton
    reuses one loop's buffers for the next), plus the query tile, the converted K/V tiles of
    int8 pages and the probabilities' layout change for the second dot. Checked against the
    first GPU run: head_dim 256, float32, 16 rows, 64 keys, 2 stages asked for 278528 bytes
    (two K+V stages and the query tile; this gives that plus the 4096-byte p tile)."""
    width = sum(w for _, w in key_parts(head_dim, values_in_keys))
    dv = 0 if values_in_keys is not None else value_dim
    block_k = blocks.pages_per_block * page_size
    context = block_k * (width + dv) * kv_itemsize + 4 * blocks.pages_per_block
    if int8:
        context += block_k * 4 * (1 if values_in_keys is not None else 2)
    new = blocks.block_new * (width + dv) * new_itemsize
    total = blocks.num_stages * max(context, new)
    total += blocks.block_m * width * compute_itemsize               # the query tile
    total += blocks.block_m * max(block_k, blocks.block_new) * 4     # p for the second dot
    if int8:
        total += block_k * (width + dv) * compute_itemsize           # int8 -> compute dtype
    return total


def default_blocks(rows: int, new_tokens: int, page_size: int, head_dim: int,
                   value_dim: int) -> Blocks:
    """The tiling measured best on the H100 for a shape, before the shared-memory fit."""
    block_m = min(_next_pow2(max(rows, MIN_BLOCK)),
                  64 if value_dim <= 128 else 32 if value_dim <= 256 else MIN_BLOCK)
    pages_per_block = max(1, (64 if head_dim <= 256 else 32) // page_size)
    block_new = min(_next_pow2(max(new_tokens, MIN_BLOCK)), 64)
    return Blocks(block_m, pages_per_block, block_new, num_warps=4, num_stages=2)


def fit_blocks(blocks: Blocks, limit: int, fixed: frozenset[str] = frozenset(),
               **shape) -> Blocks | None:
    """`blocks` shrunk until shared_memory_bytes(**shape) fits `limit`, leaving the fields
    named in `fixed` (the caller's knobs) alone: first fewer keys per step of either loop
    (down to 32, a page at least), then fewer stages (1: no pipelining, the last resort for
    speed), then fewer query rows and new keys, then single pages. None if nothing fits."""
    def fits(b: Blocks) -> bool:
        return shared_memory_bytes(b, **shape) <= limit

    page_size = shape["page_size"]
    steps = (("pages_per_block", lambda b: b.pages_per_block > 1
              and b.pages_per_block * page_size > 32),
             ("block_new", lambda b: b.block_new > 32),
             ("num_stages", lambda b: b.num_stages > 1),
             ("block_m", lambda b: b.block_m > MIN_BLOCK),
             ("block_new", lambda b: b.block_new > MIN_BLOCK),
             ("pages_per_block", lambda b: b.pages_per_block > 1))
    for field, can_shrink in steps:
        while not fits(blocks) and field not in fixed and can_shrink(blocks):
            value = getattr(blocks, field)
            blocks = replace(blocks, **{field: value - 1 if field == "num_stages"
                                        else value // 2})
    return blocks if fits(blocks) else None


def unsupported_reason(head_dim: int, value_dim: int, page_size: int,
                       values_in_keys: int | None, kv_itemsize: int = 4,
                       q_itemsize: int = 4) -> str | None:
    """Why this kernel cannot run a shape (Triton blocks are powers of 2; the smallest
    tiling must fit the GPU's shared memory), or None."""
    if not _pow2(page_size):
        return f"page size {page_size} is not a power of 2"
    if not _pow2(value_dim) or value_dim < MIN_BLOCK:
        return f"value dim {value_dim} is not a power of 2 >= {MIN_BLOCK}"
    if key_parts(head_dim, values_in_keys)[-1][0] < 0:
        return f"head dim {head_dim} is narrower than its widened rope part"
    smallest = Blocks(MIN_BLOCK, 1, MIN_BLOCK, num_warps=4, num_stages=1)
    need = shared_memory_bytes(smallest, page_size=page_size, head_dim=head_dim,
                               value_dim=value_dim, values_in_keys=values_in_keys,
                               kv_itemsize=kv_itemsize, new_itemsize=q_itemsize,
                               compute_itemsize=q_itemsize, int8=kv_itemsize == 1)
    limit = pallas_triton.shared_memory_limit()
    if need > limit:
        return (f"a page of {page_size} tokens x head dim {head_dim} needs {need} bytes of "
                f"shared memory, over this GPU's {limit}")
    return None


def _kernel(*refs, parts, page_size, pages_per_block, pages_per_layer, n_splits, rep,
            block_m, block_new, softcap, int8, mla, compute_dtype):
    it = iter(refs)
    q_ref, qpos_ref, knew_ref = next(it), next(it), next(it)
    vnew_ref = None if mla else next(it)
    kpos_ref, kc_ref = next(it), next(it)
    ks_ref = next(it) if int8 else None
    vc_ref = None if mla else next(it)
    vs_ref = next(it) if int8 and not mla else None
    tab_ref, len_ref, win_ref, layer_ref = next(it), next(it), next(it), next(it)
    o_ref, m_ref, l_ref = next(it), next(it), next(it)

    block_i, split = pl.program_id(2), pl.program_id(3)
    block_k = pages_per_block * page_size
    dv = o_ref.shape[-1]
    qp = qpos_ref[...]                                           # [bm] (-1: padding)
    q_offsets = [sum(w for _, w in parts[:i]) for i in range(len(parts))]
    q_parts = [q_ref[:, pl.ds(qo, w)] for qo, (_, w) in zip(q_offsets, parts)]  # [bm, w]
    cache_len, window = len_ref[0], win_ref[0]
    first_of_layer = layer_ref[0] * pages_per_layer      # the cache is [L * n_pages, ...]

    # float32 operands stay float32 (a GPU would otherwise round them to TF32)
    exact = jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    dot = functools.partial(pallas_triton.dot, precision=exact)

    def fold(carry, k_parts, v, kp, k_scale, v_scale):
        acc, m, l = carry
        s = dot(q_parts[0], k_parts[0].astype(compute_dtype), trans_b=True)
        for qx, kx in zip(q_parts[1:], k_parts[1:]):
            s += dot(qx, kx.astype(compute_dtype), trans_b=True)  # [bm, bk] float32
        if k_scale is not None:
            s = s * k_scale[None, :]
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        visible = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
        visible &= (window <= 0) | (qp[:, None] - kp[None, :] < window)
        s = jnp.where(visible, s, MASK)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1)
        if v_scale is not None:
            p = p * v_scale[None, :]
        acc = acc * correction[:, None] + dot(p.astype(compute_dtype), v.astype(compute_dtype))
        return acc, m_new, l

    # The cached context: skip pages wholly before every query's window, share the rest
    # between the splits in blocks of pages_per_block pages.
    earliest_q = jnp.min(jnp.where(qp >= 0, qp, jnp.int32(2 ** 30)))
    first_tok = jnp.where(window > 0, jnp.maximum(earliest_q - window + 1, 0), 0)
    first_page = jnp.minimum(first_tok, cache_len) // page_size
    n_blocks = pl.cdiv(pl.cdiv(cache_len, page_size) - first_page, pages_per_block)
    per_split = pl.cdiv(n_blocks, n_splits)
    blk_lo = split * per_split
    n_mine = jnp.maximum(jnp.minimum(n_blocks - blk_lo, per_split), 0)

    def context_block(i, carry):
        page0 = first_page + (blk_lo + i) * pages_per_block
        pages = tab_ref[pl.ds(page0, pages_per_block)] + first_of_layer   # [ppb]
        k_parts = [kc_ref[pages, :, pl.ds(off, w)].reshape(block_k, w) for off, w in parts]
        v = k_parts[0] if mla else vc_ref[pages].reshape(block_k, dv)
        kp = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
        kp = jnp.where(kp < cache_len, kp, -1)
        k_scale = ks_ref[pages].reshape(block_k) if int8 else None
        v_scale = (k_scale if mla else vs_ref[pages].reshape(block_k)) if int8 else None
        return fold(carry, k_parts, v, kp, k_scale, v_scale)

    carry = (jnp.zeros((block_m, dv), jnp.float32), jnp.full((block_m,), MASK, jnp.float32),
             jnp.zeros((block_m,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_mine, context_block, carry)

    # The step's own keys, causal: query row r is token r // rep, so this block of rows
    # needs the new keys up to its last token only. Split 0 does them.
    last_token = ((block_i + 1) * block_m - 1) // rep
    n_new = pl.cdiv(jnp.minimum(last_token + 1, knew_ref.shape[0]), block_new)
    n_new = jnp.where(split == 0, n_new, 0)

    def new_block(j, carry):
        rows = pl.ds(j * block_new, block_new)
        k_parts = [knew_ref[rows, pl.ds(off, w)] for off, w in parts]
        v = k_parts[0] if mla else vnew_ref[rows, :]
        return fold(carry, k_parts, v, kpos_ref[rows], None, None)

    acc, m, l = jax.lax.fori_loop(0, n_new, new_block, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def choose_blocks(rows: int, new_tokens: int, page_size: int, head_dim: int, value_dim: int,
                  values_in_keys: int | None, *, kv_dtype, new_dtype, compute_dtype,
                  limit: int | None = None, **knobs: int | None) -> Blocks:
    """The tiling of one call: default_blocks with the knobs given (not None) put in, the
    rest shrunk by fit_blocks to `limit` (default: the GPU's shared memory). A KernelError
    when even the smallest tiling the knobs allow does not fit."""
    given = {k: v for k, v in knobs.items() if v is not None}
    blocks = replace(default_blocks(rows, new_tokens, page_size, head_dim, value_dim),
                     **given)
    limit = pallas_triton.shared_memory_limit() if limit is None else limit
    shape = dict(page_size=page_size, head_dim=head_dim, value_dim=value_dim,
                 values_in_keys=values_in_keys, kv_itemsize=jnp.dtype(kv_dtype).itemsize,
                 new_itemsize=jnp.dtype(new_dtype).itemsize,
                 compute_itemsize=jnp.dtype(compute_dtype).itemsize,
                 int8=jnp.dtype(kv_dtype) == jnp.int8)
    fitted = fit_blocks(blocks, limit, frozenset(given), **shape)
    if fitted is None:
        raise KernelError(f"paged_attention_gpu: {blocks} needs "
                          f"{shared_memory_bytes(blocks, **shape)} bytes of shared memory, "
                          f"over this GPU's {limit}")
    return fitted


def _group_rows(x: jax.Array, n_kv: int, rows_pad: int) -> jax.Array:
    """[B, T, n_kv * rep, d] -> [B, n_kv, rows_pad, d], rows = (token, head of the group)."""
    b, t, h, d = x.shape
    x = x.reshape(b, t, n_kv, h // n_kv, d).transpose(0, 2, 1, 3, 4).reshape(b, n_kv, -1, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows_pad - x.shape[2]), (0, 0)))


def choose_splits(programs: int, max_blocks: int) -> int:
    """Context splits so that about TARGET_PROGRAMS programs run (at most one per block)."""
    return max(1, min(-(-TARGET_PROGRAMS // programs), max_blocks))


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array | None,
                    k_cache: kv_quant.KVPages, v_cache: kv_quant.KVPages, layer: jax.Array,
                    block_tables: jax.Array, cache_lens: jax.Array, q_positions: jax.Array, *,
                    scale: float,
                    sliding_window: jax.Array | int | None = None,
                    values_in_keys: int | None = None, logit_softcap: float | None = None,
                    n_splits: int | None = None, pages_per_block: int | None = None,
                    block_m: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """paged_attention_ref.paged_attention's contract as a Pallas kernel. The keyword-only
    tuning knobs default by shape, shrunk to fit the GPU's shared memory (choose_blocks);
    a knob given is kept, and a tiling over the limit is a KernelError. interpret defaults
    to True off a GPU."""
    b, t, h, hd = q.shape
    n_kv = k_new.shape[2]
    rep = h // n_kv
    mla = values_in_keys is not None
    int8 = kv_quant.is_int8(k_cache)
    n_layers, n_pages, page_size = k_cache.shape[:3]
    dv = values_in_keys if mla else v_cache.shape[-1]
    reason = unsupported_reason(hd, dv, page_size, values_in_keys)
    if reason:
        raise KernelError(f"paged_attention_gpu: {reason}")
    parts = key_parts(hd, values_in_keys)
    if interpret is None:
        interpret = pallas_triton.interpret_default()

    cache_dtype = jnp.float32 if int8 else k_cache.dtype
    compute_dtype = jnp.promote_types(q.dtype, cache_dtype) if not int8 else q.dtype
    if compute_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        compute_dtype = jnp.float32

    # Query rows: (token, head) pairs of a KV group, padded to whole blocks.
    rows = t * rep
    blocks = choose_blocks(rows, t, page_size, hd, dv, values_in_keys, kv_dtype=k_cache.dtype,
                           new_dtype=compute_dtype, compute_dtype=compute_dtype,
                           block_m=block_m, pages_per_block=pages_per_block,
                           num_warps=num_warps, num_stages=num_stages)
    block_m, pages_per_block, block_new = blocks.block_m, blocks.pages_per_block, \
        blocks.block_new
    n_mblocks = -(-rows // block_m)
    rows_pad = n_mblocks * block_m
    qg = _query_parts((q.astype(jnp.float32) * scale).astype(compute_dtype), hd, values_in_keys)
    qg = _group_rows(qg, n_kv, rows_pad)
    q_positions = q_positions.astype(jnp.int32)
    qpos = jnp.repeat(q_positions, rep, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, rows_pad - rows)), constant_values=-1)

    # The step's keys, padded to whole blocks (position -1: nothing sees them).
    t_pad = -(-t // block_new) * block_new
    pad_t = ((0, 0), (0, 0), (0, t_pad - t), (0, 0))
    knew = jnp.pad(k_new.astype(compute_dtype).transpose(0, 2, 1, 3), pad_t)
    kpos = jnp.pad(q_positions, ((0, 0), (0, t_pad - t)), constant_values=-1)

    # The cache as [L * n_pages, page_size, n_kv, d]: a layer's page p is page
    # layer * n_pages + p (added in the kernel), so no layer is sliced out and the padded
    # tables stay the same for every layer (XLA hoists them out of the layer loop).
    p_max = block_tables.shape[1]
    max_blocks = -(-p_max // pages_per_block)
    # Padded with the scratch page (0), so a block may run past the table's end.
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, (max_blocks + 1) * pages_per_block - p_max)))
    if n_splits is None:
        n_splits = choose_splits(b * n_kv * n_mblocks, max_blocks)
    window = jnp.reshape(jnp.asarray(0 if sliding_window is None else sliding_window,
                                     jnp.int32), (1,))

    def flat(x):
        return x.reshape(n_layers * n_pages, *x.shape[2:])

    row = lambda bi, g, mi, s: (bi, 0)                                      # noqa: E731
    grid = (b, n_kv, n_mblocks, n_splits)
    inputs = [qg, qpos, knew]
    specs = [pl.BlockSpec((None, None, block_m, qg.shape[-1]),
                          lambda bi, g, mi, s: (bi, g, mi, 0)),
             pl.BlockSpec((None, block_m), lambda bi, g, mi, s: (bi, mi)),
             pl.BlockSpec((None, None, t_pad, hd), lambda bi, g, mi, s: (bi, g, 0, 0))]
    if not mla:
        inputs.append(jnp.pad(v_new.astype(compute_dtype).transpose(0, 2, 1, 3), pad_t))
        specs.append(pl.BlockSpec((None, None, t_pad, dv), lambda bi, g, mi, s: (bi, g, 0, 0)))
    inputs.append(kpos)
    specs.append(pl.BlockSpec((None, t_pad), row))
    lp = n_layers * n_pages
    page_spec = lambda d: pl.BlockSpec((lp, page_size, None, d),              # noqa: E731
                                       lambda bi, g, mi, s: (0, 0, g, 0))
    scale_spec = pl.BlockSpec((lp, page_size, None), lambda bi, g, mi, s: (0, 0, g))
    for cache, d in ((k_cache, hd),) if mla else ((k_cache, hd), (v_cache, dv)):
        if int8:
            inputs += [flat(cache.values), flat(cache.scales)]
            specs += [page_spec(d), scale_spec]
        else:
            inputs.append(flat(cache))
            specs.append(page_spec(d))
    inputs += [tables, cache_lens.astype(jnp.int32), window,
               jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))]
    specs += [pl.BlockSpec((None, tables.shape[1]), row),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (bi,)),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (0,)),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (0,))]

    kernel = functools.partial(
        _kernel, parts=parts, page_size=page_size, pages_per_block=pages_per_block,
        pages_per_layer=n_pages, n_splits=n_splits, rep=rep, block_m=block_m,
        block_new=block_new,
        softcap=logit_softcap, int8=int8, mla=mla, compute_dtype=compute_dtype)
    part_shape = (n_splits, b, n_kv, rows_pad)
    out_block = lambda bi, g, mi, s: (s, bi, g, mi)                         # noqa: E731
    o, m, l = pl.pallas_call(
        kernel, grid=grid, in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, block_m, dv),
                                lambda bi, g, mi, s: (s, bi, g, mi, 0)),
                   pl.BlockSpec((None, None, None, block_m), out_block),
                   pl.BlockSpec((None, None, None, block_m), out_block)],
        out_shape=[jax.ShapeDtypeStruct((*part_shape, dv), jnp.float32),
                   jax.ShapeDtypeStruct(part_shape, jnp.float32),
                   jax.ShapeDtypeStruct(part_shape, jnp.float32)],
        compiler_params=pallas_triton.compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name=f"paged_attention_m{block_m}_p{pages_per_block}",
    )(*inputs)
    return _combine(o, m, l, t, rep).astype(q.dtype)


def _combine(o: jax.Array, m: jax.Array, l: jax.Array, t: int, rep: int) -> jax.Array:
    """Splits' partial results [S, B, n_kv, rows, dv] -> the output [B, T, H, dv]; a row
    that saw no key (padding) comes out zero."""
    m_max = m.max(axis=0)
    weight = jnp.exp(m - m_max[None])
    total = (l * weight).sum(axis=0)
    out = (o * weight[..., None]).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    b, n_kv, _, dv = out.shape
    out = out[:, :, :t * rep].reshape(b, n_kv, t, rep, dv).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n_kv * rep, dv)


def kv_read_bytes(n_tokens: int, n_kv: int, head_dim: int, value_dim: int,
                  kv_dtype: str) -> int:
    """Bytes of one layer's context a decode step reads for a row of n_tokens cached."""
    per = kv_quant.bytes_per_token_head(head_dim, kv_dtype) + \
        kv_quant.bytes_per_token_head(value_dim, kv_dtype)
    return n_tokens * n_kv * per

