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
    (page ids; unused entries 0), cache_lens [B] (tokens already cached before this step),
    logits_index [B, R] (the row's tokens whose logits are wanted: R = 1 when sampling, all
    positions when scoring).
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    cache_lens: jax.Array
    logits_index: jax.Array


@struct.dataclass
class KVCache:
    """Paged keys and values, [L, n_pages, page_size, n_kv, head_dim] each."""

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
    """What a block needs to attend over the paged KV cache of its layer (read-only here)."""

    backend: AttentionBackend
    batch: Batch
    kv: KVCache
    layer: jax.Array

    def attend(self, q, k, v, *, scale: float, sliding_window=None) -> jax.Array:
        return self.backend.attend(q, k, v, self.kv.k, self.kv.v, self.layer,
                                   self.batch.block_tables, self.batch.cache_lens,
                                   self.batch.positions, scale=scale,
                                   sliding_window=sliding_window)


# block(layer_params, x, layer, ctx) -> (x, (k_new, v_new)) for one layer.
BlockFn = Callable[[Any, jax.Array, jax.Array, AttentionContext],
                   tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def decoder_forward(params: dict, kv: KVCache, batch: Batch, *, block: BlockFn,
                    backend: AttentionBackend, rms_eps: float,
                    embed_scale: float | None = None) -> tuple[jax.Array, KVCache]:
    """embed -> lax.scan over stacked layer params -> final norm -> logits [B, R, V] (float32).

    Scanning keeps compile time flat in depth and, on XLA CPU, avoids the copies that slicing
    stacked weights layer by layer would make.
    """
    embed = params["token_embd"]
    x = embed[batch.tokens].astype(jnp.float32)
    if embed_scale is not None:
        x = x * embed_scale
    n_layers = params["layers"]["attn_norm"].shape[0]

    def step(x, inputs):
        layer_params, layer = inputs
        return block(layers.bind_layer(layer_params, layer), x, layer,
                     AttentionContext(backend, batch, kv, layer))

    x, (k_new, v_new) = jax.lax.scan(step, x, (params["layers"],
                                               jnp.arange(n_layers, dtype=jnp.int32)))
    k, v = backend.write(kv.k, kv.v, batch.slots, k_new, v_new)
    rows = jnp.take_along_axis(x, batch.logits_index[:, :, None], axis=1)           # [B, R, H]
    rows = layers.rms_norm(rows, params["output_norm"], rms_eps)
    head = params.get("output")
    logits = layers.linear(rows, embed if head is None else head)
    return logits.astype(jnp.float32), KVCache(k=k, v=v)
