"""Paged attention for CUDA programs: one Pallas kernel (Triton lowering) for every step.

The same kernel serves decode (one query per row), prefill chunks and steps that mix both,
GQA/MQA of any group size, sliding windows, soft-capping, gpt-oss's sinks, MLA's latent cache
and int8 pages: paged_attention_ref.paged_attention's contract, read where the pages lie
instead of gathered. Every operand is read where it lies and the output written in place
(a pad or transpose around the kernel would be one more launch per layer).

Work split: one program per (row, KV head, block of query rows, split of the context). The
query rows of a program are the (token, head) pairs of one KV group, so a page of keys is
read once for all the heads that share it (decode: the group's heads; prefill: several
tokens x heads), and the scores are one [rows, keys] matmul. A program folds its keys with
an online softmax: first its share of the cached pages (pages_per_block pages per step, via
the row's block table), then, in split 0 only, the step's own keys (k_new, causal). Splits
(flash-decoding) let one long sequence fill the GPU; their partial results (unnormalized
output, running max, sum) are merged by a second small kernel (_combine_kernel). Tiles are
sized by choose_blocks to fit the GPU's shared memory (shared_memory_bytes estimates it).

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
    tiling must fit the GPU's shared memory: kv_itemsize of the pages, q_itemsize of the
    queries and step keys as computed, the wider of q's and the pages'), or None."""
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


class _Rows:
    """A program's query rows r = (token r // rep, head g * rep + r % rep of KV group g):
    where they lie in q viewed as [T * H, d] (clamped into the step for padding rows) and
    which are real."""

    def __init__(self, first: jax.Array, n: int, g: jax.Array, rep: int, t: int,
                 n_heads: int):
        r = first + jnp.arange(n, dtype=jnp.int32)
        tok = r // rep
        self.valid = tok < t                                      # [n]
        self.token = jnp.minimum(tok, t - 1)
        self.head = g * rep + r % rep
        self.flat = self.token * n_heads + self.head              # row of [T * H, d]


def _kernel(*refs, parts, page_size, blocks, pages_per_layer, n_splits, rep, t, n_heads,
            scale, softcap, int8, mla, sinks, final, key_rows, compute_dtype):
    it = iter(refs)
    q_ref, qpos_ref, knew_ref = next(it), next(it), next(it)
    vnew_ref = None if mla else next(it)
    kc_ref = next(it)
    ks_ref = next(it) if int8 else None
    vc_ref = None if mla else next(it)
    vs_ref = next(it) if int8 and not mla else None
    tab_ref, len_ref, win_ref, layer_ref = next(it), next(it), next(it), next(it)
    sink_ref = next(it) if sinks else None
    outs = list(it)       # final: [out]; else the split's partials [o, m, l]

    g, block_i, split = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    block_m, ppb, block_new = blocks.block_m, blocks.pages_per_block, blocks.block_new
    block_k = ppb * page_size
    dv = outs[0].shape[-1]
    d_values = parts[0][1]
    rows = _Rows(block_i * block_m, block_m, g, rep, t, n_heads)
    qp = jnp.where(rows.valid, qpos_ref[rows.token], -1)          # [bm] (-1: padding)
    q_parts = []
    for i, (off, w) in enumerate(parts):        # q read in place: [T * H, head_dim]
        x = (q_ref[rows.flat, pl.ds(off, w)].astype(jnp.float32) * scale)
        if i:   # a widened rope part: its columns inside the value dims count once, in part 0
            x = jnp.where((off + jnp.arange(w))[None, :] >= d_values, x, 0.0)
        q_parts.append(x.astype(compute_dtype))
    cache_len, window = len_ref[0], win_ref[0]
    first_of_layer = layer_ref[0] * pages_per_layer      # the cache is [L * n_pages, ...]
    n_table = tab_ref.shape[0]

    # float32 operands stay float32 (a GPU would otherwise round them to TF32)
    exact = jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    dot = functools.partial(pallas_triton.dot, precision=exact)

    def fold(carry, k_parts, v, kp, k_scale, v_scale):
        acc, m, l = carry
        s = dot(q_parts[0], k_parts[0].astype(compute_dtype), trans_b=True)
        for qx, kx in zip(q_parts[1:], k_parts[1:]):
            s += dot(qx, kx.astype(compute_dtype), trans_b=True)  # [bm, bk] float32
        if k_scale is not None:       # int8 keys: one multiply per score, not per element
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
        if v_scale is not None:       # int8 values: the scale folded into p before the dot
            p = p * v_scale[None, :]
        acc = acc * correction[:, None] + dot(p.astype(compute_dtype), v.astype(compute_dtype))
        return acc, m_new, l

    # The cached context: skip pages wholly before every query's window, share the rest
    # between the splits in blocks of ppb pages.
    earliest_q = jnp.min(jnp.where(qp >= 0, qp, jnp.int32(2 ** 30)))
    first_tok = jnp.where(window > 0, jnp.maximum(earliest_q - window + 1, 0), 0)
    first_page = jnp.minimum(first_tok, cache_len) // page_size
    n_blocks = pl.cdiv(pl.cdiv(cache_len, page_size) - first_page, ppb)
    per_split = pl.cdiv(n_blocks, n_splits)
    blk_lo = split * per_split
    n_mine = jnp.maximum(jnp.minimum(n_blocks - blk_lo, per_split), 0)

    def context_block(i, carry):
        page0 = first_page + (blk_lo + i) * ppb
        # table entries past the table's end (a last partial block) read its last entry:
        # their keys lie past cache_len, so they are masked
        if key_rows:   # a page id per key: [block_k, w] loads, no reshape of the tile
            key = jnp.arange(block_k, dtype=jnp.int32)
            entry = jnp.minimum(page0 + key // page_size, n_table - 1)
            at = (tab_ref[entry] + first_of_layer, key % page_size)          # [bk] each
        else:          # [ppb, page_size, w] loads reshaped to [block_k, w]
            entry = jnp.minimum(page0 + jnp.arange(ppb, dtype=jnp.int32), n_table - 1)
            at = (tab_ref[entry] + first_of_layer,)                          # [ppb]

        def tile(ref, *cols):     # the block's keys of ref, [block_k, *cols]
            if key_rows:
                return ref[(*at, *cols)]
            x = ref[(*at, slice(None), *cols)]
            return x.reshape(block_k, *x.shape[2:])
        k_parts = [tile(kc_ref, pl.ds(off, w)) for off, w in parts]
        v = k_parts[0] if mla else tile(vc_ref, slice(None))
        kp = page0 * page_size + jnp.arange(block_k, dtype=jnp.int32)
        kp = jnp.where(kp < cache_len, kp, -1)
        k_scale = tile(ks_ref) if int8 else None
        v_scale = (k_scale if mla else tile(vs_ref)) if int8 else None
        return fold(carry, k_parts, v, kp, k_scale, v_scale)

    # A sink (gpt-oss) is a learned logit per head that every query sees and that carries no
    # value: the running max starts at it and the sum at exp(sink - sink) = 1; split 0
    # holds it, so the combine counts it once.
    m0 = jnp.full((block_m,), MASK, jnp.float32)
    l0 = jnp.zeros((block_m,), jnp.float32)
    if sinks:
        sink = sink_ref[rows.head].astype(jnp.float32)
        m0 = jnp.where(split == 0, sink, m0)
        l0 = jnp.where(split == 0, 1.0, l0)
    carry = (jnp.zeros((block_m, dv), jnp.float32), m0, l0)
    carry = jax.lax.fori_loop(0, n_mine, context_block, carry)

    # The step's own keys, read in place ([T, d] of this KV head), causal: this block of
    # rows needs them up to its last token only. Split 0 does them.
    last_token = ((block_i + 1) * block_m - 1) // rep
    n_new = pl.cdiv(jnp.minimum(last_token + 1, t), block_new)
    n_new = jnp.where(split == 0, n_new, 0)

    def new_block(j, carry):
        idx = j * block_new + jnp.arange(block_new, dtype=jnp.int32)
        tok = jnp.minimum(idx, t - 1)                  # past the step: a repeat, masked
        k_parts = [knew_ref[tok, pl.ds(off, w)] for off, w in parts]
        v = k_parts[0] if mla else vnew_ref[tok, :]
        kp = jnp.where(idx < t, qpos_ref[tok], -1)
        return fold(carry, k_parts, v, kp, None, None)

    acc, m, l = jax.lax.fori_loop(0, n_new, new_block, carry)
    if final:             # one split: normalized, straight into [T * H, dv]
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        _store_rows(outs[0], rows, out, 0)
        return
    o_ref, m_ref, l_ref = outs
    real = jnp.broadcast_to(rows.valid[:, None], (block_m, dv))
    pallas_triton.store(o_ref, acc, mask=real)       # padding rows: never read back
    m_ref[...] = m
    l_ref[...] = l


def _store_rows(out_ref, rows: _Rows, x: jax.Array, col0) -> None:
    """x [rows, w] into out_ref [T * H, dv] at the rows' places from column col0; padding
    rows skipped. Both indices are int arrays (a masked store through a slice has no
    interpret-mode rule)."""
    cols = col0 + jnp.arange(x.shape[1], dtype=jnp.int32)
    real = jnp.broadcast_to(rows.valid[:, None], x.shape)
    # padding rows aim one past the end: masked on a GPU, dropped when interpreted (aimed at
    # a real row, the interpreter's scatter could put that row's old value back)
    flat = jnp.where(rows.valid, rows.flat, out_ref.shape[0])
    pallas_triton.store(out_ref.at[flat[:, None], cols[None, :]],
                        x.astype(out_ref.dtype), mask=real)


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, n_splits, splits_pow2, block_r,
                    block_d, rep, t, n_heads):
    """The splits' partials of block_r rows x block_d value dims -> the normalized output:
    all splits at once ([splits_pow2, block_r, block_d], the index clamped to the last split,
    whose copies weigh 0)."""
    g, block_i, col = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    s = jnp.arange(splits_pow2, dtype=jnp.int32)
    real = s < n_splits
    s = jnp.minimum(s, n_splits - 1)
    r0 = block_i * block_r
    m = m_ref[s, pl.ds(r0, block_r)]                                   # [S, r]
    l = l_ref[s, pl.ds(r0, block_r)]
    m = jnp.where(real[:, None], m, MASK)
    m_max = m.max(axis=0)
    weight = jnp.where(real[:, None], jnp.exp(m - m_max[None, :]), 0.0)  # [S, r]
    total = (weight * l).sum(axis=0)
    o = o_ref[s, pl.ds(r0, block_r), pl.ds(col * block_d, block_d)]    # [S, r, d]
    out = (o * weight[:, :, None]).sum(axis=0) / jnp.where(total > 0, total, 1.0)[:, None]
    _store_rows(out_ref, _Rows(r0, block_r, g, rep, t, n_heads), out, col * block_d)


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


def choose_splits(programs: int, max_blocks: int, min_blocks_per_split: int = 1) -> int:
    """Context splits so that about TARGET_PROGRAMS programs run (none once the rows alone
    come near: a split costs a combine), each with at least min_blocks_per_split blocks of
    the longest context."""
    return max(1, min(TARGET_PROGRAMS // programs, max_blocks // min_blocks_per_split))


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array | None,
                    k_cache: kv_quant.KVPages, v_cache: kv_quant.KVPages, layer: jax.Array,
                    block_tables: jax.Array, cache_lens: jax.Array, q_positions: jax.Array, *,
                    scale: float,
                    sliding_window: jax.Array | int | None = None,
                    values_in_keys: int | None = None, logit_softcap: float | None = None,
                    sinks: jax.Array | None = None,
                    n_splits: int | None = None, min_blocks_per_split: int = 1,
                    pages_per_block: int | None = None, block_m: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    combine: str = "pallas", key_rows: bool = False,
                    interpret: bool | None = None) -> jax.Array:
    """paged_attention_ref.paged_attention's contract as a Pallas kernel. The keyword-only
    tuning knobs default by shape, shrunk to fit the GPU's shared memory (choose_blocks);
    a knob given is kept, and a tiling over the limit is a KernelError. combine: how split
    partials are merged, "pallas" (a second small kernel) or "xla" (jnp, for comparison).
    key_rows: address the cache per key (page id and slot of each of the block's keys, a
    [keys, dims] load) instead of per page ([pages, page_size, dims] reshaped), a knob for
    the GPU sweep.
    interpret defaults to True off a GPU.

    Every operand is read where it lies (q, the step's keys, positions, tables: no padded
    or transposed copies), and the output is written in place, so a call is one kernel
    launch (two with splits) and XLA adds nothing around it but free reshapes."""
    b, t, h, hd = q.shape
    n_kv = k_new.shape[2]
    rep = h // n_kv
    mla = values_in_keys is not None
    int8 = kv_quant.is_int8(k_cache)
    n_layers, n_pages, page_size = k_cache.shape[:3]
    dv = values_in_keys if mla else v_cache.shape[-1]
    reason = unsupported_reason(hd, dv, page_size, values_in_keys,
                                kv_itemsize=k_cache.dtype.itemsize,
                                q_itemsize=max(q.dtype.itemsize, k_cache.dtype.itemsize))
    if reason:
        raise KernelError(f"paged_attention_gpu: {reason}")
    if combine not in ("pallas", "xla"):
        raise KernelError(f"paged_attention_gpu: combine {combine!r} is not pallas or xla")
    parts = key_parts(hd, values_in_keys)
    if interpret is None:
        interpret = pallas_triton.interpret_default()

    cache_dtype = jnp.float32 if int8 else k_cache.dtype
    compute_dtype = jnp.promote_types(q.dtype, cache_dtype) if not int8 else q.dtype
    if compute_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        compute_dtype = jnp.float32

    # Query rows: (token, head) pairs of a KV group, in blocks of block_m.
    rows = t * rep
    blocks = choose_blocks(rows, t, page_size, hd, dv, values_in_keys, kv_dtype=k_cache.dtype,
                           new_dtype=k_new.dtype, compute_dtype=compute_dtype,
                           block_m=block_m, pages_per_block=pages_per_block,
                           num_warps=num_warps, num_stages=num_stages)
    n_mblocks = -(-rows // blocks.block_m)
    rows_pad = n_mblocks * blocks.block_m
    if block_tables.shape[1] == 0:        # no context pages in this bucket: one scratch entry
        block_tables = jnp.zeros((b, 1), jnp.int32)
    max_blocks = -(-block_tables.shape[1] // blocks.pages_per_block)
    if n_splits is None:
        n_splits = choose_splits(b * n_kv * n_mblocks, max_blocks, min_blocks_per_split)
    final = n_splits == 1
    window = jnp.reshape(jnp.asarray(0 if sliding_window is None else sliding_window,
                                     jnp.int32), (1,))

    # The cache as [L * n_pages, page_size, n_kv, d]: a layer's page p is page
    # layer * n_pages + p (added in the kernel), so no layer is sliced out.
    def flat(x):
        return x.reshape(n_layers * n_pages, *x.shape[2:])

    whole = lambda *zeros: lambda bi, g, mi, s: (bi, *zeros)            # noqa: E731
    per_head = lambda bi, g, mi, s: (bi, 0, g, 0)                         # noqa: E731
    grid = (b, n_kv, n_mblocks, n_splits)
    inputs = [q.reshape(b, t * h, hd), q_positions.astype(jnp.int32), k_new]
    specs = [pl.BlockSpec((None, t * h, hd), whole(0, 0)),
             pl.BlockSpec((None, t), whole(0)),
             pl.BlockSpec((None, t, None, hd), per_head)]
    if not mla:
        inputs.append(v_new)
        specs.append(pl.BlockSpec((None, t, None, dv), per_head))
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
    inputs += [block_tables.astype(jnp.int32), cache_lens.astype(jnp.int32), window,
               jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))]
    specs += [pl.BlockSpec((None, block_tables.shape[1]), whole(0)),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (bi,)),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (0,)),
              pl.BlockSpec((1,), lambda bi, g, mi, s: (0,))]
    if sinks is not None:
        inputs.append(sinks)
        specs.append(pl.BlockSpec((h,), lambda bi, g, mi, s: (0,)))

    out_spec = pl.BlockSpec((None, t * h, dv), whole(0, 0))
    out_struct = jax.ShapeDtypeStruct((b, t * h, dv), q.dtype)
    if final:
        out_specs, out_shape = out_spec, out_struct
    else:
        part_shape = (n_splits, b, n_kv, rows_pad)
        part = lambda bi, g, mi, s: (s, bi, g, mi)                        # noqa: E731
        out_specs = [pl.BlockSpec((None, None, None, blocks.block_m, dv),
                                  lambda bi, g, mi, s: (s, bi, g, mi, 0)),
                     pl.BlockSpec((None, None, None, blocks.block_m), part),
                     pl.BlockSpec((None, None, None, blocks.block_m), part)]
        out_shape = [jax.ShapeDtypeStruct((*part_shape, dv), jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32),
                     jax.ShapeDtypeStruct(part_shape, jnp.float32)]
    kernel = functools.partial(
        _kernel, parts=parts, page_size=page_size, blocks=blocks, pages_per_layer=n_pages,
        n_splits=n_splits, rep=rep, t=t, n_heads=h, scale=scale, softcap=logit_softcap,
        int8=int8, mla=mla, sinks=sinks is not None, final=final, key_rows=key_rows,
        compute_dtype=compute_dtype)
    res = pl.pallas_call(
        kernel, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pallas_triton.compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name=f"paged_attention_m{blocks.block_m}_p{blocks.pages_per_block}",
    )(*inputs)
    if final:
        out = res
    elif combine == "xla":
        return _combine_xla(*res, t, rep).astype(q.dtype)
    else:
        out = _combine_splits(*res, t=t, rep=rep, n_heads=h, block_m=blocks.block_m,
                              out_dtype=q.dtype,
                              interpret=interpret)
    return out.reshape(b, t, h, dv)


COMBINE_ELEMENTS = 4096    # a combine program's [splits, rows, dims] tile: 32 floats a thread


def _combine_splits(o: jax.Array, m: jax.Array, l: jax.Array, *, t: int, rep: int,
                    n_heads: int, block_m: int, out_dtype, interpret: bool) -> jax.Array:
    """Partials o [S, B, n_kv, rows_pad, dv], m and l [S, B, n_kv, rows_pad] -> the output
    [B, T * H, dv], one small kernel: a program per (row, KV head, rows of the group that
    exist, a slice of dv wide enough to fill its tile)."""
    n_splits, b, n_kv, rows_pad, dv = o.shape
    splits_pow2 = _next_pow2(n_splits)
    # rows: a power of 2 dividing block_m (so dividing rows_pad), at most what the tile holds
    block_r = min(_next_pow2(t * rep), block_m,
                  max(1, COMBINE_ELEMENTS // (splits_pow2 * MIN_BLOCK)))
    block_r = 1 << (block_r.bit_length() - 1)
    block_d = min(dv, max(MIN_BLOCK, COMBINE_ELEMENTS // (splits_pow2 * block_r)))
    block_d = 1 << (block_d.bit_length() - 1)      # a power of 2 (so dividing dv)
    grid = (b, n_kv, -(-t * rep // block_r), dv // block_d)
    kernel = functools.partial(_combine_kernel, n_splits=n_splits, splits_pow2=splits_pow2,
                               block_r=block_r, block_d=block_d, rep=rep, t=t,
                               n_heads=n_heads)
    part = lambda bi, g, ri, c: (0, bi, g, 0)                                # noqa: E731
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[pl.BlockSpec((n_splits, None, None, rows_pad, dv),
                               lambda bi, g, ri, c: (0, bi, g, 0, 0)),
                  pl.BlockSpec((n_splits, None, None, rows_pad), part),
                  pl.BlockSpec((n_splits, None, None, rows_pad), part)],
        out_specs=pl.BlockSpec((None, t * n_heads, dv), lambda bi, g, ri, c: (bi, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t * n_heads, dv), out_dtype),
        compiler_params=pallas_triton.compiler_params(4, 2),
        interpret=interpret, name="paged_attention_combine",
    )(o, m, l)


def _combine_xla(o: jax.Array, m: jax.Array, l: jax.Array, t: int, rep: int) -> jax.Array:
    """The splits' partials merged in jnp (the combine="xla" knob: XLA's fusions, measured
    against the combine kernel); padding rows of o were never written, so they are cut
    before they are read."""
    o, m, l = (x[:, :, :, :t * rep] for x in (o, m, l))
    m_max = m.max(axis=0)
    weight = jnp.exp(m - m_max[None])
    total = (l * weight).sum(axis=0)
    out = (o * weight[..., None]).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    b, n_kv, _, dv = out.shape
    out = out.reshape(b, n_kv, t, rep, dv).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n_kv * rep, dv)


def kv_read_bytes(n_tokens: int, n_kv: int, head_dim: int, value_dim: int,
                  kv_dtype: str) -> int:
    """Bytes of one layer's context a decode step reads for a row of n_tokens cached."""
    per = kv_quant.bytes_per_token_head(head_dim, kv_dtype) + \
        kv_quant.bytes_per_token_head(value_dim, kv_dtype)
    return n_tokens * n_kv * per

