"""Reference paged attention in plain jnp: runs on any device, and is the oracle for kernels.

Layout: one KV buffer per model, `k_cache`/`v_cache` of shape [L, n_slots, n_kv, head_dim]
where slot = page * page_size + offset. Slot 0 is the scratch slot of the reserved page 0:
padding tokens write there and nothing ever reads it as valid context.

A step's own keys/values are attended from registers (`k_new`, `v_new`) and written to the
cache once, after all layers, for every layer at a time: inside the layer loop the cache is
read-only, which lets XLA keep the donated buffer in place instead of copying it per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, k: jax.Array,
             v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Store every layer's new keys/values k, v [L, B, T, n_kv, hd] at `slots` [B, T]."""
    flat = slots.reshape(-1)
    n_layers = k.shape[0]
    k_cache = k_cache.at[:, flat].set(k.reshape(n_layers, -1, *k.shape[3:]).astype(k_cache.dtype))
    v_cache = v_cache.at[:, flat].set(v.reshape(n_layers, -1, *v.shape[3:]).astype(v_cache.dtype))
    return k_cache, v_cache


def context_slots(block_tables: jax.Array, page_size: int) -> jax.Array:
    """[B, P] page ids -> [B, P * page_size] slot ids, in context order."""
    offsets = jnp.arange(page_size, dtype=block_tables.dtype)
    return (block_tables[:, :, None] * page_size + offsets).reshape(block_tables.shape[0], -1)


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: jax.Array, block_tables: jax.Array,
                    cache_lens: jax.Array, q_positions: jax.Array, *, page_size: int,
                    scale: float, sliding_window: jax.Array | int | None = None) -> jax.Array:
    """Causal attention of a step's queries over the cached context plus the step's own keys.

    q [B, T, H, hd]; k_new/v_new [B, T, n_kv, hd]; q_positions [B, T] (-1 for padding);
    cache_lens [B] tokens already cached (context positions 0..cache_len-1); block_tables
    [B, P]. `sliding_window` (0 or None = unlimited) limits each query to the last
    `sliding_window` positions, as Gemma's local layers do. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    n_kv = k_new.shape[2]
    slots = context_slots(block_tables, page_size)                    # [B, S]
    k = jnp.concatenate([k_cache[layer, slots].astype(jnp.float32),
                         k_new.astype(jnp.float32)], axis=1)         # [B, S + T, n_kv, hd]
    v = jnp.concatenate([v_cache[layer, slots].astype(jnp.float32),
                         v_new.astype(jnp.float32)], axis=1)
    key_pos = jnp.concatenate([
        jnp.where(jnp.arange(slots.shape[1])[None] < cache_lens[:, None],
                  jnp.arange(slots.shape[1])[None], -1),             # unwritten slots: invalid
        q_positions], axis=1)                                         # [B, S + T]

    qg = q.astype(jnp.float32).reshape(b, t, n_kv, h // n_kv, hd)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k) * scale          # [B, n_kv, rep, T, S+T]
    qp = q_positions[:, :, None]                                      # [B, T, 1]
    kp = key_pos[:, None, :]                                          # [B, 1, S+T]
    visible = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        window = jnp.asarray(sliding_window)
        visible &= (window <= 0) | (qp - kp < window)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # Padding rows see nothing; keep them finite instead of NaN.
    any_visible = visible.any(axis=-1)[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(any_visible, scores, 0.0), axis=-1)
    probs = jnp.where(any_visible, probs, 0.0)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
    return out.reshape(b, t, h, hd).astype(q.dtype)
