"""What every model family shares: the step batch, the KV cache, tensor tables and the
decoder skeleton (embed -> scanned blocks -> final norm -> logits of the sampled rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers


@struct.dataclass
class Batch:
    """One engine step, padded to its bucket: B rows of T new tokens each.

    tokens/positions/slots [B, T] (position -1 and slot 0 for padding), block_tables [B, P]
    (the pages of the cached context; unused entries 0), cache_lens [B] (tokens already cached
    before this step), logits_index [B, R] (the row's tokens whose logits are wanted: R = 1
    when sampling, all positions when scoring).
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    cache_lens: jax.Array
    logits_index: jax.Array


@struct.dataclass
class KVCache:
    """Paged keys and values, [L, n_pages, page_size, n_kv, head_dim] each.

    A family whose cache is one latent per token (MLA) declares `cache_value_dim = 0`: its
    values are a prefix of the keys and `v` has width 0 (see `cache_value_dim`)."""

    k: jax.Array
    v: jax.Array


@dataclass(frozen=True)
class TensorSpec:
    """A GGUF tensor a family needs: name ("{}" = layer index), numpy shape, optional."""

    gguf_name: str
    shape: tuple[int, ...]
    optional: bool = False
    layer_range: tuple[int, int] | None = None  # (first, stop) when only those layers have it

    @property
    def per_layer(self) -> bool:
        return "{}" in self.gguf_name

    def names(self, n_layers: int) -> list[str]:
        """The GGUF names of this tensor in a model of n_layers (one name if not per layer)."""
        if not self.per_layer:
            return [self.gguf_name]
        first, stop = self.layer_range or (0, n_layers)
        return [self.gguf_name.format(i) for i in range(first, stop)]


def cache_value_dim(config) -> int:
    """Width of the cached values: the config's `cache_value_dim` if it declares one (MLA: 0,
    the values live inside the cached latent), else `head_dim` like the keys."""
    return getattr(config, "cache_value_dim", config.head_dim)


@dataclass(frozen=True)
class AttentionContext:
    """What a block needs to attend over the paged KV cache of its layer (read-only here)."""

    backend: AttentionBackend
    batch: Batch
    kv: KVCache
    layer: jax.Array

    def attend(self, q, k, v, *, scale: float, sliding_window=None,
               values_in_keys: int | None = None) -> jax.Array:
        # values_in_keys (MLA) is passed only when used, so backends without it keep working
        extra = {} if values_in_keys is None else {"values_in_keys": values_in_keys}
        return self.backend.attend(q, k, v, self.kv.k, self.kv.v, self.layer,
                                   self.batch.block_tables, self.batch.cache_lens,
                                   self.batch.positions, scale=scale,
                                   sliding_window=sliding_window, **extra)


# block(layer_params, x, layer, ctx) -> (x, (k_new, v_new)) for one layer.
BlockFn = Callable[[Any, jax.Array, jax.Array, AttentionContext],
                   tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def decoder_forward(params: dict, kv: KVCache, batch: Batch, *, block: BlockFn | None,
                    backend: AttentionBackend, rms_eps: float,
                    embed_scale: float | None = None,
                    stacks: Sequence[tuple[str, BlockFn]] | None = None
                    ) -> tuple[jax.Array, KVCache]:
    """embed -> lax.scan over stacked layer params -> final norm -> logits [B, R, V] (float32).

    Scanning keeps compile time flat in depth and, on XLA CPU, avoids the copies that slicing
    stacked weights layer by layer would make. `stacks` ((params key, block) in layer order)
    scans layers of different kinds one stack after the other (DeepSeek's leading dense
    layers, then its MoE layers); default: params["layers"] run by `block`. Host weights are
    bound to the index within their stack, attention to the model's layer index.
    """
    embed = params["token_embd"]
    x = embed[batch.tokens].astype(jnp.float32)
    if embed_scale is not None:
        x = x * embed_scale
    new_k, new_v, first = [], [], 0
    for key, stack_block in stacks or (("layers", block),):
        n = params[key]["attn_norm"].shape[0]
        # Layer stacks ride along whole (closed over), the rest is sliced by the scan.
        whole = {k: v for k, v in params[key].items() if isinstance(v, layers.LayerStack)}
        sliced = {k: v for k, v in params[key].items() if k not in whole}

        def step(x, inputs, stack_block=stack_block, first=first, whole=whole):
            layer_params, local = inputs
            layer = local + first
            return stack_block(layers.bind_layer({**layer_params, **whole}, local), x, layer,
                               AttentionContext(backend, batch, kv, layer))

        x, (k_new, v_new) = jax.lax.scan(step, x, (sliced, jnp.arange(n, dtype=jnp.int32)))
        new_k.append(k_new)
        new_v.append(v_new)
        first += n
    k, v = backend.write(kv.k, kv.v, batch.slots, jnp.concatenate(new_k),
                         jnp.concatenate(new_v))
    rows = jnp.take_along_axis(x, batch.logits_index[:, :, None], axis=1)           # [B, R, H]
    rows = layers.rms_norm(rows, params["output_norm"], rms_eps)
    head = params.get("output")
    logits = layers.linear(rows, embed if head is None else head)
    return logits.astype(jnp.float32), KVCache(k=k, v=v)
