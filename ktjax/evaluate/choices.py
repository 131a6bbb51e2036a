"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores it.

Each choice is the continuation `delimiter + choice` of the item's context; the prediction
is the choice of highest summed log-probability (acc), or of highest log-probability per
character of the choice (acc_norm: the harness divides by `len(choice)`, the choice's
characters without the delimiter, which is its byte length for ASCII text). Context and
continuation are tokenized as the harness does: trailing spaces of the context move to the
continuation, the continuation's tokens are those of `context + continuation` past the
context's own tokens, and an empty context becomes the BOS (else EOS) token.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ktjax.errors import RequestError
from ktjax.evaluate.formats import Item
from ktjax.evaluate.loglik import ContextRequest, fit_to_context, score_continuations


@dataclass
class ItemResult:
    id: str
    gold: int
    loglik: list[float]
    pred: int
    pred_norm: int


@dataclass
class Report:
    items: list[ItemResult] = field(default_factory=list)
    seconds: float = 0.0
    continuations: int = 0

    @property
    def acc(self) -> float:
        return float(np.mean([r.pred == r.gold for r in self.items]))

    @property
    def acc_norm(self) -> float:
        return float(np.mean([r.pred_norm == r.gold for r in self.items]))

    def stderr(self, value: float) -> float:
        """Standard error of an accuracy over these items (as the harness reports it)."""
        n = len(self.items)
        return math.sqrt(value * (1 - value) / (n - 1)) if n > 1 else 0.0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's _encode_pair."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [prefix], tokenizer.encode(continuation, add_bos=False)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def requests_for(llm, items: list[Item], delimiter: str = " ") -> list[ContextRequest]:
    reqs = []
    for item in items:
        pairs = [encode_pair(llm.tokenizer, item.context, delimiter + c) for c in item.choices]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):   # cannot happen: the context is encoded alone
            raise RequestError(f"item {item.id}: choices encode different contexts")
        if any(not p[1] for p in pairs):
            raise RequestError(f"item {item.id}: a choice encodes to no tokens")
        reqs.append(fit_to_context(ContextRequest(ctx, [p[1] for p in pairs]),
                                   llm.engine.max_model_len))
    return reqs


def evaluate(llm, items: list[Item], delimiter: str = " ",
             on_scored: Callable[[int], None] | None = None) -> Report:
    """Score every choice of every item (batched, each context prefilled once)."""
    reqs = requests_for(llm, items, delimiter)
    t0 = time.perf_counter()
    with llm._lock:
        lls = score_continuations(llm.engine, reqs, on_scored)
    report = Report(seconds=time.perf_counter() - t0,
                    continuations=sum(len(r.continuations) for r in reqs))
    for item, ll in zip(items, lls):
        lengths = np.array([float(len(c)) for c in item.choices])
        report.items.append(ItemResult(item.id, item.gold, ll, int(np.argmax(ll)),
                                       int(np.argmax(np.array(ll) / lengths))))
    return report
