"""Drafters for speculative decoding: each proposes, for the requests about to decode, up to k
tokens the target then verifies in one step (ktjax.engine.spec_decode)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ktjax.engine import buckets as bk
from ktjax.engine.engine import penalty_window
from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.kv_cache import BlockTable
from ktjax.engine.sampler import _row_key, argmax_last
from ktjax.engine.scheduler import StepPlan
from ktjax.engine.sequence import Sequence
from ktjax.engine.spec_decode import target_logprobs
from ktjax.errors import KtjaxError, UnsupportedModelError

_DRAFT_STREAM = 0x5EC3


@dataclass
class Draft:
    """Draft tokens of one request; `probs` [len(tokens), V]: the distribution each was drawn
    from (None: certain, as prompt lookup's)."""

    tokens: list[int]
    probs: np.ndarray | None = None


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the request's
    last n tokens (n from max_n down to min_n), from its prompt and output. Free to run, and
    right often where the output copies its input (edits, summaries, code)."""

    draft_probs = False

    def __init__(self, max_n: int = 3, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], room: dict[int, int]) -> dict[int, Draft]:
        out = {}
        for s in seqs:
            tokens = self.lookup(s.all_ids, room[s.request_id])
            if tokens:
                out[s.request_id] = Draft(tokens)
        return out

    def lookup(self, ids: list[int], k: int) -> list[int]:
        arr = np.asarray(ids, np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(arr[:-1], n)          # every earlier n-gram
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = hits[-1] + n
                return arr[start:start + k].tolist()
        return []

    def forget(self, seqs: list[Sequence]) -> None:
        """Nothing is kept per request."""


class _DraftRow:
    """A target request's state in the draft model's cache: its pages, the tokens written."""

    def __init__(self, pool):
        self.table = BlockTable(pool)
        self.fed: list[int] = []      # tokens whose K/V the draft cache holds, in order
        self.n_cached = 0


class DraftModelDrafter:
    """A smaller model with the same vocabulary drafts k tokens autoregressively (k programs
    of its own engine per step: the catch-up chunk of tokens it has not seen, then k - 1
    single-token decodes), each drawn from its distribution under the request's sampling
    parameters (greedy rows: its argmax), which the target's rejection rule needs."""

    draft_probs = True

    def __init__(self, engine):
        self.engine = engine
        self.rows: dict[int, _DraftRow] = {}
        self._sample = jax.jit(_draft_sample)

    def propose(self, seqs: list[Sequence], room: dict[int, int]) -> dict[int, Draft]:
        eng = self.engine
        rows, feeds = [], []
        with deferred_interrupts():
            for s in seqs:
                row = self.rows.setdefault(s.request_id, _DraftRow(eng.pool))
                ids = s.all_ids
                keep = 0  # the draft cache's tokens still on the request's path
                while keep < min(len(row.fed), len(ids) - 1) and row.fed[keep] == ids[keep]:
                    keep += 1
                row.n_cached, row.fed = keep, row.fed[:keep]
                feed = ids[keep:]
                if row.table.missing(len(ids) + room[s.request_id]) > eng.pool.free_pages:
                    continue  # no room in the draft's pool: no draft this time
                row.table.ensure(len(ids) + room[s.request_id])
                rows.append((s, row))
                feeds.append(feed)
        if not rows:
            return {}
        k = max(room[s.request_id] for s, _ in rows)
        drafts = {s.request_id: ([], []) for s, _ in rows}
        for i in range(k):
            live = [(s, row, f) for (s, row), f in zip(rows, feeds)
                    if i < room[s.request_id]]
            tokens, probs = self._draft_step(live, i)
            for r, (s, row, f) in enumerate(live):
                drafts[s.request_id][0].append(int(tokens[r]))
                drafts[s.request_id][1].append(probs[r])
            feeds = [[int(tokens[r])] for r in range(len(live))]
            rows = [(s, row) for s, row, _ in live]
        return {rid: Draft(t, np.stack(p)) for rid, (t, p) in drafts.items()}

    def _draft_step(self, live, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The draft engine's programs over `live` (request, draft row, tokens to feed): the
        next draft token of each and its distribution. Long catch-ups run in chunks first."""
        limit = bk.PREFILL_TOKENS[-1]
        behind = [(row, f[:-1]) for _, row, f in live if len(f) > 1]
        for start in range(0, len(behind), bk.PREFILL_ROWS[-1]):
            group = behind[start:start + bk.PREFILL_ROWS[-1]]
            while any(group_f for _, group_f in group):
                chunks = [(row, f[:limit]) for row, f in group if f]
                self._run(StepPlan(chunks=chunks))
                group = [(row, f[limit:]) for row, f in group]
        tokens, probs = [], []
        for start in range(0, len(live), bk.DECODE_ROWS[-1]):
            group = live[start:start + bk.DECODE_ROWS[-1]]
            plan = StepPlan(decode=[(row, f[-1:]) for _, row, f in group])
            t, p = self._run(plan, [s for s, _, _ in group], i)
            tokens.append(t)
            probs.append(p)
        return np.concatenate(tokens), np.concatenate(probs)

    def _run(self, plan: StepPlan, seqs: list[Sequence] | None = None, i: int = 0):
        """Run `plan` on the draft engine, its rows' tokens then written; with `seqs`, the
        draft token of each decode row and its distribution."""
        eng = self.engine
        bucket = eng._bucket(plan)
        batch = eng._packed_batch(plan, bucket)
        program = eng.programs.step(bucket)
        with deferred_interrupts():
            logits, eng.kv = program(eng.params, eng.kv, batch)
            for row, f in plan.decode + plan.chunks:
                row.fed += f
                row.n_cached += len(f)
        if seqs is None:
            return None
        rows = seqs + [None] * (bucket.logit_rows - len(seqs))
        sb = eng._sampling_batch(rows, bucket.logit_rows, penalty_window(seqs),
                                 eng.programs.vocab)
        tokens, probs = self._sample(logits[0], sb.replace(step=sb.step + i))
        return np.asarray(tokens)[:len(seqs)], np.asarray(probs)[:len(seqs)]

    def forget(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            row = self.rows.pop(s.request_id, None)
            if row is not None:
                row.table.release()


def _draft_sample(logits: jax.Array, sb) -> tuple[jax.Array, jax.Array]:
    """Draw each row's draft token from the distribution the target's sampler would use
    (spec_decode.target_logprobs), on a key stream of its own; returns (tokens, probs)."""
    lp = target_logprobs(logits, sb)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(_row_key(seed, step),
                                                           _DRAFT_STREAM))(sb.seed, sb.step)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(keys)
    return argmax_last(lp + gumbel), jnp.exp(lp)


def make_drafter(config, vocab_size: int) -> NgramDrafter | DraftModelDrafter | None:
    """The drafter EngineConfig.speculative names: 'ngram', or a draft GGUF loaded with the
    target's settings (its vocabulary must be the target's)."""
    if config.speculative is None:
        return None
    if not isinstance(config.speculative, (str, os.PathLike)):
        raise KtjaxError(f"speculative={config.speculative!r}: expected 'ngram' or the path "
                         f"of a draft GGUF")
    if not isinstance(config.spec_tokens, int) or config.spec_tokens < 1:
        raise KtjaxError(f"spec_tokens={config.spec_tokens!r}: speculative decoding needs at "
                         f"least 1 draft token per step")
    if str(config.speculative) == "ngram":
        return NgramDrafter()
    from ktjax.api import LLM  # the draft is loaded as a model of its own
    draft = LLM(config.speculative, dataclasses.replace(config, speculative=None,
                                                        prefix_caching=False, device=None))
    if draft.config.vocab_size != vocab_size:
        raise UnsupportedModelError(
            f"draft model {config.speculative}: vocabulary of {draft.config.vocab_size} "
            f"tokens, the target's has {vocab_size}; speculative decoding needs the same")
    drafter = DraftModelDrafter(draft.engine)
    drafter.llm = draft  # keeps its host weights alive
    return drafter
