"""SamplingParams: what a request asks of the sampler, validated when it is made."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from ktjax.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow vLLM: temperature 1, no top-k/top-p/min-p filtering, no penalties.

    temperature 0 is greedy. top_k 0 disables top-k. Penalties look at the last
    `penalty_last_n` tokens of prompt + output (llama.cpp's window; 0 = none, -1 = all).
    `logprobs=True` returns the model's log-probability of each chosen token (before any
    penalty, temperature or filter); `top_logprobs=k` (with logprobs) also the k most likely
    tokens of each step and their log-probabilities. `seed` makes sampling reproducible per
    request.
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
    top_logprobs: int = 0

    def __post_init__(self):
        # Types first (a str max_tokens or an int stop string failed later, inside a step),
        # normalized to Python int / float / bool; then ranges, including what the on-device
        # sampler holds: float32 parameters, an int32 top_k.
        for name in ("max_tokens", "top_k", "penalty_last_n", "top_logprobs"):
            self._set(name, _integer(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            self._set(name, _real(name, getattr(self, name)))
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _fail(name, "must be a bool", getattr(self, name))
            self._set(name, bool(getattr(self, name)))
        if self.seed is not None:
            self._set("seed", _integer("seed", self.seed))
        self._set("stop", _stop_strings(self.stop))
        self._set("stop_token_ids", _token_ids(self.stop_token_ids))
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", 0 <= self.top_k < 2**31, "must be in [0, 2**31) (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", np.float32(self.repetition_penalty) > 0,
             "must be > 0 (as a float32)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("penalty_last_n", self.penalty_last_n >= -1, "must be >= -1 (-1: all tokens)"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "must be in [0, 2**64)"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("top_logprobs", self.logprobs or not self.top_logprobs, "needs logprobs=True"),
        ]
        for name, ok, rule in checks:
            if not ok:
                _fail(name, rule, getattr(self, name))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_TOP_LOGPROBS = 20  # alternatives per token; steps that return any return this many


def _fail(name: str, rule: str, value) -> NoReturn:
    raise RequestError(f"SamplingParams.{name} {rule}, got {value!r:.80}")


def _integer(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(name, "must be an int", value)
    return int(value)


def _real(name: str, value) -> float:
    """A finite number that float32 holds (the sampler's parameters are float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(name, "must be a number", value)
    x = float(value)
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        _fail(name, "must be finite (and within float32's range)", value)
    return x


def _stop_strings(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        _fail("stop", "must be a str or a list of str", stop)
    for s in stop:
        if not isinstance(s, str):
            _fail("stop", "must hold only str", s)
        if not s:
            _fail("stop", "must not contain an empty string", s)
    return tuple(stop)


def _token_ids(ids) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple, np.ndarray)):
        _fail("stop_token_ids", "must be a list of int", ids)
    out = tuple(_integer("stop_token_ids", t) for t in ids)
    if any(t < 0 for t in out):
        _fail("stop_token_ids", "must hold non-negative token ids", ids)
    return out
