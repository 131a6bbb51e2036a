"""What every model family shares: the step batch, the KV cache and its spec, tensor tables,
the GQA families' common config fields and the decoder skeleton (embed -> scanned blocks ->
final norm -> logits of the sampled rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ktjax import pytree, weights
from ktjax.engine import xla_flags
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers


@pytree.dataclass
class Batch:
    """One engine step, padded to its bucket: B rows of T new tokens each.

    tokens/positions/slots [B, T] (position -1 and slot 0 for padding), block_tables [B, P]
    (the pages of the cached context; unused entries 0), cache_lens [B] (tokens already cached
    before this step), logits_index [B, R] (the row's tokens whose logits are wanted: R = 1
    when sampling, all positions when scoring).

    A packed step (`segments` set, static) holds rows of different lengths: tokens, positions
    and slots are [1, N], the segments ((rows, tokens), ...) in order, N = sum rows * tokens
    (decode rows of one token, or of 1 + draft tokens, then prefill chunks). The matmuls run
    over the N tokens; attention splits them back into each segment's rows. block_tables and
    cache_lens have one row per segment row; logits_index [1, R] indexes the N tokens.
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    cache_lens: jax.Array
    logits_index: jax.Array
    segments: tuple[tuple[int, int], ...] | None = pytree.field(pytree_node=False,
                                                                default=None)


@pytree.dataclass
class KVCache:
    """Paged keys [L, n_pages, page_size, n_kv, head_dim] and values [..., value_dim], as
    the family's KVCacheSpec says."""

    k: jax.Array
    v: jax.Array


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache a family's blocks write, per layer and token: n_kv_heads keys of head_dim and
    values of value_dim. Every family declares one (its config's `cache_spec`): GQA caches
    keys and values per KV head; DeepSeek's MLA caches one latent "key" per token whose first
    dims are the values (value_dim 0)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    value_dim: int

    def bytes_per_token(self, itemsize: int) -> int:
        return self.n_layers * self.n_kv_heads * (self.head_dim + self.value_dim) * itemsize


# What a tensor is to placement (ktjax.rules decides by it where it may live): a lookup
# table, a vector (norms, biases), a linear weight [out, in], routed experts [E, out, in] (one
# expert set per stack), or per-head weights used inside XLA's attention math (MLA's absorbed
# up-projections).
TENSOR_KINDS = ("embedding", "vector", "matrix", "experts", "per_head")


@dataclass(frozen=True)
class TensorSpec:
    """A GGUF tensor a family needs: name ("{}" = layer index), numpy shape, optional, and
    its kind (TENSOR_KINDS; left empty: 1-D tensors are vectors, 2-D ones matrices; others
    must declare it)."""

    gguf_name: str
    shape: tuple[int, ...]
    optional: bool = False
    layer_range: tuple[int, int] | None = None  # (first, stop) when only those layers have it
    kind: str = ""

    def __post_init__(self):
        if not self.kind and len(self.shape) in (1, 2):
            object.__setattr__(self, "kind", "vector" if len(self.shape) == 1 else "matrix")
        if self.kind not in TENSOR_KINDS:
            raise ValueError(f"{self.gguf_name}: kind {self.kind!r} is not one of "
                             f"{TENSOR_KINDS} (tensors of more than 2 dims declare theirs)")

    @property
    def per_layer(self) -> bool:
        return "{}" in self.gguf_name

    def names(self, n_layers: int) -> list[str]:
        """The GGUF names of this tensor in a model of n_layers (one name if not per layer)."""
        if not self.per_layer:
            return [self.gguf_name]
        first, stop = self.layer_range or (0, n_layers)
        return [self.gguf_name.format(i) for i in range(first, stop)]


def gguf_vocab_size(f: GGUFFile) -> int:
    a = f.architecture
    return int(f.get(f"{a}.vocab_size", None) or len(f.get("tokenizer.ggml.tokens", []))
               or f.tensors["token_embd.weight"].shape[0])


@dataclass(frozen=True)
class GqaConfig:
    """The fields the GQA families (llama, gemma3) read alike from GGUF; their configs extend
    it. The cache holds keys and values of head_dim per KV head."""

    architecture: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    context_length: int

    @staticmethod
    def gguf_fields(f: GGUFFile) -> dict[str, Any]:
        a = f.architecture
        hidden = int(f.get(f"{a}.embedding_length"))
        n_heads = int(f.get(f"{a}.attention.head_count"))
        return dict(
            architecture=a,
            vocab_size=gguf_vocab_size(f),
            hidden_size=hidden,
            n_layers=int(f.get(f"{a}.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(f.get(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=int(f.get(f"{a}.attention.key_length", hidden // n_heads)),
            intermediate_size=int(f.get(f"{a}.feed_forward_length")),
            rms_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon")),
            context_length=int(f.get(f"{a}.context_length")),
        )

    @property
    def cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.n_layers, self.n_kv_heads, self.head_dim, self.head_dim)


@dataclass(frozen=True)
class AttentionContext:
    """What a block needs to attend over the paged KV cache of its layer (read-only here)."""

    backend: AttentionBackend
    batch: Batch
    kv: KVCache
    layer: jax.Array

    def attend(self, q, k, v, *, scale: float, sliding_window=None,
               values_in_keys: int | None = None, sinks: jax.Array | None = None) -> jax.Array:
        # values_in_keys (MLA) and sinks (gpt-oss) are passed only when used, so backends
        # without them keep working
        extra = {} if values_in_keys is None else {"values_in_keys": values_in_keys}
        if sinks is not None:
            extra["sinks"] = sinks
        b = self.batch
        if b.segments is None:
            return self.backend.attend(q, k, v, self.kv.k, self.kv.v, self.layer,
                                       b.block_tables, b.cache_lens, b.positions, scale=scale,
                                       sliding_window=sliding_window, **extra)
        # packed: each segment's tokens back to [rows, tokens], attended on their own
        outs, token, row = [], 0, 0
        for rows, tokens in b.segments:
            n = rows * tokens

            def seg(a, token=token, n=n, rows=rows, tokens=tokens):
                return None if a is None else \
                    a[0, token:token + n].reshape(rows, tokens, *a.shape[2:])
            out = self.backend.attend(seg(q), seg(k), seg(v), self.kv.k, self.kv.v, self.layer,
                                      b.block_tables[row:row + rows],
                                      b.cache_lens[row:row + rows], seg(b.positions),
                                      scale=scale, sliding_window=sliding_window, **extra)
            outs.append(out.reshape(1, n, *out.shape[2:]))
            token, row = token + n, row + rows
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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
        whole, sliced = weights.split_scanned(params[key])
        # routed experts that carry state from layer to layer (hybrid_experts.ExpertCarry:
        # a deferred host job's token, or streamed weights) scan (x, state)
        carrying = weights.expert_carry(whole, x)

        def step(carry, inputs, stack_block=stack_block, first=first, whole=whole,
                 carrying=carrying):
            layer_params, local = inputs
            layer = local + first
            lp = weights.bind_layer({**layer_params, **whole}, local)
            if carrying is None:
                return stack_block(lp, carry, layer, AttentionContext(backend, batch, kv, layer))
            (x, state), (name, experts_carry) = carry, carrying
            lp[name] = experts_carry.bind(lp[name], state, local)
            x, new_kv = stack_block(lp, x, layer, AttentionContext(backend, batch, kv, layer))
            return (x, experts_carry.take_next()), new_kv

        layer_ids = jnp.arange(n, dtype=jnp.int32)
        unroll = xla_flags.unrolled_layers()
        if carrying is None:
            x, (k_new, v_new) = jax.lax.scan(step, x, (sliced, layer_ids), unroll=unroll)
        else:
            (x, state), (k_new, v_new) = jax.lax.scan(step, (x, carrying[1].initial),
                                                      (sliced, layer_ids), unroll=unroll)
            x = carrying[1].finish(state, x)
        new_k.append(k_new)
        new_v.append(v_new)
        first += n
    k, v = backend.write(kv.k, kv.v, batch.slots, jnp.concatenate(new_k),
                         jnp.concatenate(new_v))
    rows = jnp.take_along_axis(x, batch.logits_index[:, :, None], axis=1)           # [B, R, H]
    rows = layers.rms_norm(rows, params["output_norm"], rms_eps)
    head = params.get("output")
    logits = weights.linear(embed if head is None else head, rows)
    return logits.astype(jnp.float32), KVCache(k=k, v=v)
