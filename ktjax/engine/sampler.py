"""On-device sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds.

One compiled function per (rows, penalty window) shape; every per-request choice is data, so
mixed requests share a step. Filtering works on the CANDIDATES most likely tokens (exact for
top-k <= CANDIDATES; top-p/min-p thresholds use the full softmax), while plain temperature
sampling draws from the whole vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import pytree
from ktjax.host.ffi import register_targets

CANDIDATES = 256


@pytree.dataclass
class SamplingBatch:
    """Per-row sampling state, [B] unless noted. recent [B, W]: penalty window (-1 = empty)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array      # uint32 [B, 2]: the 64-bit request seed
    step: jax.Array      # int32: index of the token being sampled (folds into the key)
    recent: jax.Array


def apply_penalties(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """llama.cpp / HF semantics: repetition divides positive and multiplies negative logits of
    seen tokens; presence subtracts once, frequency once per occurrence."""
    b, v = logits.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], sb.recent.shape)
    counts = jnp.zeros((b, v), jnp.float32).at[rows, jnp.maximum(sb.recent, 0)].add(
        (sb.recent >= 0).astype(jnp.float32))
    seen = counts > 0
    rp = sb.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - sb.presence_penalty[:, None] * seen - sb.frequency_penalty[:, None] * counts


def _row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
    return jax.random.fold_in(key, step)


def filtered_candidates(scaled: jax.Array, sb: SamplingBatch
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top CANDIDATES of temperature-scaled logits [B, V] (logits, ids) and which of them
    each row's top-k / top-p / min-p keeps, thresholds from the full distribution (the best
    candidate always kept)."""
    k = min(CANDIDATES, scaled.shape[-1])
    cand_logits, cand_ids = jax.lax.top_k(scaled, k)
    probs = jnp.exp(cand_logits - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
    rank = jnp.arange(k)[None, :]
    keep = (sb.top_k[:, None] <= 0) | (rank < sb.top_k[:, None])
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < sb.top_p[:, None]
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    return cand_logits, cand_ids, keep.at[:, 0].set(True)


def sample(logits: jax.Array, sb: SamplingBatch) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (token ids [B] int32, model log-probs of those tokens [B])."""
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    logits = apply_penalties(logits, sb)
    greedy = argmax_last(logits)

    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp
    keys = jax.vmap(_row_key)(sb.seed, sb.step)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(keys)
    unfiltered = argmax_last(scaled + gumbel)

    cand_logits, cand_ids, keep = filtered_candidates(scaled, sb)
    choice = jnp.argmax(jnp.where(keep, cand_logits + jnp.take_along_axis(gumbel, cand_ids, 1),
                                  -jnp.inf), axis=-1)
    filtered = jnp.take_along_axis(cand_ids, choice[:, None], 1)[:, 0].astype(jnp.int32)

    uses_filter = (sb.top_k > 0) | (sb.top_p < 1) | (sb.min_p > 0)
    tokens = jnp.where(sb.temperature <= 0, greedy, jnp.where(uses_filter, filtered, unfiltered))
    return tokens, jnp.take_along_axis(model_logprobs, tokens[:, None], 1)[:, 0]


def _argmax_reductions(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    nan = jnp.isnan(x)
    top = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan,
                    x == jnp.max(x, axis=-1, keepdims=True))
    return jnp.min(jnp.where(top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _argmax_host(x: jax.Array) -> jax.Array:
    register_targets()
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    ids = jax.ffi.ffi_call("ktjax_argmax", jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32))(rows)
    return ids.reshape(x.shape[:-1])


def argmax_last(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum; NaN counts as the maximum),
    int32. XLA CPU splits a vocabulary-wide reduction into a tree of small ops, so CPU programs
    use the host kernel (one pass), other devices the reductions
    (docs/kernel-notes.md#argmax)."""
    return jax.lax.platform_dependent(x, cpu=_argmax_host, default=_argmax_reductions)


def sample_greedy(logits: jax.Array, with_logprobs: bool) -> tuple[jax.Array, jax.Array]:
    """The common all-greedy, no-penalty step: argmax without the random and sorting work,
    and without the softmax pass over the vocabulary unless a row asked for log-probs."""
    tokens = argmax_last(logits)
    if not with_logprobs:
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[:, None], 1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(logits, axis=-1)


def top_alternatives(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of each row and their model log-probabilities (before
    penalties, temperature or filters, as the chosen token's): ids [B, k] int32, [B, k]."""
    values, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def split_seed(seed: int) -> np.ndarray:
    return np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint32)
