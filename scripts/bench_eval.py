#!/usr/bin/env python
"""Multiple-choice scoring throughput (continuations per second): ktjax.evaluate's batched
scoring (each context prefilled once, its continuations rows of shared scoring steps)
against scoring each context + continuation as a sequence of its own with LLM.score.

Three sets: the shipped sample (20 items, short contexts) and two cut from a text file with 4
choices each: HellaSwag-shaped (80-token contexts, 20-token endings) and MMLU-shaped
(256-token contexts, 1-token answers). Each way runs once to compile, then is timed; the
log-likelihoods of the two ways are compared (host kernels: they differ by the int8
activations' rounding of the attention's last bits, as a chunked prefill's do).

  python scripts/bench_eval.py --model smollm2-135m --items 16 --json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ktjax import LLM
from ktjax.evaluate.choices import requests_for
from ktjax.evaluate.formats import Item, read_items
from ktjax.evaluate.loglik import score_continuations

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "choices_sample.jsonl"


def text_items(llm, path: str, n: int, context_tokens: int, ending_tokens: int) -> list[Item]:
    """HellaSwag-shaped items cut from a text: a context, its true next words and three
    endings taken from elsewhere in the text."""
    ids = llm.tokenizer.encode(Path(path).read_text(), add_bos=False)
    step = context_tokens + ending_tokens
    stride = (len(ids) - step) // (n + 3)      # spans overlap when the text is short
    if stride < 1:
        raise SystemExit(f"{path} is too short for {n} items of {step} tokens")
    decode = llm.tokenizer.decode
    spans = [(decode(ids[i * stride:i * stride + context_tokens]),
              decode(ids[i * stride + context_tokens:i * stride + step]).strip())
             for i in range(n + 3)]
    return [Item(str(i), spans[i][0], [spans[i][1]] + [spans[i + k][1] for k in (1, 2, 3)], 0)
            for i in range(n)]


def one_by_one(llm, reqs) -> list[list[float]]:
    return [[float(llm.score(r.context + c)[-len(c):].sum()) for c in r.continuations]
            for r in reqs]


def measure(llm, items: list[Item]) -> dict:
    reqs = requests_for(llm, items)
    n = sum(len(r.continuations) for r in reqs)
    out = {"items": len(items), "continuations": n,
           "context_tokens_mean": float(np.mean([len(r.context) for r in reqs])),
           "continuation_tokens_mean": float(np.mean([len(c) for r in reqs
                                                      for c in r.continuations]))}
    for name, fn in (("batched", lambda: score_continuations(llm.engine, reqs)),
                     ("one_by_one", lambda: one_by_one(llm, reqs))):
        fn()                                    # compile
        t0 = time.perf_counter()
        values = fn()
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": seconds, "seq_per_s": n / seconds}
        out[name + "_values"] = values
    a = np.concatenate([np.array(v) for v in out.pop("batched_values")])
    b = np.concatenate([np.array(v) for v in out.pop("one_by_one_values")])
    out["max_abs_diff"] = float(np.abs(a - b).max())
    out["max_rel_diff"] = float((np.abs(a - b) / np.abs(b)).max())
    out["speedup"] = out["batched"]["seq_per_s"] / out["one_by_one"]["seq_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="/usr/share/common-licenses/Apache-2.0")
    ap.add_argument("--items", type=int, default=16, help="items of each text-cut set")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--dense", action="store_true",
                    help="all weights dense in XLA (host_linears=False) instead of the CPU "
                         "default's host kernels")
    a = ap.parse_args()
    llm = LLM(a.model, max_model_len=1024, host_linears=False if a.dense else None)
    results = {"model": a.model, "dense": a.dense,
               "sample": measure(llm, read_items(SAMPLE)),
               "hellaswag_shaped": measure(llm, text_items(llm, a.text, a.items, 80, 20)),
               "mmlu_shaped": measure(llm, text_items(llm, a.text, a.items, 256, 1))}
    if a.json:
        print(json.dumps(results, indent=1))
        return
    for name in ("sample", "hellaswag_shaped", "mmlu_shaped"):
        r = results[name]
        print(f"{name}: {r['items']} items, {r['continuations']} continuations, context "
              f"{r['context_tokens_mean']:.0f} tokens, continuation "
              f"{r['continuation_tokens_mean']:.1f}: batched {r['batched']['seq_per_s']:.1f} "
              f"seq/s, one by one {r['one_by_one']['seq_per_s']:.1f} seq/s "
              f"({r['speedup']:.2f}x), max |diff| {r['max_abs_diff']:.2e} "
              f"(relative {r['max_rel_diff']:.1e})")


if __name__ == "__main__":
    main()
