"""Interleaved A/B timing of the MoE kernel across builds of the native module.

A kernel change is judged against the build before it in the same process, not against a
figure from another run: on a shared machine the same build drifts by +-15% between runs,
more than most changes are worth. Each build is a module with its own name, made by
scripts/build_variant.sh; the first is the baseline. Per configuration every build packs
the same random GGUF layer (one layer: give it enough experts that its weights far exceed
the last-level cache), and the rounds alternate the builds' order so that a drift falls on
all of them alike. One JSON line per configuration: each build's best TOPS and, per round,
the baseline's time over the build's (above 1: faster than the baseline). A round's ratio
is noisy: two builds of the same code on the AMX host (16 threads, DeepSeek-V3 shape, 64
experts, 4 rounds) gave int8_row qlen 1024 0.78-1.25 and Q4_K qlen 256 0.82-1.11, and on
another day best TOPS 0.87-1.05x over 8 runs, one with all 4 rounds at 0.87-0.91; trust a
change that moves the best TOPS and most rounds in several runs, beyond that spread.

    old=$(bash scripts/build_variant.sh HEAD old); new=$(bash scripts/build_variant.sh worktree new)
    python3 scripts/ab_moe.py $old $new --config q4_k:64:256 --config int8_row:64:1024 --threads 16
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from types import ModuleType

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import RAW_TYPES, SHAPES, pack_layer, random_layer  # noqa: E402


def load_build(path: str) -> tuple[str, ModuleType]:
    """The module at `path` (`_native_NAME.*.so`) and its NAME."""
    module = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or not module.startswith("_native"):
        raise SystemExit(f"ab_moe: {path} is not a build of the native module (_native_NAME.*.so)")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    return module.removeprefix("_native_"), native


def parse_config(text: str) -> tuple[str, int, int]:
    try:
        fmt, experts, qlen = text.split(":")
        if fmt not in RAW_TYPES:
            raise ValueError
        return fmt, int(experts), int(qlen)
    except ValueError:
        raise SystemExit(f"ab_moe: config {text!r} is not FORMAT:EXPERTS:QLEN with FORMAT one of "
                         + ", ".join(RAW_TYPES)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="modules built by build_variant.sh; the first is the baseline")
    ap.add_argument("--config", action="append", required=True, help="FORMAT:EXPERTS:QLEN (repeatable)")
    ap.add_argument("--shape", default="deepseek-v3", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=0, help="default: the modules' default")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--round-time", type=float, default=0.3, help="seconds per build and round")
    args = ap.parse_args(argv)
    configs = [parse_config(c) for c in args.config]
    builds = dict(load_build(p) for p in args.builds)
    if len(builds) != len(args.builds):
        raise SystemExit("ab_moe: two builds share a name")
    if args.threads:
        for native in builds.values():
            native.set_num_threads(args.threads)
    base = next(iter(builds))
    hidden, inter, _, top_k = SHAPES[args.shape]
    for fmt, experts, qlen in configs:
        rng = np.random.default_rng(0)
        raw = random_layer(fmt, experts, hidden, inter, rng)
        layers = {name: pack_layer(native, fmt, raw, experts, hidden, inter) for name, native in builds.items()}
        del raw
        ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(qlen)]).astype(np.int32)
        wts = rng.uniform(0.05, 0.3, (qlen, top_k)).astype(np.float32)
        x = rng.standard_normal((qlen, hidden), dtype=np.float32)
        ops = 2 * 3 * hidden * inter * qlen * top_k
        first = builds[base]
        first.time_moe(x, [ids], wts, [layers[base]], 1)  # warm-up, then size the rounds
        iters = max(1, min(50, int(args.round_time / first.time_moe(x, [ids], wts, [layers[base]], 1))))
        times: dict[str, list[float]] = {name: [] for name in builds}
        for r in range(args.rounds):
            order = list(builds.items())
            for name, native in order if r % 2 == 0 else order[::-1]:
                native.time_moe(x, [ids], wts, [layers[name]], 1)
                times[name].append(min(native.time_moe(x, [ids], wts, [layers[name]], iters) for _ in range(2)))
        print(json.dumps({
            "shape": args.shape, "format": fmt, "experts": experts, "qlen": qlen,
            "threads": first.num_threads(), "isa": first.active_isa(),
            "tops": {name: round(ops / min(t) / 1e12, 3) for name, t in times.items()},
            "over_baseline": {name: [round(b / v, 3) for b, v in zip(times[base], t)]
                              for name, t in times.items() if name != base},
        }), flush=True)
        for name, native in builds.items():
            native.release_weight(layers[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
