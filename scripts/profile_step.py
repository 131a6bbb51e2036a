#!/usr/bin/env python
"""Where a decode step's time goes: runs greedy decode steps of a model under the JAX
profiler and prints the XLA operations (fusions, FFI calls, ...) by time per step.

  python scripts/profile_step.py --model smollm2-135m --prompt-tokens 128 --steps 20
  python scripts/profile_step.py --model /tmp/qwen3-30b-a3b-q4k.gguf --top 15 --json

Times are wall time inside each operation as the XLA CPU runtime records it (nested events,
e.g. a while loop and the fusions inside it, both count); the profiler adds some overhead.
Python frames and the runtime's own wrappers are left out unless --all.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax
import numpy as np


def profile(model: str | None, prompt_tokens: int, steps: int) -> dict[str, tuple[float, float]]:
    """{operation name: (ms per step, calls per step)} over `steps` greedy decode steps."""
    from ktjax import LLM, SamplingParams

    llm = LLM(model, max_model_len=prompt_tokens + steps + 32)
    engine = llm.engine
    prompt = np.random.default_rng(0).integers(100, 1000, prompt_tokens).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0,
                                              ignore_eos=True))
    while any(s.in_prefill for s in engine.running + engine.waiting):
        engine.step()
    for _ in range(4):  # compile and warm up
        engine.step()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            engine.step()
        jax.profiler.stop_trace()
        trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                                 recursive=True))[-1]
        events = json.load(gzip.open(trace))["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    return {k: (v / steps / 1e3, calls[k] / steps) for k, v in total.items()}


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
    ops = {k: v for k, v in profile(args.model, args.prompt_tokens, args.steps).items()
           if args.all or is_xla_op(k)}
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.top]
    if args.json:
        print(json.dumps({"model": args.model, "ops": [
            {"name": k, "ms_per_step": round(ms, 4), "calls_per_step": n} for k, (ms, n) in top]}))
        return
    for name, (ms, n) in top:
        print(f"{ms:9.3f} ms/step {n:7.1f} calls  {name[:110]}")


if __name__ == "__main__":
    main()
