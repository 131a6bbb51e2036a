"""What generation returns."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """One finished request. finish_reason: 'stop' (EOS, stop token or stop string) or
    'length' (max_tokens or the context limit) or 'abort' (ended early: a failed step, an
    interrupt, a stream closed before its end). logprobs: the model's log-probability of each
    generated token, when SamplingParams.logprobs was set; top_logprobs: each step's
    SamplingParams.top_logprobs most likely (token id, log-prob) pairs, when set."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
