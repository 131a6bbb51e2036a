#!/usr/bin/env python
"""CPU attention of one step: the host kernel (ktjax_paged_attention, every step since batch
invariance) against XLA's jnp reference (which ran prefill chunks of more than 16 tokens
before), interleaved in one process, best of `--repeats` rounds of 5 calls each.

    python scripts/bench_attention.py [--tokens 512,128] [--cached 0,512] [--repeats 3]

Shapes: SmolLM2-135M (9 heads, 3 KV heads, head dim 64) and Gemma 3 270M (4, 1, 256); one
row, pages of 16 tokens, float32 cache. Prints ms per call and kernel / reference.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kernels import paged_attention_cpu, paged_attention_ref

SHAPES = {"smollm2-135m": (9, 3, 64), "gemma3-270m": (4, 1, 256)}
PAGE = 16


def problem(tokens: int, cached: int, heads: int, kv: int, hd: int):
    rng = np.random.default_rng(0)
    pages = max(8, -(-cached // PAGE))
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    k_cache = jnp.asarray(f(1, pages + 1, PAGE, kv, hd))
    v_cache = jnp.asarray(f(1, pages + 1, PAGE, kv, hd))
    tables = np.arange(1, pages + 1, dtype=np.int32)[None]
    positions = (cached + np.arange(tokens, dtype=np.int32))[None]
    return (f(1, tokens, heads, hd), f(1, tokens, kv, hd), f(1, tokens, kv, hd), k_cache,
            v_cache, jnp.int32(0), tables, np.array([cached], np.int32), positions)


def best_of(fn, args, calls: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,128")
    ap.add_argument("--cached", default="0,512")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for name, (heads, kv, hd) in SHAPES.items():
        scale = hd ** -0.5
        kernel = jax.jit(lambda *a: paged_attention_cpu.paged_attention(*a, scale=scale))
        reference = jax.jit(lambda *a: paged_attention_ref.paged_attention(*a, scale=scale))
        for tokens in (int(t) for t in args.tokens.split(",")):
            for cached in (int(c) for c in args.cached.split(",")):
                step = problem(tokens, cached, heads, kv, hd)
                k = r = float("inf")
                for _ in range(args.repeats):
                    k = min(k, best_of(kernel, step))
                    r = min(r, best_of(reference, step))
                print(f"{name} tokens {tokens} cached {cached}: kernel {k * 1e3:.2f} ms, "
                      f"reference {r * 1e3:.2f} ms, kernel / reference {k / r:.2f}")


if __name__ == "__main__":
    main()
