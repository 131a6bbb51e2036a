"""Perplexity with llama.cpp's protocol (llama-perplexity), so the numbers compare:

the text is tokenized once (with BOS when the model adds one), cut into chunks of `ctx`
tokens, the first token of each chunk is replaced by BOS (same condition), and only the
second half of each chunk is scored: logits at position j predict token j + 1 for
j in [ctx/2, ctx - 1).
"""
from __future__ import annotations

import math
from typing import Callable

from ktjax.errors import RequestError


def perplexity(llm, text: str, ctx: int, max_chunks: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> tuple[float, int]:
    """(perplexity, chunks scored) of `text` under `llm` (an LLM whose context holds `ctx`
    tokens); `on_chunk(i, running_ppl)` after each chunk, as llama-perplexity prints them."""
    if ctx < 4:
        raise RequestError(f"the chunk size must be at least 4 tokens, got {ctx}")
    tok = llm.tokenizer
    add_bos = tok.add_bos and tok.bos_id is not None
    ids = tok.encode(text, add_bos=add_bos)
    n_chunks = len(ids) // ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise RequestError(f"perplexity needs at least {ctx} tokens (one chunk), the text has "
                           f"{len(ids)}")
    first = ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunks):
        chunk = ids[i * ctx:(i + 1) * ctx]
        if add_bos:
            chunk[0] = tok.bos_id
        logprobs = llm.score(chunk)              # logprobs[j] = log p(chunk[j+1] | chunk[:j+1])
        scored = logprobs[first:ctx - 1]
        nll -= float(scored.sum())
        count += len(scored)
        if on_chunk:
            on_chunk(i + 1, math.exp(nll / count))
    return math.exp(nll / count), n_chunks
