#!/usr/bin/env python
"""Perplexity with llama.cpp's protocol (llama-perplexity), so the numbers compare:

the text is tokenized once (with BOS when the model adds one), cut into chunks of --ctx
tokens, the first token of each chunk is replaced by BOS (same condition), and only the
second half of each chunk is scored: logits at position j predict token j + 1 for
j in [ctx/2, ctx - 1).

  python scripts/perplexity.py smollm2-135m /usr/share/common-licenses/Apache-2.0 --ctx 256
"""
from __future__ import annotations

import argparse
import math
import time


def perplexity(llm, text: str, ctx: int, max_chunks: int | None = None) -> tuple[float, int]:
    tok = llm.tokenizer
    add_bos = tok.add_bos and tok.bos_id is not None
    ids = tok.encode(text, add_bos=add_bos)
    n_chunks = len(ids) // ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise SystemExit(f"need at least {ctx} tokens, the text has {len(ids)}")
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
        print(f"[{i + 1}] {math.exp(nll / count):.4f}", flush=True)
    return math.exp(nll / count), n_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="GGUF path or catalog name")
    ap.add_argument("textfile")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    ap.add_argument("--all-device", action="store_true",
                    help="every weight in XLA in float32 (no host kernels, no int8 activations)")
    a = ap.parse_args()
    from ktjax import LLM
    extra = dict(host_linears=False, dtype="float32") if a.all_device else {}
    llm = LLM(a.model, max_model_len=a.ctx + 1, kv_cache_tokens=a.ctx + 16, **extra)
    with open(a.textfile, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    ppl, n = perplexity(llm, text, a.ctx, a.chunks)
    print(f"{n} chunks of {a.ctx} tokens in {time.perf_counter() - t0:.1f} s")
    print(f"PPL = {ppl:.4f}")


if __name__ == "__main__":
    main()
