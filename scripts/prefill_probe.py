#!/usr/bin/env python
"""Prefill of one MoE layer two ways, per token count: the routed experts on the host (fused
kernel, Q4_K experts, AMX/AVX-512) against streaming the layer's experts to the GPU and
computing them there (bf16 weights copied host -> device, then grouped matmuls in XLA), to
find the token count above which streaming pays (llama.cpp offloads batches of 32+ tokens;
KTransformers' gpu-prefill-token-threshold).

    python scripts/prefill_probe.py --shape qwen3-30b-a3b --tokens 64,512,2048 --json

Routing is uniform random (top-k distinct experts per token). The GPU time counts the copy
(from ordinary pageable memory; pinned copies would be faster) and the compute, serially
(the overlap of layer l+1's copy with layer l's compute would hide the smaller of the two).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_moe import SHAPES, make_layer  # noqa: E402


def host_us(shape: str, tokens: int, rng) -> float:
    from ktjax import _native
    hidden, inter, experts, top_k = SHAPES[shape]
    h = make_layer("q4_k", experts, hidden, inter, rng)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = np.full((tokens, top_k), 1.0 / top_k, np.float32)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    _native.time_moe(x, [ids], w, [h], 1)
    sec = min(_native.time_moe(x, [ids], w, [h], 2) for _ in range(2))
    _native.release_weight(h)
    return sec * 1e6


def gpu_us(shape: str, tokens: int, rng) -> tuple[float, float]:
    """(copy, compute) microseconds for one layer's bf16 experts."""
    import jax
    import jax.numpy as jnp
    from ktjax.weights import DeviceExperts, Route, _experts_ragged
    hidden, inter, experts, top_k = SHAPES[shape]
    dev = [d for d in jax.devices() if d.platform == "gpu"][0]
    host = [np.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02, jnp.bfloat16)
            for s in ((experts, inter, hidden), (experts, inter, hidden), (experts, hidden, inter))]
    jax.device_put(host[0][:1], dev).block_until_ready()
    t = time.perf_counter()
    mats = [jax.device_put(m, dev) for m in host]
    jax.block_until_ready(mats)
    copy = time.perf_counter() - t
    ids = jnp.asarray(np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
                      .astype(np.int32), device=dev)
    w = jnp.full((tokens, top_k), 1.0 / top_k, jnp.float32, device=dev)
    x = jnp.asarray(rng.standard_normal((tokens, hidden), dtype=np.float32), jnp.bfloat16, device=dev)
    f = jax.jit(lambda g, u, d, x, i, w: _experts_ragged(DeviceExperts(g, u, d), x, Route(i, w)))
    f(*mats, x, ids, w).block_until_ready()
    t = time.perf_counter()
    for _ in range(3):
        f(*mats, x, ids, w).block_until_ready()
    return copy * 1e6, (time.perf_counter() - t) / 3 * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="64,512,2048")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from ktjax import _native
    if args.threads:
        _native.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for t in (int(v) for v in args.tokens.split(",")):
        row = {"shape": args.shape, "tokens": t, "threads": _native.num_threads(),
               "host_us": host_us(args.shape, t, rng)}
        if not args.no_gpu:
            row["gpu_copy_us"], row["gpu_compute_us"] = gpu_us(args.shape, t, rng)
            row["stream_over_host"] = (row["gpu_copy_us"] + row["gpu_compute_us"]) / row["host_us"]
        print(json.dumps(row) if args.json else row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
