"""SamplingParams: what a request asks of the sampler, validated when it is made."""
from __future__ import annotations

from dataclasses import dataclass, field

from ktjax.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow vLLM: temperature 1, no top-k/top-p/min-p filtering, no penalties.

    temperature 0 is greedy. top_k 0 disables top-k. Penalties look at the last
    `penalty_last_n` tokens of prompt + output (llama.cpp's window; 0 = none, -1 = all).
    `logprobs=True` returns the model's log-probability of each chosen token (before any
    penalty, temperature or filter). `seed` makes sampling reproducible per request.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("penalty_last_n", self.penalty_last_n >= -1, "must be >= -1"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be a non-negative int"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise RequestError("SamplingParams.stop must not contain an empty string")
