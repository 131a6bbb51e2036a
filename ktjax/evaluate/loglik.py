"""Log-likelihood of continuations that share a context, scored in batches.

Each context is prefilled once; its continuations are then rows of one scoring step whose
block tables all point at the context's KV pages. Only whole pages are shared: a row
re-computes the context's last, partial page (at least one token, so that the logits
predicting the continuation's first token are in the row) and writes it, with its
continuation, into pages of its own. Rows of many contexts share a step, so a step scores
up to MAX_SCORE_TOKENS tokens whatever the number of choices per question.

This drives the engine's compiled programs directly (its step programs for the shared
prefill, its scorer programs for the rows), as Engine.score does for one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ktjax.engine import buckets as bk
from ktjax.engine.engine import Engine
from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.kv_cache import BlockTable
from ktjax.errors import RequestError

SCORE_ROWS = (1, 2, 4, 8, 16, 32, 64)
MAX_SCORE_TOKENS = 1024   # rows x tokens of one scoring step
LOGIT_ROWS = (4, 16, 64, 256, 512)   # continuation tokens per row


@dataclass
class ContextRequest:
    """A context and the continuations to score after it (token ids)."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class _Row:
    request: int           # index of its ContextRequest
    choice: int            # index of its continuation
    table: BlockTable      # the context's shared pages, then pages of its own
    start: int             # tokens cached before the row (the shared, whole pages)
    tokens: list[int]      # the context's tail, then the continuation
    tail: int              # how many of `tokens` are the context's


def fit_to_context(req: ContextRequest, max_model_len: int) -> ContextRequest:
    """Drop context tokens from the left until every continuation fits (as
    lm-evaluation-harness truncates); a continuation that cannot fit is an error."""
    longest = max(len(c) for c in req.continuations)
    if longest + 1 > max_model_len:
        raise RequestError(f"a continuation of {longest} tokens does not fit the context of "
                           f"{max_model_len} tokens (max_model_len)")
    keep = max_model_len - longest
    return ContextRequest(req.context[-keep:], req.continuations)


def score_continuations(engine: Engine, requests: Sequence[ContextRequest],
                        on_scored: Callable[[int], None] | None = None) -> list[list[float]]:
    """Sum of log p(continuation token | everything before it) for each continuation of each
    request. The engine must be idle. `on_scored(n)` after each step that scored n rows."""
    if engine.running or engine.waiting:
        raise RequestError("scoring needs an idle engine")
    ps = engine.page_size
    limit = bk.PREFILL_TOKENS[-1]
    for i, r in enumerate(requests):
        if not r.context or not r.continuations or not all(r.continuations):
            raise RequestError(f"request {i}: needs a non-empty context and continuations")
        if len(r.context) + max(len(c) for c in r.continuations) > engine.max_model_len:
            raise RequestError(f"request {i}: context and continuation exceed max_model_len "
                               f"({engine.max_model_len}); see fit_to_context")
        if max(len(c) for c in r.continuations) + ps > limit:
            raise RequestError(f"request {i}: continuations of up to {limit - ps} tokens are "
                               "supported")
        vocab = engine.programs.vocab
        if any(not 0 <= t < vocab for t in r.context + sum(r.continuations, [])):
            raise RequestError(f"request {i}: a token id is outside the vocabulary")
    results = [[0.0] * len(r.continuations) for r in requests]
    for group in _groups(engine, requests):
        _score_group(engine, requests, group, results, on_scored)
    return results


def _shared_tokens(context_len: int, page_size: int) -> int:
    """Whole pages of the context shared by its rows, leaving at least one token to each row."""
    return (context_len - 1) // page_size * page_size


def _pages_needed(r: ContextRequest, page_size: int) -> int:
    shared = _shared_tokens(len(r.context), page_size)
    own = sum(-(-(len(r.context) + len(c)) // page_size) - shared // page_size
              for c in r.continuations)
    return shared // page_size + own


def _groups(engine: Engine, requests: Sequence[ContextRequest]) -> list[list[int]]:
    """Consecutive requests whose pages fit the pool together, a few steps' worth of rows."""
    budget = engine.pool.free_pages
    groups, current, used, rows = [], [], 0, 0
    for i, r in enumerate(requests):
        need = _pages_needed(r, engine.page_size)
        if need > budget:
            raise RequestError(f"request {i} needs {need} KV pages, the pool has {budget}; "
                               "raise kv_cache_tokens")
        if current and (used + need > budget or rows + len(r.continuations) > 4 * SCORE_ROWS[-1]):
            groups.append(current)
            current, used, rows = [], 0, 0
        current.append(i)
        used += need
        rows += len(r.continuations)
    if current:
        groups.append(current)
    return groups


def _score_group(engine: Engine, requests: Sequence[ContextRequest], group: list[int],
                 results: list[list[float]], on_scored) -> None:
    ps = engine.page_size
    contexts = {i: BlockTable(engine.pool) for i in group}
    rows: list[_Row] = []
    try:
        _prefill_shared(engine, [(contexts[i], requests[i].context[:_shared_tokens(
            len(requests[i].context), ps)]) for i in group])
        for i in group:
            ctx = requests[i].context
            shared = _shared_tokens(len(ctx), ps)
            for j, cont in enumerate(requests[i].continuations):
                table = BlockTable(engine.pool)
                table.pages = contexts[i].pages[:shared // ps]
                table.ensure(len(ctx) + len(cont))
                rows.append(_Row(i, j, table, shared, ctx[shared:] + cont, len(ctx) - shared))
        rows.sort(key=lambda row: len(row.tokens))   # similar lengths pad less
        while rows:   # as many rows as MAX_SCORE_TOKENS holds, padded to their bucket
            n = 1
            while n < len(rows) and n < SCORE_ROWS[-1] and \
                    (n + 1) * bk.round_up(bk.PREFILL_TOKENS, len(rows[n].tokens)) <= \
                    MAX_SCORE_TOKENS:
                n += 1
            for row, value in zip(rows[:n], _score_rows(engine, rows[:n])):
                results[row.request][row.choice] = value
            _release_own(rows[:n], ps)
            rows = rows[n:]
            if on_scored:
                on_scored(n)
    except BaseException:
        engine._recover([])
        raise
    finally:
        _release_own(rows, ps)
        for table in contexts.values():
            table.release()


def _release_own(rows: list[_Row], page_size: int) -> None:
    """Give back each row's own pages (the shared ones go with their context's table)."""
    for row in rows:
        row.table.pool.free(row.table.pages[row.start // page_size:])
        row.table.pages = []


def _prefill_shared(engine: Engine, contexts: list[tuple[BlockTable, list[int]]]) -> None:
    """Write the shared part of each context into its pages, in prefill chunks of several
    contexts per step (the engine's own prefill buckets and programs)."""
    done = [0] * len(contexts)
    while True:
        todo = [k for k, (_, ids) in enumerate(contexts) if done[k] < len(ids)]
        if not todo:
            return
        limit = bk.PREFILL_TOKENS[-1]
        tokens = bk.round_up(bk.PREFILL_TOKENS,
                             max(min(len(contexts[k][1]) - done[k], limit) for k in todo))
        todo = todo[:max(1, min(bk.PREFILL_ROWS[-1], bk.MAX_PREFILL_BATCH_TOKENS // tokens))]
        new = []
        for k in todo:
            table, ids = contexts[k]
            chunk = ids[done[k]:done[k] + min(limit, tokens)]
            table.ensure(done[k] + len(chunk))
            new.append((table, done[k], chunk))
        pages = bk.page_bucket(engine.pool.pages_for(max(done[k] for k in todo)),
                               engine.max_pages)
        bucket = bk.Bucket(bk.round_up(bk.PREFILL_ROWS, len(new)), tokens, pages)
        batch = Engine._batch(new, bucket.rows, tokens, pages)
        program = engine.programs.step(bucket)
        with deferred_interrupts():
            _, engine.kv = program(engine.params, engine.kv, batch)
            for k, (_, _, chunk) in zip(todo, new):
                done[k] += len(chunk)


def _score_rows(engine: Engine, rows: list[_Row]) -> list[float]:
    """One scoring step: each row's summed log-probability of its continuation tokens. Only
    the positions predicting a continuation token go through the output head."""
    tokens = bk.round_up(bk.PREFILL_TOKENS, max(len(r.tokens) for r in rows))
    n_rows = bk.round_up(SCORE_ROWS, len(rows))
    predicted = bk.round_up(LOGIT_ROWS, max(len(r.tokens) - r.tail for r in rows))
    pages = bk.page_bucket(engine.pool.pages_for(max(r.start for r in rows)), engine.max_pages)
    batch = Engine._batch([(r.table, r.start, r.tokens) for r in rows], n_rows, tokens, pages)
    index = np.zeros((n_rows, predicted), np.int32)
    targets = np.zeros((n_rows, predicted), np.int32)
    for k, r in enumerate(rows):
        # logits at position p predict token p + 1: the continuation's tokens [tail, n) are
        # predicted at [tail - 1, n - 1)
        m = len(r.tokens) - r.tail
        index[k, :m] = np.arange(r.tail - 1, len(r.tokens) - 1)
        targets[k, :m] = r.tokens[r.tail:]
    batch = batch.replace(logits_index=index)
    program = engine.programs.scorer(bk.Bucket(n_rows, tokens, pages, predicted))
    with deferred_interrupts():
        logprobs, _, engine.kv = program(engine.params, engine.kv, batch, targets)
    logprobs = np.asarray(logprobs)
    return [float(logprobs[k, :len(r.tokens) - r.tail].sum()) for k, r in enumerate(rows)]
