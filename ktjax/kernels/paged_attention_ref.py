"""Reference paged attention in plain jnp: runs on any device, and is the oracle for kernels.

Layout: one KV buffer per model, `k_cache`/`v_cache` of shape
[L, n_pages, page_size, n_kv, head_dim]; a token's slot is page * page_size + offset. Page 0
is scratch: padding tokens write there and nothing ever reads it as valid context. Reads
gather whole pages (contiguous blocks), not single slots.

A step's own keys/values are attended from registers (`k_new`, `v_new`) and written to the
cache once, after all layers, for every layer at a time: inside the layer loop the cache is
read-only, which lets XLA keep the donated buffer in place instead of copying it per layer.

A cache leaf may be `kv_quant.Int8Pages` (kv_cache_dtype int8): writes quantize each token's
head row, reads dequantize the gathered pages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.kernels import kv_quant


def write_kv(k_cache: kv_quant.KVPages, v_cache: kv_quant.KVPages, slots: jax.Array,
             k: jax.Array, v: jax.Array) -> tuple[kv_quant.KVPages, kv_quant.KVPages]:
    """Store every layer's new keys/values k, v [L, B, T, n_kv, hd] at `slots` [B, T]."""
    page_size = k_cache.shape[2]
    pages, offsets = slots.reshape(-1) // page_size, slots.reshape(-1) % page_size
    n_layers = k.shape[0]
    n = pages.shape[0]  # explicit: a width-0 value cache (MLA) cannot infer -1

    def store(cache, x):
        x = x.reshape(n_layers, n, *x.shape[3:])
        if kv_quant.is_int8(cache):
            q, scale = kv_quant.quantize(x)
            return kv_quant.Int8Pages(cache.values.at[:, pages, offsets].set(q),
                                      cache.scales.at[:, pages, offsets].set(scale))
        return cache.at[:, pages, offsets].set(x.astype(cache.dtype))
    return store(k_cache, k), store(v_cache, v)


def gather_context(cache: kv_quant.KVPages, layer: jax.Array,
                   block_tables: jax.Array) -> jax.Array:
    """[B, P] page ids -> the layer's cached rows [B, P * page_size, n_kv, hd], in order
    (float32 when the cache is int8)."""
    if kv_quant.is_int8(cache):
        pages = kv_quant.dequantize(cache.values[layer, block_tables],
                                    cache.scales[layer, block_tables])
    else:
        pages = cache[layer, block_tables]                            # [B, P, ps, n_kv, hd]
    return pages.reshape(pages.shape[0], -1, *pages.shape[3:])


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                    k_cache: kv_quant.KVPages, v_cache: kv_quant.KVPages, layer: jax.Array,
                    block_tables: jax.Array, cache_lens: jax.Array, q_positions: jax.Array, *,
                    scale: float,
                    sliding_window: jax.Array | int | None = None,
                    values_in_keys: int | None = None,
                    logit_softcap: float | None = None,
                    sinks: jax.Array | None = None) -> jax.Array:
    """Causal attention of a step's queries over the cached context plus the step's own keys.

    q [B, T, H, hd]; k_new/v_new [B, T, n_kv, hd]; q_positions [B, T] (-1 for padding);
    cache_lens [B] tokens already cached (context positions 0..cache_len-1); block_tables
    [B, P]. `sliding_window` (0 or None = unlimited) limits each query to the last
    `sliding_window` positions, as Gemma's local layers do. `values_in_keys` = d (MLA's
    latent cache): the values are the first d dims of the keys and v_new/v_cache (width 0)
    are not read. `logit_softcap` = c bounds the scaled scores to c * tanh(s / c) (Gemma 2's
    attention soft-capping). `sinks` [H] (gpt-oss): one logit per head that joins every
    query's softmax denominator and contributes no value. Returns [B, T, H, value dim].
    """
    b, t, h, hd = q.shape
    n_kv = k_new.shape[2]
    k = jnp.concatenate([gather_context(k_cache, layer, block_tables).astype(jnp.float32),
                         k_new.astype(jnp.float32)], axis=1)         # [B, S + T, n_kv, hd]
    if values_in_keys is None:
        v = jnp.concatenate([gather_context(v_cache, layer, block_tables).astype(jnp.float32),
                             v_new.astype(jnp.float32)], axis=1)
    else:
        v = k[..., :values_in_keys]
    context = jnp.arange(k.shape[1] - t)[None]                        # [1, S]
    key_pos = jnp.concatenate([
        jnp.where(context < cache_lens[:, None], context, -1),       # unwritten slots: invalid
        q_positions], axis=1)                                         # [B, S + T]

    # Keys-major layout [B, n_kv, S+T, rep, T]: XLA CPU's matmul emits the scores in this
    # order, and the value matmul contracts over S+T as the leading axis, so neither the
    # scores nor the probabilities get transposed (two copies per layer in long prefill).
    qg = (q.astype(jnp.float32) * scale).reshape(b, t, n_kv, h // n_kv, hd)
    scores = jnp.einsum("bsgd,btgrd->bgsrt", k, qg)
    if logit_softcap:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    qp = q_positions[:, None, :]                                      # [B, 1, T]
    kp = key_pos[:, :, None]                                          # [B, S+T, 1]
    visible = (kp >= 0) & (kp <= qp)                                  # [B, S+T, T]
    if sliding_window is not None:
        window = jnp.asarray(sliding_window)
        visible &= (window <= 0) | (qp - kp < window)
    # Padding queries see nothing: their scores stay finite (no mask, not NaN) and their
    # output is zeroed afterwards, on the small output rather than on every probability. The
    # mask is an additive bias XLA fuses into the softmax instead of a masked copy of scores.
    any_visible = visible.any(axis=1)                                 # [B, T]
    bias = jnp.where(visible | ~any_visible[:, None, :], 0.0, -jnp.inf)
    logits = scores + bias[:, None, :, None, :]
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=2)
    else:
        sink = sinks.astype(jnp.float32).reshape(1, n_kv, 1, h // n_kv, 1)
        top = jnp.maximum(logits.max(axis=2, keepdims=True), sink)
        e = jnp.exp(logits - top)
        probs = e / (e.sum(axis=2, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bgsrt,bsgd->btgrd", probs, v)
    out = jnp.where(any_visible[:, :, None, None, None], out, 0.0)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
