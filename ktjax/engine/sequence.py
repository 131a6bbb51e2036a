"""Per-request state while it is scheduled: tokens, KV pages, detokenized text, stop checks."""
from __future__ import annotations

from ktjax.engine.kv_cache import BlockTable, PagePool
from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams


class Sequence:
    def __init__(self, request_id: int, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, pool: PagePool, decoder, stop_ids: frozenset[int],
                 max_model_len: int, seed: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.table = BlockTable(pool)
        self.decoder = decoder
        self.stop_ids = (frozenset() if params.ignore_eos else stop_ids) | \
            frozenset(params.stop_token_ids)
        self.max_len = min(len(prompt_ids) + params.max_tokens, max_model_len)
        self.seed = seed
        self.n_cached = 0          # tokens whose K/V are in the cache
        self.page_keys: list[bytes] = []   # prefix-cache keys of its full pages (so far)
        self.n_registered = 0      # of its pages, those offered to the prefix cache
        self.preempted = 0         # times its pages were taken back (recomputed after)
        self.drafted = 0           # draft tokens proposed for it, and accepted
        self.accepted = 0
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # when params.top_logprobs
        self.text = ""
        self._emitted = 0          # characters of `text` already streamed
        self.finish_reason: str | None = None

    @property
    def prefill_target(self) -> int:
        """Tokens to write before it decodes: the prompt; after a preemption every token but
        the last, which the next decode step feeds."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < self.prefill_target

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def append(self, token: int, logprob: float,
               top: list[tuple[int, float]] | None = None) -> None:
        """Record a sampled token (with its step's most likely alternatives when asked) and
        decide whether the sequence is done."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.decoder.flush()
            return
        searched = len(self.text)
        self.text += self.decoder.push(token)
        if self._truncate_at_stop_string(searched):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens or \
                len(self.prompt_ids) + len(self.output_ids) >= self.max_len:
            self.finish_reason = "length"
            searched = len(self.text)
            self.text += self.decoder.flush()
            self._truncate_at_stop_string(searched)

    def _truncate_at_stop_string(self, searched: int) -> bool:
        # Text before `searched` held no match, so a new one overlaps the new characters.
        start = max(0, searched - max((len(s) for s in self.params.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def take_new_text(self) -> str:
        """Text not yet streamed, holding back what could still become a stop string."""
        hold = 0 if self.finished else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        piece, self._emitted = self.text[self._emitted:end], end
        return piece

    def output(self) -> RequestOutput:
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_ids, text=self.text,
                             token_ids=list(self.output_ids),
                             finish_reason=self.finish_reason or "length",
                             logprobs=list(self.logprobs) if self.params.logprobs else None,
                             top_logprobs=list(self.top_logprobs)
                             if self.params.top_logprobs else None)
