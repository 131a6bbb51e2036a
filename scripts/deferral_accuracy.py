#!/usr/bin/env python
"""The accuracy cost of expert deferral (`experts: {defer: N}`, ktjax/hybrid_experts.py): one
text scored with N = 0 and each N asked, every position's logits compared with N = 0's.

  python scripts/deferral_accuracy.py --defer 1,2,3 --out /tmp/deferral.json
  python scripts/deferral_accuracy.py --model /models/qwen3-30b-a3b-q4_k_m.gguf --text doc.txt

Without --model a tiny random qwen3moe (32 experts, 8 used, 8 layers) is written to /tmp: its
figures only show the mechanism works and what a random router loses (random routing weights
are flatter than a trained model's, so the deferred experts carry more of the sum); a real
model's cost must be measured on a real GGUF. Reported per N: top-1 agreement of the next-token
argmax, mean and max |logit difference| (in units of the N = 0 logits' standard deviation),
mean |difference of the text's log-probabilities| and the perplexity ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "README.md"


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_gguf
    return write_tiny_gguf(path, "qwen3moe", n_experts=32, n_used=8, n_layers=8, hidden=128,
                           expert_ffn=64, n_heads=4, n_kv_heads=2, head_dim=32, seed=7,
                           context_length=1024)


def rules_with(base: str, arch: str, section: str, folder: Path) -> str:
    from ktjax.rules import rules_for, rules_path
    src = rules_path(base) if base else Path(rules_for(arch, "cpu", None))
    out = folder / f"defer-{abs(hash(section))}.yaml"
    out.write_text(Path(src).read_text() + "\n" + section)
    return str(out)


def all_logits(llm, ids: list[int]) -> np.ndarray:
    """[n, V] logits of every position of one prefill chunk (n <= 512)."""
    from ktjax.engine import buckets as bk
    from ktjax.engine.kv_cache import BlockTable
    eng = llm.engine
    tokens = bk.round_up(bk.PREFILL_TOKENS, len(ids))
    table = BlockTable(eng.pool)
    try:
        table.ensure(len(ids))
        pages = eng._context_pages(0)
        batch = eng._batch([(table, 0, ids)], 1, tokens, pages, all_logits=True)
        program = eng.programs.step(bk.Bucket(1, tokens, pages, tokens), None)
        logits, eng.kv = program(eng.params, eng.kv, batch)
        return np.asarray(logits[0, :len(ids)], np.float64)
    finally:
        table.release()


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    nxt = np.asarray(ids[1:])
    lp_ref = logp(ref[:-1])[np.arange(len(nxt)), nxt]
    lp_got = logp(got[:-1])[np.arange(len(nxt)), nxt]
    scale = ref.std()
    diff = np.abs(got - ref) / scale
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "mean_abs_logit_diff_sd": float(diff.mean()),
            "max_abs_logit_diff_sd": float(diff.max()),
            "mean_abs_dlogp": float(np.abs(lp_got - lp_ref).mean()),
            "ppl_ratio": float(np.exp(lp_ref.mean() - lp_got.mean()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="MoE GGUF (default: a tiny random qwen3moe)")
    ap.add_argument("--rules", default="", help="base rules profile or file (default: the "
                    "architecture's GPU profile: routed experts on the host)")
    ap.add_argument("--defer", default="1,2,3,4", help="deferred experts per token, listed")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--tokens", type=int, default=512, help="scored tokens (<= 512)")
    ap.add_argument("--out", help="JSON file for the figures")
    ap.add_argument("--json", action="store_true", help="one JSON line per N on stdout")
    args = ap.parse_args(argv)

    from ktjax import LLM
    folder = Path(tempfile.mkdtemp(prefix="ktjax-defer-"))
    model = args.model or str(tiny_model(folder / "qwen3moe-tiny.gguf"))
    t0 = time.perf_counter()
    results: dict = {"model": model, "text": args.text, "runs": {}}

    def run(n: int) -> np.ndarray:
        llm = LLM(model, rules=rules_with(args.rules, arch, f"experts: {{defer: {n}}}\n", folder),
                  max_model_len=max(args.tokens + 16, 64))
        nonlocal ids
        if ids is None:
            ids = llm.tokenizer.encode(Path(args.text).read_text())[:min(args.tokens, 512)]
        return all_logits(llm, ids)

    from ktjax.gguf.reader import GGUFFile
    arch = GGUFFile(model).architecture
    ids = None
    ref = run(0)
    results["tokens"] = len(ids)
    for n in (int(v) for v in args.defer.split(",") if v):
        results["runs"][n] = compare(ref, run(n), ids)
        if args.json:
            print(json.dumps({"model": model, "tokens": len(ids), "defer": n,
                              **results["runs"][n]}), flush=True)
        else:
            print(f"defer {n}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                             results["runs"][n].items()), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{len(ids)} tokens, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
