#!/usr/bin/env python
"""Frequency placement of routed experts: route a calibration text through the model (CPU
program), count how often each (block, expert) is chosen, and write a rules file that puts
the most used experts on the device within a memory budget (KTransformers' frequency
placement), the rest on the host.

    python scripts/expert_placement.py --model m.gguf --text calib.txt --budget-gib 20 \
        --out rules/m-hot.yaml [--base qwen3moe]

The rules file is the base profile (the family's GPU default) plus an `experts: hot:` section
(ktjax.hybrid_experts). Device bytes per expert count the engine's dtype on the device
(bfloat16: 2 bytes per weight). Without --text, --tokens random token ids calibrate
(synthetic models have no text to route).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import jax
import numpy as np
import yaml


def routing_counts(model: str, tokens: list[int]) -> dict[tuple[int, int], int]:
    """(block, expert) -> times chosen while scoring `tokens` in the CPU program."""
    from ktjax import LLM, weights
    from ktjax.gguf.reader import GGUFFile

    f = GGUFFile(model)
    blocks = sorted(int(n.split(".")[1]) for n in f.tensors if n.endswith("ffn_gate_exps.weight"))
    counts: dict[tuple[int, int], int] = defaultdict(int)

    def record(layer, ids):
        for e in np.asarray(ids).reshape(-1):
            counts[(blocks[int(layer)], int(e))] += 1

    original = weights.experts_plus

    def counting(w, x, route, extra):
        layer = w.layer if getattr(w, "layer", None) is not None else jax.numpy.int32(0)
        jax.debug.callback(record, layer, route.ids)
        return original(w, x, route, extra)

    weights.experts_plus = counting        # traced into the programs compiled below
    try:
        llm = LLM(model, rules="cpu", max_model_len=len(tokens) + 8)
        llm.score(tokens)
    finally:
        weights.experts_plus = original
    return dict(counts)


def hot_section(counts: dict[tuple[int, int], int], expert_bytes: int, budget: float
                ) -> dict[int, list[int]]:
    """The most chosen (block, expert) pairs whose device copies fit in `budget` bytes."""
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    hot: dict[int, list[int]] = defaultdict(list)
    for (block, expert), _ in ranked[:int(budget // expert_bytes)]:
        hot[block].append(expert)
    return {b: sorted(e) for b, e in sorted(hot.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=None, help="calibration text file")
    ap.add_argument("--tokens", type=int, default=512, help="random tokens without --text")
    ap.add_argument("--budget-gib", type=float, required=True, help="device memory for experts")
    ap.add_argument("--base", default=None, help="base rules profile (default: the family's)")
    ap.add_argument("--bytes-per-weight", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from ktjax import rules as placement_rules
    from ktjax.gguf.reader import GGUFFile
    from ktjax.gguf.tokenizer import Tokenizer

    f = GGUFFile(args.model)
    if args.text:
        tokens = Tokenizer.from_gguf_metadata(f.metadata).encode(open(args.text).read())
    else:
        vocab = f.tensors["token_embd.weight"].shape[0]
        tokens = np.random.default_rng(0).integers(100, vocab - 100, args.tokens).tolist()
    counts = routing_counts(args.model, tokens)
    gate = next(t for n, t in f.tensors.items() if n.endswith("ffn_gate_exps.weight"))
    e, inter, hidden = gate.shape
    expert_bytes = 3 * inter * hidden * args.bytes_per_weight
    hot = hot_section(counts, expert_bytes, args.budget_gib * 2 ** 30)
    base = placement_rules.rules_for(f.architecture, "gpu", args.base)
    doc = yaml.safe_load(open(base).read())
    doc["experts"] = {"hot": hot}
    covered = sum(counts.get((b, x), 0) for b, xs in hot.items() for x in xs)
    doc["description"] = (f"{doc.get('description', '').strip()} Hot experts from "
                          f"scripts/expert_placement.py: {sum(map(len, hot.values()))} experts "
                          f"({args.budget_gib} GiB), {100 * covered / max(1, sum(counts.values())):.1f}% "
                          f"of the calibration routing.")
    with open(args.out, "w") as out:
        yaml.safe_dump(doc, out, sort_keys=False)
    print(doc["description"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
