"""Drafters for speculative decoding: each proposes, for the requests about to decode, up to k
tokens the target then verifies in one step (ktjax.engine.spec_decode)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ktjax.engine.sequence import Sequence


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


def make_drafter(config, target) -> NgramDrafter | None:
    """The drafter EngineConfig.speculative names, for the LLM `target`."""
    if config.speculative is None:
        return None
    if config.speculative == "ngram":
        return NgramDrafter()
    raise ValueError(f"speculative={config.speculative!r}: expected 'ngram' or a GGUF path")
