"""Reference paged attention in plain jnp: runs on any device, and is the oracle for kernels.

Layout: one KV buffer per model, `k_cache`/`v_cache` of shape [L, n_slots, n_kv, head_dim]
where slot = page * page_size + offset. Slot 0 is the scratch slot of the reserved page 0:
padding tokens write there and nothing ever reads it as valid context.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array,
             k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Store new keys/values [B, T, n_kv, hd] at `slots` [B, T] of `layer` (in place when donated)."""
    flat = slots.reshape(-1)
    k_cache = k_cache.at[layer, flat].set(k.reshape(-1, *k.shape[2:]).astype(k_cache.dtype))
    v_cache = v_cache.at[layer, flat].set(v.reshape(-1, *v.shape[2:]).astype(v_cache.dtype))
    return k_cache, v_cache


def context_slots(block_tables: jax.Array, page_size: int) -> jax.Array:
    """[B, P] page ids -> [B, P * page_size] slot ids, in context order."""
    offsets = jnp.arange(page_size, dtype=block_tables.dtype)
    return (block_tables[:, :, None] * page_size + offsets).reshape(block_tables.shape[0], -1)


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                    block_tables: jax.Array, seq_lens: jax.Array, q_positions: jax.Array, *,
                    page_size: int, scale: float, sliding_window: jax.Array | int | None = None,
                    ) -> jax.Array:
    """Causal attention of queries over their sequence's cached context.

    q [B, T, H, hd]; q_positions [B, T] (-1 for padding rows); seq_lens [B] valid context
    length; block_tables [B, P]. `sliding_window` (0 or None = unlimited) limits each query to
    the last `sliding_window` positions, as Gemma's local layers do. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    slots = context_slots(block_tables, page_size)                    # [B, S]
    k = k_cache[layer, slots].astype(jnp.float32)                     # [B, S, n_kv, hd]
    v = v_cache[layer, slots].astype(jnp.float32)
    n_kv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, n_kv, h // n_kv, hd)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k) * scale          # [B, n_kv, rep, T, S]

    key_pos = jnp.arange(slots.shape[1])[None, None, :]               # [1, 1, S]
    qp = q_positions[:, :, None]                                      # [B, T, 1]
    visible = (key_pos <= qp) & (key_pos < seq_lens[:, None, None])
    if sliding_window is not None:
        window = jnp.asarray(sliding_window)
        visible &= (window <= 0) | (qp - key_pos < window)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # Padding rows see nothing; keep them finite instead of NaN.
    any_visible = visible.any(axis=-1)[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(any_visible, scores, 0.0), axis=-1)
    probs = jnp.where(any_visible, probs, 0.0)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
    return out.reshape(b, t, h, hd).astype(q.dtype)
