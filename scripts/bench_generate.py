#!/usr/bin/env python
"""Prefill and decode throughput of ktjax, optionally side by side with llama.cpp's llama-bench.

  python scripts/bench_generate.py --model smollm2-135m --prompt-tokens 128 --gen-tokens 64 --json
  ... --llama-bench .peers/llama.cpp/build/bin/llama-bench   # adds the peer and the ratios

Compilation is timed apart (compile_s) and excluded from throughput; the prompt is random
vocabulary ids, generation ignores EOS so every run decodes exactly --gen-tokens. Both
engines decode after --prompt-tokens of context (llama-bench's -d).

--roofline probes the read bandwidth right before each decode pass (a shared host's
bandwidth drifts by tens of percent between runs) and reports each pass's decode against
the roofline of scripts/roofline.py's active bytes per token at that bandwidth, with the
median over passes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np


def run_ktjax(args) -> dict:
    from ktjax import LLM, SamplingParams, _native

    _native.set_num_threads(args.threads)  # the host kernels' pool, as llama-bench's -t
    t0 = time.perf_counter()
    llm = LLM(args.model, max_model_len=args.prompt_tokens + args.gen_tokens + 16)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = llm.engine.programs.vocab
    prompts = [rng.integers(100, vocab - 100, args.prompt_tokens).tolist()
               for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.engine

    def one_pass() -> tuple[float, float, float]:
        for p in prompts:
            engine.add_request(p, params)
        t = time.perf_counter()
        while any(s.in_prefill for s in engine.running + engine.waiting):
            engine.step()
        t_prefill = time.perf_counter() - t
        read_gbps = _native.read_bandwidth_gbps(0, 3) if args.roofline else 0.0
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        return t_prefill, time.perf_counter() - t, read_gbps

    one_pass()                       # compiles every bucket this shape needs
    compile_s = engine.programs.compile_seconds
    runs = [one_pass() for _ in range(args.repeats)]
    t_prefill = min(r[0] for r in runs)
    t_decode = min(r[1] for r in runs)
    decoded = args.batch * (args.gen_tokens - 1)  # the first token comes from the prefill step
    roofline = {}
    if args.roofline:
        from roofline import active_bytes  # scripts/ is on sys.path when this runs as a script
        per_token = active_bytes(llm.model_path)["active_bytes_per_token"] * args.batch
        fractions = [decoded / r[1] / (r[2] * 1e9 / per_token) for r in runs]
        roofline = {"read_gbps": [r[2] for r in runs], "active_bytes_per_token": per_token / args.batch,
                    "decode_roofline_fractions": fractions,
                    "decode_roofline_fraction": float(np.median(fractions))}
    return {
        "engine": "ktjax", "model": os.path.basename(llm.model_path), "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "prefill_tok_s": args.batch * args.prompt_tokens / t_prefill,
        "decode_tok_s": decoded / t_decode,
        "compile_s": compile_s, "load_s": load_s, **roofline,
    }


def run_llama_bench(binary: str, model_path: str, args) -> dict:
    """llama-bench's prompt processing from an empty context and its generation after
    --prompt-tokens of context (-d), as ktjax decodes after its prompt."""
    out = subprocess.run([binary, "-m", model_path, "-p", str(args.prompt_tokens),
                          "-n", str(args.gen_tokens), "-d", f"0,{args.prompt_tokens}",
                          "-t", str(args.threads), "-o", "json", "-r", str(args.repeats)],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r.get("n_depth", 0) == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r.get("n_depth", 0) == args.prompt_tokens)

    def best(row: dict) -> float:
        """The best repetition, as ktjax reports its best pass (a shared host's load moves
        averages)."""
        return max(row.get("samples_ts") or [row["avg_ts"]])

    return {"engine": "llama.cpp", "prefill_tok_s": best(pp), "decode_tok_s": best(tg),
            "prefill_avg_tok_s": pp["avg_ts"], "decode_avg_tok_s": tg["avg_ts"],
            "build": rows[0].get("build_commit")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path or catalog name (default model)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="host-kernel threads of both engines")
    ap.add_argument("--llama-bench", default=None, help="path to llama-bench, to run the peer")
    ap.add_argument("--roofline", action="store_true",
                    help="decode as a fraction of the bandwidth roofline, bandwidth probed per pass (CPU)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = ap.parse_args()

    result = run_ktjax(args)
    if args.llama_bench:
        from ktjax.models.catalog import resolve_model
        peer = run_llama_bench(args.llama_bench, resolve_model(args.model), args)
        result["peer"] = peer
        result["prefill_ratio"] = result["prefill_tok_s"] / peer["prefill_tok_s"]
        result["decode_ratio"] = result["decode_tok_s"] / peer["decode_tok_s"]
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:>15}: {v:.2f}" if isinstance(v, float) else f"{k:>15}: {v}")


if __name__ == "__main__":
    main()
