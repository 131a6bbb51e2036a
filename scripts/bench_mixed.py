#!/usr/bin/env python
"""How long running streams wait while a long prompt arrives, per step token budget.

  python scripts/bench_mixed.py --model smollm2-135m --prompt-tokens 2000 --budgets 256,512,2048

Four requests are decoding when a prompt of --prompt-tokens arrives; its prefill runs in
chunks beside their decode rows (mixed steps). Reports, per max_step_tokens: the streams'
median and longest gap between tokens while the prompt prefills, the prompt's time to first
token, and the step programs compiled. Compilation is excluded (a first identical round).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def one_round(llm, streams: list[list[int]], prompt: list[int]) -> dict:
    from ktjax import SamplingParams
    eng = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    running = [eng.add_request(p, params) for p in streams]
    while any(s.in_prefill or not s.output_ids for s in running):
        eng.step()
    long_ = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                   ignore_eos=True))
    gaps, t0 = [], time.perf_counter()
    last = t0
    while not long_.finished:
        eng.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    ttft = time.perf_counter() - t0
    eng.abort(running)
    return {"gap_median_s": float(np.median(gaps)), "gap_max_s": max(gaps), "ttft_s": ttft,
            "steps": len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--budgets", default="256,512,2048")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from ktjax import LLM
    out = {"model": args.model, "prompt_tokens": args.prompt_tokens, "budgets": {}}
    for budget in map(int, args.budgets.split(",")):
        llm = LLM(args.model, max_model_len=args.prompt_tokens + 512, max_step_tokens=budget,
                  prefix_caching=False)
        rng = np.random.default_rng(0)
        vocab = llm.engine.programs.vocab
        streams = [rng.integers(100, vocab - 100, 40).tolist() for _ in range(4)]
        prompt = rng.integers(100, vocab - 100, args.prompt_tokens).tolist()
        one_round(llm, streams, prompt)          # compiles
        r = one_round(llm, streams, prompt)
        r["step_programs"] = llm.engine.programs.n_step_programs
        out["budgets"][budget] = r
        if not args.json:
            print(f"max_step_tokens {budget:5d}: stream gap median {r['gap_median_s']:.3f} s, "
                  f"max {r['gap_max_s']:.3f} s; prompt TTFT {r['ttft_s']:.2f} s in "
                  f"{r['steps']} steps; {r['step_programs']} programs")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
