"""What every model family shares: the step batch, the KV cache, tensor tables and the
decoder skeleton (embed -> scanned blocks -> final norm -> logits of the sampled rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers


@struct.dataclass
class Batch:
    """One engine step, padded to its bucket: B rows of T new tokens each.

    tokens/positions/slots [B, T] (position -1 and slot 0 for padding), block_tables [B, P]
    (page ids; unused entries 0), seq_lens [B] (context length after this step),
    logits_index [B, R] (the row's tokens whose logits are wanted: R = 1 when sampling, all
    positions when scoring).
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    logits_index: jax.Array


@struct.dataclass
class KVCache:
    """Paged keys and values, [L, n_slots, n_kv, head_dim] each (slot = page * page_size + i)."""

    k: jax.Array
    v: jax.Array


@dataclass(frozen=True)
class TensorSpec:
    """A GGUF tensor a family needs: name ("{}" = layer index), numpy shape, optional."""

    gguf_name: str
    shape: tuple[int, ...]
    optional: bool = False

    @property
    def per_layer(self) -> bool:
        return "{}" in self.gguf_name


@dataclass(frozen=True)
class AttentionContext:
    """What a block needs to reach the paged KV cache of its layer."""

    backend: AttentionBackend
    batch: Batch
    layer: jax.Array
    page_size: int

    def attend(self, q, k, v, k_cache, v_cache, *, scale: float, sliding_window=None):
        k_cache, v_cache = self.backend.write(k_cache, v_cache, self.layer, self.batch.slots, k, v)
        out = self.backend.attend(q, k_cache, v_cache, self.layer, self.batch.block_tables,
                                  self.batch.seq_lens, self.batch.positions,
                                  page_size=self.page_size, scale=scale,
                                  sliding_window=sliding_window)
        return out, k_cache, v_cache


BlockFn = Callable[[Any, jax.Array, jax.Array, AttentionContext, jax.Array, jax.Array],
                   tuple[jax.Array, jax.Array, jax.Array]]


def decoder_forward(params: dict, kv: KVCache, batch: Batch, *, block: BlockFn,
                    backend: AttentionBackend, page_size: int, rms_eps: float,
                    embed_scale: float | None = None) -> tuple[jax.Array, KVCache]:
    """embed -> lax.scan over stacked layer params -> final norm -> logits [B, R, V] (float32).

    Scanning keeps compile time flat in depth and, on XLA CPU, avoids the copies that slicing
    stacked weights layer by layer would make.
    """
    embed = params["token_embd"]
    x = embed[batch.tokens].astype(jnp.float32)
    if embed_scale is not None:
        x = x * embed_scale
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]

    def step(carry, inputs):
        x, k_cache, v_cache = carry
        layer_params, layer = inputs
        ctx = AttentionContext(backend, batch, layer, page_size)
        x, k_cache, v_cache = block(layer_params, x, layer, ctx, k_cache, v_cache)
        return (x, k_cache, v_cache), None

    (x, k, v), _ = jax.lax.scan(step, (x, kv.k, kv.v),
                                (params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    rows = jnp.take_along_axis(x, batch.logits_index[:, :, None], axis=1)           # [B, R, H]
    rows = layers.rms_norm(rows, params["output_norm"], rms_eps)
    head = params.get("output")
    logits = layers.linear(rows, embed if head is None else head)
    return logits.astype(jnp.float32), KVCache(k=k, v=v)
