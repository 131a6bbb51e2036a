#!/usr/bin/env python
"""Decode throughput with speculative decoding against plain decoding, on CPU.

  python scripts/bench_spec.py --model smollm2-135m --spec ngram --spec-tokens 4 --json

Two tasks through the model's chat template, greedy: a repetitive one (rewrite a given text
with its typos fixed: the output copies the input, where prompt lookup drafts well) and open
chat. Decode tokens/s is timed from the first token to the last (prefill and compilation
excluded: each configuration runs the task once before it is timed; then --rounds
alternating runs, the best of each kept, as the host's speed drifts). Reports tokens/s with
and without drafting, the gain, the acceptance rate (accepted / drafted tokens), tokens per
verify step, and whether the greedy outputs are identical.
"""
from __future__ import annotations

import argparse
import json
import time

TEXT = (
    "The Industrial Revolution began in Britain in the late eighteenth century. It changd how "
    "goods were made: work moved from homes and small workshops to factorys with machines "
    "driven by water and later by steam. Textile mills were among the first, and the spinning "
    "jenny and the power loom multiplied what one worker could produce. Coal and iron became "
    "the backbone of the economy, canals and then railways carried raw materials and products "
    "across the country, and cities grew quickly as people left the countryside to find work. "
    "Living conditions in the new industrial towns were often poor, with long working hours, "
    "child labour and crowded housing, which led over time to reforms and to the first labour "
    "unions.")
TASKS = {
    "edit": f"Rewrite the following text exactly, only fixing its spelling mistakes:\n\n{TEXT}",
    "chat": "What are some good habits for staying healthy while working from home?",
}


def decode_rate(llm, prompt: list[int], max_tokens: int) -> tuple[float, list[int], object]:
    from ktjax import SamplingParams
    eng = llm.engine
    seq = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while not seq.output_ids:
        eng.step()
    t0 = time.perf_counter()
    steps = 0
    while not seq.finished:
        eng.step()
        steps += 1
    rate = (len(seq.output_ids) - 1) / (time.perf_counter() - t0)
    return rate, list(seq.output_ids), (seq, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="ngram", help="'ngram' or a draft GGUF")
    ap.add_argument("--spec-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from ktjax import LLM
    plain = LLM(args.model, max_model_len=1024)
    spec = LLM(args.model, max_model_len=1024, speculative=args.spec,
               spec_tokens=args.spec_tokens)
    result = {"model": args.model, "spec": args.spec, "spec_tokens": args.spec_tokens,
              "tasks": {}}
    for name, text in TASKS.items():
        prompt = plain.chat_prompt([{"role": "user", "content": text}])
        row = {}
        for llm in (plain, spec):
            decode_rate(llm, prompt, args.max_tokens)            # compiles, warms the cache
        for _ in range(args.rounds):  # alternating, best of: a shared host's speed drifts
            for label, llm in (("plain", plain), ("spec", spec)):
                rate, out, (seq, steps) = decode_rate(llm, prompt, args.max_tokens)
                if rate > row.get(label, {}).get("tok_s", 0):
                    row[label] = {"tok_s": rate, "tokens": len(out), "steps": steps}
                row[label + "_out"] = out
                if label == "spec":
                    row["acceptance"] = seq.accepted / max(1, seq.drafted)
                    row["drafted"], row["accepted"] = seq.drafted, seq.accepted
                    row["tokens_per_step"] = (len(out) - 1) / max(1, steps)
        row["gain"] = row["spec"]["tok_s"] / row["plain"]["tok_s"]
        row["identical"] = row.pop("plain_out") == row.pop("spec_out")
        result["tasks"][name] = row
    result["step_programs"] = {"plain": plain.engine.programs.n_step_programs,
                               "spec": spec.engine.programs.n_step_programs}
    if args.json:
        print(json.dumps(result))
        return
    for name, row in result["tasks"].items():
        print(f"{name:5s} plain {row['plain']['tok_s']:6.1f} tok/s  spec {row['spec']['tok_s']:6.1f}"
              f" tok/s  x{row['gain']:.2f}  acceptance {row['acceptance']:.0%} "
              f"({row['accepted']}/{row['drafted']})  {row['tokens_per_step']:.2f} tok/step"
              f"  identical: {row['identical']}")


if __name__ == "__main__":
    main()
