"""Speculative decoding: the rejection rule on the device and the acceptance walk on the host.

A decode row of a speculating step feeds its last token and m draft tokens d_1..d_m; the target
gives a logit row for each. Logit row j holds the target's distribution p_j of the token after
d_j (d_0 = the last token); the draft token checked against it is d_{j+1}. The standard rule
(Leviathan et al. 2023, Chen et al. 2023): accept d_{j+1} with probability min(1, p(d)/q(d));
at the first rejection emit a sample of norm(max(p - q, 0)) and stop; when all m pass, emit a
sample of p_m. The emitted tokens then follow p exactly, whatever q is. A prompt-lookup draft
is certain (q = one-hot), so p(d) is its acceptance and the residual is p without d. Greedy
rows (temperature 0) have a one-hot p: a draft passes iff it is the argmax, and the output is
plain greedy decoding's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax import pytree
from ktjax.engine.sampler import (SamplingBatch, _row_key, apply_penalties, argmax_last,
                                  filtered_candidates)

# fold_in constants: the rule's uniforms and residual draws are independent of `sample`'s
_ACCEPT_STREAM = 0x5EC1
_RESIDUAL_STREAM = 0x5EC2


@pytree.dataclass
class Verdict:
    """Per logit row: whether its draft token passes, the residual sample to emit at a
    rejection, and the model log-probs of the draft and residual tokens."""

    accept: jax.Array
    residual: jax.Array
    draft_logprob: jax.Array
    residual_logprob: jax.Array


def target_logprobs(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """[B, V] log-probabilities of the distribution `sampler.sample` draws each row from
    (penalties, temperature, top-k / top-p / min-p over sampler.CANDIDATES, greedy one-hot);
    -inf outside its support."""
    logits = apply_penalties(logits, sb)
    b, v = logits.shape
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp
    full = jax.nn.log_softmax(scaled, axis=-1)
    cand_logits, cand_ids, keep = filtered_candidates(scaled, sb)
    kept = jnp.where(keep, cand_logits, -jnp.inf)
    kept = kept - jax.nn.logsumexp(kept, axis=-1, keepdims=True)
    rows = jnp.arange(b)[:, None]
    filtered = jnp.full((b, v), -jnp.inf).at[rows, cand_ids].set(kept)
    greedy = jnp.where(jnp.arange(v)[None, :] == argmax_last(logits)[:, None], 0.0, -jnp.inf)
    uses_filter = ((sb.top_k > 0) | (sb.top_p < 1) | (sb.min_p > 0))[:, None]
    return jnp.where(sb.temperature[:, None] <= 0, greedy,
                     jnp.where(uses_filter, filtered, full))


def verify_sample(logits: jax.Array, sb: SamplingBatch, draft: jax.Array,
                  draft_probs: jax.Array | None = None) -> Verdict:
    """The rejection rule of each logit row [R, V] against its draft token `draft` [R] (-1:
    none; the verdict is then unused), whose drafter gave it probability draft_probs [R, V]
    (None: the draft was certain). sb's `step` is the index of the token row r emits."""
    lp = target_logprobs(logits, sb)
    p = jnp.exp(lp)
    d = jnp.maximum(draft, 0)[:, None]
    p_d = jnp.take_along_axis(p, d, 1)[:, 0]
    keys = jax.vmap(_row_key)(sb.seed, sb.step)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _ACCEPT_STREAM)))(keys)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, _RESIDUAL_STREAM),
                                                  (logits.shape[-1],)))(keys)
    if draft_probs is None:
        accept = u < p_d
        residual_lp = jnp.where(jnp.arange(p.shape[-1])[None, :] == d, -jnp.inf, lp)
    else:
        q_d = jnp.take_along_axis(draft_probs, d, 1)[:, 0]
        accept = u * q_d < p_d
        residual_lp = jnp.log(jnp.maximum(p - draft_probs, 0.0))
    residual = argmax_last(residual_lp + gumbel)
    # nothing left (p == q): the draft always passes and the residual is never used
    residual = jnp.where(jnp.isfinite(residual_lp).any(-1), residual, argmax_last(lp))
    model = jax.nn.log_softmax(logits, axis=-1)
    return Verdict(accept=accept, residual=residual,
                   draft_logprob=jnp.take_along_axis(model, d, 1)[:, 0],
                   residual_logprob=jnp.take_along_axis(model, residual[:, None], 1)[:, 0])


def accept_greedy(drafts: list[int], argmax: list[int]) -> int:
    """Drafts that pass greedy verification: the longest prefix equal to the target's
    argmax at the position before each (argmax[j] checks drafts[j])."""
    n = 0
    while n < len(drafts) and drafts[n] == argmax[n]:
        n += 1
    return n


def accept_sampled(accept: list[bool]) -> int:
    """Drafts that pass the rejection rule: those before the first rejection."""
    n = 0
    while n < len(accept) and accept[n]:
        n += 1
    return n
