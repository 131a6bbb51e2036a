"""OpenAI request bodies -> validated generation requests; problems -> OpenAI-style errors.

Every field is checked here, before anything is queued, so a bad request gets a 4xx naming the
field (`param`) instead of a failure inside a step."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ktjax.errors import KtjaxError
from ktjax.sampling_params import SamplingParams

MAX_N = 16                # choices per request
MAX_STOP = 16             # stop strings per request (OpenAI: 4)
MAX_TOP_LOGPROBS = 20     # alternatives per token (OpenAI chat: 20, completions: 5)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class ModelContext:
    """What validation needs to know of the served model."""

    name: str
    max_model_len: int
    encode: Callable[[str], list[int]]
    chat_prompt: Callable[[list[dict]], list[int]]
    vocab_size: int


@dataclass
class GenerationRequest:
    """One API call: `prompts` (token ids, with their text when given as text), each run `n`
    times with `params` (seeded per choice)."""

    prompts: list[list[int]]
    prompt_texts: list[str | None]
    params: list[SamplingParams]          # per prompt (max_tokens depends on its length)
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None              # None: no logprobs; else alternatives per token
    echo: bool = False
    choice_params: list[list[SamplingParams]] = field(default_factory=list)

    def __post_init__(self):
        # n choices of one prompt differ by seed when one is given (identical when greedy)
        for p in self.params:
            self.choice_params.append(
                [p if p.seed is None else _replace_seed(p, (p.seed + j) % 2**64)
                 for j in range(self.n)])


def _replace_seed(p: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(p, seed=seed)


# ---- field readers ----------------------------------------------------------------------------
def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {v!r:.60}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be in [{lo}, {hi}], got {v}")
    return v


def _num(body: dict, name: str, default: float, lo: float, hi: float,
         open_lo: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a finite number, got {v!r:.60}")
    if v < lo or v > hi or (open_lo and v == lo):
        raise bad(name, f"'{name}' must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean, got {v!r:.60}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' holds at most {MAX_STOP} strings, got {len(stops)}")
    return tuple(stops)


def _token_list(v: Any, vocab: int, name: str) -> list[int] | None:
    """v as a list of token ids, or None when it is not a list of ints."""
    if not isinstance(v, list) or not v or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return None
    bad_ids = [t for t in v if not 0 <= t < vocab]
    if bad_ids:
        raise bad(name, f"token id {bad_ids[0]} in '{name}' is outside the vocabulary "
                        f"(0..{vocab - 1})")
    return v


def _check_model(body: dict, ctx: ModelContext) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required (a string); this server has "
                           f"'{ctx.name}'")
    if model != ctx.name:
        raise APIError(404, f"the model '{model}' does not exist; this server has "
                            f"'{ctx.name}'", "model", "model_not_found")


def _unsupported(body: dict) -> None:
    if body.get("logit_bias"):
        raise bad("logit_bias", "'logit_bias' is not supported")
    if body.get("suffix") is not None:
        raise bad("suffix", "'suffix' is not supported")
    tools = body.get("tools")
    if tools:
        raise bad("tools", "'tools' (function calling) is not supported")


def _sampling(body: dict, max_tokens: int, top_logprobs: int | None) -> SamplingParams:
    """SamplingParams from the OpenAI fields (and vLLM's extras: top_k, min_p,
    repetition_penalty, ignore_eos, stop_token_ids)."""
    top_k = _int(body, "top_k", 0, -1, 2**31 - 1)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or \
            not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
        raise bad("stop_token_ids", "'stop_token_ids' must be a list of token ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_num(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
            top_k=max(top_k, 0),
            min_p=_num(body, "min_p", 0.0, 0.0, 1.0),
            presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, 10.0, open_lo=True),
            seed=_int(body, "seed", None, 0, 2**63 - 1),
            stop=_stop(body), stop_token_ids=tuple(stop_ids),
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=top_logprobs is not None,
            **({"top_logprobs": top_logprobs} if top_logprobs else {}))
    except KtjaxError as e:  # a range SamplingParams holds tighter than the checks above
        raise bad(None, str(e)) from e


def _max_tokens(body: dict, prompt_len: int, ctx: ModelContext, default: int | None) -> int:
    """max_tokens, checked against the context (OpenAI's context_length_exceeded)."""
    names = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    n = _int(body, names[0], None, 1) if names else None
    room = ctx.max_model_len - prompt_len
    if room < 1:
        raise bad("messages" if "messages" in body else "prompt",
                  f"this model's maximum context length is {ctx.max_model_len} tokens; the "
                  f"prompt has {prompt_len}, leaving no room to generate",
                  "context_length_exceeded")
    if n is None:
        return min(default, room) if default is not None else room
    if n > room:
        raise bad(names[0], f"this model's maximum context length is {ctx.max_model_len} "
                            f"tokens; you requested {prompt_len + n} ({prompt_len} in the "
                            f"prompt, {n} for the completion)", "context_length_exceeded")
    return n


def _common(body: dict, ctx: ModelContext) -> tuple[int, bool, bool]:
    _check_model(body, ctx)
    _unsupported(body)
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", "'best_of' other than 'n' is not supported")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    include_usage = _bool(options or {}, "include_usage", False)
    return n, stream, include_usage


# ---- the two endpoints --------------------------------------------------------------------------
def parse_completion(body: Any, ctx: ModelContext) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    n, stream, include_usage = _common(body, ctx)
    raw = body.get("prompt")
    if isinstance(raw, str):
        raw = [raw]
    elif _token_list(raw, ctx.vocab_size, "prompt") is not None:
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise bad("prompt", "'prompt' must be a string, a list of strings, a list of token "
                            "ids or a list of such lists")
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            if not p:
                raise bad("prompt", "'prompt' must not be empty")
            prompts.append(ctx.encode(p))
            texts.append(p)
        else:
            ids = _token_list(p, ctx.vocab_size, "prompt")
            if ids is None:
                raise bad("prompt", "each prompt must be a non-empty string or list of "
                                    "token ids")
            prompts.append(ids)
            texts.append(None)
    lp = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _bool(body, "echo", False)
    if echo and lp is not None:
        raise bad("echo", "'echo' together with 'logprobs' is not supported")
    params = [_sampling(body, _max_tokens(body, len(ids), ctx, COMPLETION_DEFAULT_MAX_TOKENS),
                        lp) for ids in prompts]
    return GenerationRequest(prompts, texts, params, n, stream, include_usage, lp, echo)


def _message_text(m: Any, i: int) -> dict:
    if not isinstance(m, dict):
        raise bad(f"messages[{i}]", f"messages[{i}] must be an object")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of "
                                         f"{', '.join(CHAT_ROLES)}, got {role!r:.40}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body: Any, ctx: ModelContext) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    n, stream, include_usage = _common(body, ctx)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    msgs = [_message_text(m, i) for i, m in enumerate(messages)]
    try:
        ids = ctx.chat_prompt(msgs)
    except KtjaxError as e:
        raise bad("messages", f"the chat template failed: {e}") from e
    if not ids:
        raise bad("messages", "the rendered chat prompt is empty")
    top = None
    if _bool(body, "logprobs", False):
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    params = _sampling(body, _max_tokens(body, len(ids), ctx, None), top)
    return GenerationRequest([ids], [None], [params], n, stream, include_usage, top)
