#!/usr/bin/env python
"""Where a decode step's time goes: runs greedy decode steps of a model under the JAX
profiler and prints the XLA operations (fusions, FFI calls, ...) by time per step; on a GPU
also the kernels launched per step and the gap between the step's wall time and its kernels.

  python scripts/profile_step.py --model smollm2-135m --prompt-tokens 128 --steps 20
  python scripts/profile_step.py --model /tmp/llama3-8b-q4k.gguf --json

Host times are wall time inside each operation as the runtime records it (nested events,
e.g. a while loop and the fusions inside it, both count); the profiler adds some overhead.
Python frames and the runtime's own wrappers are left out unless --all.

GPU figures: `kernels_per_step` and `kernel_ms_per_step` come from the trace's device events
(the streams of the GPU's process; kernel time is the union of their intervals, so kernels
that overlap count once). XLA runs kernels one by one while a profile is recorded (command
buffers off), so these are the kernels a step's CUDA graph holds. `wall_ms_per_step` is timed
apart, without the profiler (graphs on), over the same number of steps; `gap_fraction` =
1 - kernel time / wall time: launch, Python and synchronization overhead of a step.
`cuda_calls_per_step`: the CUDA API calls seen on the host (with
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true the graphs stay on while
profiling, and cuGraphLaunch counts the step's graph launches).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import numpy as np


def _trace_events(run) -> list[dict]:
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        run()
        jax.profiler.stop_trace()
        trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                                 recursive=True))[-1]
        return json.load(gzip.open(trace))["traceEvents"]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Source", "Framework",
                  "TensorFlow")


def device_stats(events: list[dict], steps: int) -> dict | None:
    """Kernels per step and their time from the GPU process's stream lines; None without
    device events (CPU)."""
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, name in procs.items() if "/device:GPU" in name}
    if not gpu:
        return None
    kernels, copies, lines = [], 0, collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu:
            continue
        line = threads.get((e["pid"], e.get("tid")), "")
        if line.startswith(_DERIVED_LINES):
            continue      # derived lines (XLA Ops / Modules, steps) repeat the stream's events
        lines[line] += 1
        if e["name"].lower().startswith(("memcpy", "memset")):
            copies += 1
            continue
        kernels.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return {"kernels_per_step": len(kernels) / steps, "copies_per_step": copies / steps,
            "kernel_ms_per_step": _union_us(kernels) / steps / 1e3,
            "device_lines": dict(lines.most_common(6))}


_CUDA_CALLS = ("Launch", "Memcpy", "Synchronize", "EventRecord", "StreamWait")


def cuda_calls(events: list[dict], steps: int) -> dict[str, float]:
    """CUDA API calls per step the profiler saw on the host (kernel and graph launches,
    copies, synchronizations): what a step costs the CPU besides Python."""
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    calls = collections.Counter(
        e["name"] for e in events if e.get("ph") == "X" and
        "/device:" not in procs.get(e.get("pid"), "") and
        e["name"].startswith(("cu", "cuda")) and any(c in e["name"] for c in _CUDA_CALLS))
    return {k: v / steps for k, v in calls.most_common(8)}


def host_ops(events: list[dict], steps: int) -> dict[str, tuple[float, float]]:
    """{operation name: (ms per step, calls per step)} from every complete event."""
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    return {k: (v / steps / 1e3, calls[k] / steps) for k, v in total.items()}


def profile_engine(engine, prompt_tokens: int, steps: int) -> dict:
    """Profile `steps` greedy batch-1 decode steps of an engine with no other work: wall time
    per step unprofiled, then the trace's host ops and (GPU) device kernels."""
    from ktjax import SamplingParams

    vocab = engine.programs.vocab
    prompt = np.random.default_rng(0).integers(min(100, vocab // 4), min(1000, vocab),
                                               prompt_tokens).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=2 * steps + 8, temperature=0.0,
                                              ignore_eos=True))
    while any(s.in_prefill for s in engine.running + engine.waiting):
        engine.step()
    for _ in range(4):  # compile and warm up
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall_ms = (time.perf_counter() - t) / steps * 1e3

    def run():
        for _ in range(steps):
            engine.step()
    events = _trace_events(run)
    while engine.has_work():
        engine.step()
    out = {"steps": steps, "wall_ms_per_step": wall_ms, "ops": host_ops(events, steps),
           "cuda_calls_per_step": cuda_calls(events, steps)}
    dev = device_stats(events, steps)
    if dev:
        out.update(dev, gap_fraction=1.0 - dev["kernel_ms_per_step"] / wall_ms)
    return out


_WRAPPERS = ("ThunkExecutor", "PjitFunction", "CommonPjRtLoadedExecutable", "ParseArguments",
             "DevicePut")


def is_xla_op(name: str) -> bool:
    return not name.startswith("$") and not name.startswith(_WRAPPERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path or catalog name (default model)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ap.add_argument("--all", action="store_true", help="keep Python frames and runtime wrappers")
    args = ap.parse_args()
    from ktjax import LLM

    llm = LLM(args.model, max_model_len=args.prompt_tokens + 2 * args.steps + 32)
    prof = profile_engine(llm.engine, args.prompt_tokens, args.steps)
    ops = {k: v for k, v in prof.pop("ops").items() if args.all or is_xla_op(k)}
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.top]
    if args.json:
        print(json.dumps({"model": args.model, **prof, "ops": [
            {"name": k, "ms_per_step": round(ms, 4), "calls_per_step": n} for k, (ms, n) in top]}))
        return
    for k, v in prof.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    for name, (ms, n) in top:
        print(f"{ms:9.3f} ms/step {n:7.1f} calls  {name[:110]}")


if __name__ == "__main__":
    main()
