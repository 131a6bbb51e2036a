#!/usr/bin/env python
"""Time to first token with a shared system prompt, with and without the prefix cache.

  python scripts/bench_prefix.py --model smollm2-135m --system-tokens 2000 --json

Each request is the system prompt + a short question of its own, generating one token (its
wall time is the time to first token). Programs are compiled by a warm-up request of the same
shape on other tokens, so compilation is excluded. Reports the first (cold) request, the
second (its system prompt cached) and their ratio; the same pair without the cache; and
whether the greedy continuations (16 tokens) match with and without the cache.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def ttft(llm, prompt: list[int]) -> float:
    from ktjax import SamplingParams
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - t0


def measure(model: str, system_tokens: int, prefix_caching: bool, repeats: int) -> dict:
    from ktjax import LLM, SamplingParams
    llm = LLM(model, max_model_len=system_tokens + 256, prefix_caching=prefix_caching)
    vocab = llm.engine.programs.vocab
    rng = np.random.default_rng(0)  # the same prompts whatever `repeats` is
    warm_system, system = (rng.integers(100, vocab - 100, system_tokens).tolist()
                           for _ in range(2))
    question = [rng.integers(100, vocab - 100, 24).tolist() for _ in range(2 + repeats)]
    for q in question[:2]:   # compiles the cold and the cached shapes on other tokens
        ttft(llm, warm_system + q)
    cold = ttft(llm, system + question[0])
    cached = [ttft(llm, system + q) for q in question[2:]]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    out = llm.generate([system + question[1]], greedy)[0].token_ids
    return {"prefix_caching": prefix_caching, "first_s": cold,
            "second_s": float(np.median(cached)), "speedup": cold / float(np.median(cached)),
            "hit_pages": llm.engine.pool.prefix.hit_pages, "tokens": out,
            "step_programs": llm.engine.programs.n_step_programs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    on = measure(args.model, args.system_tokens, True, args.repeats)
    off = measure(args.model, args.system_tokens, False, 1)  # every request is cold
    result = {"model": args.model, "system_tokens": args.system_tokens, "cache": on,
              "no_cache": off, "same_tokens": on.pop("tokens") == off.pop("tokens")}
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("cache", "no_cache"):
            r = result[name]
            print(f"{name:9s} first {r['first_s'] * 1e3:8.1f} ms  second {r['second_s'] * 1e3:8.1f}"
                  f" ms  x{r['speedup']:.1f}  ({r['hit_pages']} hit pages)")
        print(f"greedy continuations identical with and without the cache: "
              f"{result['same_tokens']}")


if __name__ == "__main__":
    main()
