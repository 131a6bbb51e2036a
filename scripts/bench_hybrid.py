#!/usr/bin/env python
"""Hybrid GPU + host MoE: decode and prefill throughput of one placement, the decode step
against its ideal, launches per step, and agreement with another placement.

    python scripts/bench_hybrid.py --model m.gguf --rules qwen3moe --batch 1,8 --json
    ... --rules rules.yaml --compare device     # + agreement with the all-device program
    ... --prefill-tokens 512,4096               # prefill tok/s alone, per prompt length

One JSON line (--json) per run. The step's ideal is the GPU part (the same step with the host
jobs dry-run: zeros, no compute; everything else, copies and host functions included, runs)
plus the host experts' active bytes per step at the read bandwidth measured in the same run
(routing assumed uniform: each of a layer's host experts is touched by a batch of B tokens
with probability 1 - (1 - k/E)^B). --profile counts the CUDA driver calls of a decode step
(kernel and graph launches, host functions, copies) from a jax.profiler trace.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Iterator

import numpy as np


def host_expert_bytes(params, batch: int, top_k: int) -> float:
    """Bytes of host experts a decode step of `batch` tokens reads, uniform routing."""
    from ktjax import _native
    from ktjax import hybrid_experts as hx
    from ktjax.weights import HostExperts
    total = 0.0
    nodes = [v for stack in params.values() if isinstance(stack, dict) for v in stack.values()
             if isinstance(v, (HostExperts, hx.HybridExperts))]
    for node in nodes:
        slots = np.asarray(node.slots) if isinstance(node, hx.HybridExperts) and node.window \
            else None
        for j, h in enumerate(node.handles):
            info = _native.weight_info(h)
            e = info["count"] // 3                      # gate, up, down per expert
            on_host = e if slots is None else int((slots[j] < 0).sum())
            touched = 1.0 - (1.0 - top_k / e) ** batch
            total += info["bytes"] / e * on_host * touched
    return total


def decode_launches(llm, steps: int) -> dict:
    """CUDA driver calls per decode step, counted in a jax.profiler trace of `steps` steps."""
    import jax
    from ktjax import SamplingParams
    engine = llm.engine
    engine.add_request(list(range(100, 116)), SamplingParams(max_tokens=steps + 4, temperature=0,
                                                             ignore_eos=True))
    while any(s.in_prefill for s in engine.running + engine.waiting):
        engine.step()
    engine.step()
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(steps):
            engine.step()
    while engine.has_work():
        engine.step()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {"error": "no perfetto trace written"}
    events = json.load(gzip.open(files[0]))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = Counter(e.get("name", "") for e in events if e.get("ph") == "X")
    pick = {k: v / steps for k, v in names.items()
            if k.startswith(("cuLaunch", "cuGraphLaunch", "cuMemcpy", "cudaLaunch", "cudaGraphLaunch"))}
    # The device's timeline: busy intervals of the GPU processes' events, and the time
    # between them (the GPU idle while the host works, among others).
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("pid") in gpu_pids)
    busy, idle, end = 0.0, 0.0, None
    for a, b in spans:
        if end is not None and a > end:
            idle += a - end
        busy += max(0.0, b - max(a, end or a))
        end = b if end is None else max(end, b)
    return {"per_step": pick, "gpu_events_per_step": len(spans) / steps,
            "gpu_busy_ms_per_step": busy / 1e3 / steps, "gpu_idle_ms_per_step": idle / 1e3 / steps,
            "top_events": dict(names.most_common(12))}


def run(args) -> Iterator[dict]:
    """The measurement row, then (--profile, --compare) one row each: a crash in a later one
    leaves the earlier printed."""
    from ktjax import LLM, SamplingParams, _native
    _native.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prefill_only = [int(t) for t in args.prefill_tokens.split(",") if t]
    llm = LLM(args.model, rules=args.rules,
              max_model_len=max(args.prompt_tokens + args.gen_tokens, args.compare_tokens + 32,
                                *(t + 2 for t in prefill_only)) + 32)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    rng = np.random.default_rng(0)
    vocab = engine.programs.vocab
    moe = llm.config.moe
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)

    def one_pass(batch: int, prompt: int, params=params) -> tuple[float, float]:
        for _ in range(batch):
            engine.add_request(rng.integers(100, vocab - 100, prompt).tolist(), params)
        t = time.perf_counter()
        while any(s.in_prefill for s in engine.running + engine.waiting):
            engine.step()
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        return t_prefill, time.perf_counter() - t

    if prefill_only:  # prefill throughput alone (one sequence), e.g. for the placement's threshold
        one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for tokens in prefill_only:
            one_pass(1, tokens, one_token)                 # compiles
            t_prefill, _ = one_pass(1, tokens, one_token)
            yield {"model": os.path.basename(args.model), "rules": args.rules,
                   "threads": args.threads, "platform": llm_platform(),
                   "prefill_tokens": tokens, "prefill_tps": tokens / t_prefill}
        return
    batches = [int(b) for b in str(args.batch).split(",")]
    for batch in batches:
        row = {"model": os.path.basename(args.model), "rules": args.rules, "batch": batch,
               "threads": args.threads, "load_s": load_s, "platform": llm_platform()}
        t0 = time.perf_counter()
        one_pass(batch, args.prompt_tokens)               # compiles
        # where a stage's time goes (8 Dec: a 240 s stage ran out inside batch 8)
        row["first_pass_s"] = time.perf_counter() - t0
        row["compile_s_so_far"] = engine.programs.compile_seconds
        t_prefill, t_decode = one_pass(batch, args.prompt_tokens)
        steps = args.gen_tokens - 1
        row.update(prefill_tps=batch * args.prompt_tokens / t_prefill,
                   decode_tps=batch * steps / t_decode, step_ms=1e3 * t_decode / steps)
        bw = max(_native.read_bandwidth_gbps(0, 3) for _ in range(2))
        host_bytes = host_expert_bytes(engine.params, batch, moe.n_used)
        row.update(read_bw_gbps=bw, host_expert_mb_per_step=host_bytes / 1e6,
                   host_bw_ms=1e3 * host_bytes / (bw * 1e9))
        if hasattr(_native, "moe_site_dry_run") and row["platform"] == "gpu":
            _native.moe_site_dry_run(True)
            try:
                _, t_dry = one_pass(batch, args.prompt_tokens)   # compiled buckets
            finally:
                _native.moe_site_dry_run(False)
            row["gpu_part_ms"] = 1e3 * t_dry / steps
            row["ideal_ms"] = row["gpu_part_ms"] + row["host_bw_ms"]
            row["step_over_ideal"] = row["step_ms"] / row["ideal_ms"]
        yield row
        head = {k: row[k] for k in ("model", "rules", "platform")}
        if args.profile and batch == batches[0]:   # before larger batches use up the time
            try:
                yield {**head, "launches": decode_launches(llm, 8)}
            except Exception as e:  # the trace is a diagnostic: report, do not fail the run
                yield {**head, "launches": {"error": f"{type(e).__name__}: {e}"}}
    head = {k: row[k] for k in ("model", "rules", "platform")}
    if args.compare:
        yield {**head, **compare(llm, args)}


def compare(llm, args) -> dict:
    """Agreement with the program of --compare rules on one scored text: mean and max
    |Δ log p| of its tokens, the share of its positions where both programs' most likely
    next token is the same (top-1 agreement), and the greedy continuations' common prefix."""
    from ktjax import LLM, SamplingParams
    rng = np.random.default_rng(1)
    text = rng.integers(100, llm.engine.programs.vocab - 100, args.compare_tokens).tolist()
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    a_score, a_top = llm.score(text, with_greedy=True)
    a_tok = llm.generate([text[:16]], greedy)[0].token_ids
    other = LLM(args.model, rules=args.compare, max_model_len=args.compare_tokens + 64)
    b_score, b_top = other.score(text, with_greedy=True)
    b_tok = other.generate([text[:16]], greedy)[0].token_ids
    common = next((i for i, (x, y) in enumerate(zip(a_tok, b_tok)) if x != y), len(a_tok))
    d = np.abs(a_score - b_score)
    return {"compare_rules": args.compare, "logprob_absdiff_mean": float(d.mean()),
            "logprob_absdiff_max": float(d.max()), "greedy_common_prefix": common,
            "greedy_tokens": len(a_tok), "top1_agreement": float(np.mean(a_top == b_top)),
            "ppl_ratio": float(np.exp(-a_score.mean()) / np.exp(-b_score.mean()))}


def llm_platform() -> str:
    import jax
    return jax.devices()[0].platform


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rules", default=None, help="rules file or profile (default: the platform's)")
    ap.add_argument("--batch", default="1", help="decode batch sizes, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true", help="count CUDA driver calls per decode step")
    ap.add_argument("--compare", default=None, help="rules of a program to compare outputs with")
    ap.add_argument("--compare-tokens", type=int, default=256)
    ap.add_argument("--prefill-tokens", default="", help="prompt lengths, comma-separated: "
                    "measure only the prefill of one prompt of each (no decode rows)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for row in run(args):
        print(json.dumps(row) if args.json else "\n".join(f"{k:24} {v}" for k, v in row.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
