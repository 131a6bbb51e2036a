#!/usr/bin/env python
"""CPU attention of one step: the host kernel (ktjax_paged_attention, every step since batch
invariance) against XLA's jnp reference (which ran prefill chunks of more than 16 tokens
before), interleaved in one process, best of `--repeats` rounds of 5 calls each.

    python scripts/bench_attention.py [--tokens 512,128] [--cached 0,512] [--repeats 3]

Shapes: SmolLM2-135M (9 heads, 3 KV heads, head dim 64) and Gemma 3 270M (4, 1, 256); one
row, pages of 16 tokens, float32 cache. Prints ms per call and kernel / reference.

    python scripts/bench_attention.py --gpu [--contexts 4096,32768,131072] [--json out.json]
        [--parts decode,far,batch,prefill,reference,sweep] [--unroll]

GPU mode: decode attention of the Llama-3-8B shape (32 heads, 8 KV heads, head dim 128, 32
layers, pages of 16) with the Pallas kernel over bfloat16 and int8 pages, one sequence at
each context; the cache is allocated by the engine's kv_cache code. The KV read bandwidth
(bytes of every layer's context / time of the 32 layers) is set against the HBM bandwidth
measured in the same run (a read-only reduction over 4 GiB). With int8 at the longest
context a bfloat16 stand-in for the 8B weights (16 GB) is allocated beside the cache, which
shows the model with that context fits on the GPU. Then the kernel against the reference on
random pages at the far end of that cache (offsets past 4 GiB), a prefill chunk (512 tokens over
1536 cached: attention TFLOP/s, kernel and reference) and a sweep of the kernel's knobs
(SWEEP_BF16, SWEEP_INT8) at every context; last, the best variant per context and KV dtype.
Each layer's output is the next layer's query, so the scan runs nothing but attention;
--unroll unrolls the layers (no loop). SMOKE=1 shrinks every size (CPU check).
"""
from __future__ import annotations

import argparse
import time
import traceback
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kernels import paged_attention_cpu, paged_attention_gpu, paged_attention_ref

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


def hbm_read_bandwidth(n_bytes: int) -> float:
    """Bytes/s of a read-only reduction over n_bytes of bfloat16 (best of 10)."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    seconds = best_of(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (x,), calls=10)
    del x
    return n_bytes / seconds


def gpu_decode(ctx: int, kv_dtype: str, n_layers: int, weights_bytes: int = 0,
               reference: bool = False, batch: int = 1, unroll: bool = False,
               **knobs) -> dict:
    """Decode attention of `batch` sequences at `ctx` cached tokens each over all n_layers
    layers of an 8B-shaped cache; with weights_bytes, that much bfloat16 is held beside.
    `knobs`: the kernel's tuning arguments; reference: time the jnp reference instead;
    unroll: the layers unrolled instead of a scan (no loop between the layers' kernels)."""
    from ktjax.engine import kv_cache
    from ktjax.models.base import KVCacheSpec
    heads, kv, hd, page = 32, 8, 128, 16
    spec = KVCacheSpec(n_layers, kv, hd, hd)
    n_pages = batch * ctx // page + 1
    weights = jnp.zeros((weights_bytes // 2,), jnp.bfloat16) if weights_bytes else None
    cache = kv_cache.make_kv_cache(spec, n_pages, page, kv_dtype)
    rng = np.random.default_rng(0)
    tables = jnp.asarray(rng.permutation(np.arange(1, n_pages)).reshape(batch, -1), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, hd)), jnp.bfloat16)
    k_new = jnp.asarray(rng.standard_normal((batch, 1, kv, hd)), jnp.bfloat16)
    lens = jnp.full((batch,), ctx, jnp.int32)
    positions = jnp.full((batch, 1), ctx, jnp.int32)

    attend = paged_attention_ref.paged_attention if reference else \
        partial(paged_attention_gpu.paged_attention, **knobs)

    @jax.jit
    def step(q, k_cache, v_cache):
        # each layer's output is the next layer's query (as in a model): nothing but the
        # attention runs per layer, no accumulation op
        def layer(x, i):
            return attend(x, k_new, k_new, k_cache, v_cache, i, tables, lens, positions,
                          scale=hd ** -0.5), None
        return jax.lax.scan(layer, q, jnp.arange(n_layers, dtype=jnp.int32),
                            unroll=n_layers if unroll else 1)[0]

    seconds = best_of(step, (q, cache.k, cache.v), calls=6)
    read = batch * n_layers * paged_attention_gpu.kv_read_bytes(ctx, kv, hd, hd, kv_dtype)
    held = kv_cache.cache_bytes(spec, n_pages, page, kv_dtype) + weights_bytes
    del cache, weights
    return dict(context=ctx, batch=batch, kv_dtype=kv_dtype, layers=n_layers, unroll=unroll,
                kernel="reference" if reference else "pallas", knobs=knobs,
                us_per_layer=seconds / n_layers * 1e6, kv_bytes_read=read,
                kv_read_GBps=read / seconds / 1e9, bytes_held=held)


def gpu_far_pages_check(kv_dtype: str, n_layers: int, ctx: int) -> dict:
    """Kernel against reference on random pages at the far end of a full-size cache (last
    layer, last pages: byte offsets past 4 GiB, where the Triton lowering switches to 64-bit
    indexing); the benchmark's zeroed caches would hide a wrong read."""
    from ktjax.engine import kv_cache
    from ktjax.models.base import KVCacheSpec
    heads, kv, hd, page = 32, 8, 128, 16
    rows = min(1024, ctx // 2)
    spec = KVCacheSpec(n_layers, kv, hd, hd)
    n_pages = ctx // page + 1
    cache = kv_cache.make_kv_cache(spec, n_pages, page, kv_dtype)
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    slots = jnp.asarray((n_pages - rows // page) * page + np.arange(rows)[None], jnp.int32)
    k_rows, v_rows = f(n_layers, 1, rows, kv, hd), f(n_layers, 1, rows, kv, hd)
    k_cache, v_cache = jax.jit(paged_attention_ref.write_kv, donate_argnums=(0, 1))(
        cache.k, cache.v, slots, k_rows, v_rows)
    tables = jnp.asarray(np.arange(n_pages - rows // page, n_pages)[None], jnp.int32)
    args = (f(1, 1, heads, hd), f(1, 1, kv, hd), f(1, 1, kv, hd), k_cache, v_cache,
            jnp.int32(n_layers - 1), tables, jnp.asarray([rows], jnp.int32),
            jnp.asarray([[rows]], jnp.int32))
    got = jax.jit(partial(paged_attention_gpu.paged_attention, scale=hd ** -0.5))(*args)
    want = jax.jit(partial(paged_attention_ref.paged_attention, scale=hd ** -0.5))(*args)
    err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
    del k_cache, v_cache, args
    return dict(kv_dtype=kv_dtype, context=ctx, layer=n_layers - 1, max_abs_err=err,
                ok=err < 3e-2)


def gpu_prefill(tokens: int, cached: int, n_layers: int, reference: bool = False,
                **knobs) -> dict:
    """A prefill chunk of `tokens` over `cached` tokens (8B shape, bf16 pages): time per
    layer and attention TFLOP/s (QK and PV, causal: only the visible pairs count)."""
    from ktjax.engine import kv_cache
    from ktjax.models.base import KVCacheSpec
    heads, kv, hd, page = 32, 8, 128, 16
    spec = KVCacheSpec(n_layers, kv, hd, hd)
    n_pages = -(-(cached + tokens) // page) + 1
    cache = kv_cache.make_kv_cache(spec, n_pages, page, "bfloat16")
    rng = np.random.default_rng(0)
    tables = jnp.asarray(np.arange(1, n_pages)[None], jnp.int32)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    q, k_new, v_new = f(1, tokens, heads, hd), f(1, tokens, kv, hd), f(1, tokens, kv, hd)
    lens = jnp.asarray([cached], jnp.int32)
    positions = jnp.asarray(cached + np.arange(tokens)[None], jnp.int32)
    attend = paged_attention_ref.paged_attention if reference else \
        partial(paged_attention_gpu.paged_attention, **knobs)

    @jax.jit
    def step(q, k_cache, v_cache):
        def layer(x, i):      # the output is the next layer's query, as in decode
            return attend(x, k_new, v_new, k_cache, v_cache, i, tables, lens, positions,
                          scale=hd ** -0.5), None
        return jax.lax.scan(layer, q, jnp.arange(n_layers, dtype=jnp.int32))[0]

    seconds = best_of(step, (q, cache.k, cache.v), calls=4) / n_layers
    pairs = tokens * cached + tokens * (tokens + 1) // 2
    del cache
    return dict(prefill_tokens=tokens, cached=cached, kernel="reference" if reference
                else "pallas", knobs=knobs, us_per_layer=seconds * 1e6,
                attention_TFLOPs=4 * heads * hd * pairs / seconds / 1e12)


# Variants of the kernel's knobs, each timed at every context (bf16 pages; the int8 ones
# with int8 pages), the defaults first as the baseline of the same run: the combine (XLA's fusions against the kernel), the cache addressed per
# key, split counts against the default (~264 programs), keys per loop step, pipeline depth,
# warps.
SWEEP_BF16 = ({}, {"combine": "xla"}, {"key_rows": True}, {"n_splits": 8}, {"n_splits": 16},
              {"n_splits": 66}, {"min_blocks_per_split": 4}, {"pages_per_block": 2},
              {"pages_per_block": 8}, {"num_stages": 3}, {"num_stages": 4},
              {"num_warps": 8}, {"pages_per_block": 8, "num_stages": 3})
SWEEP_INT8 = ({}, {"key_rows": True}, {"pages_per_block": 8}, {"pages_per_block": 16},
              {"num_stages": 3}, {"num_warps": 8}, {"n_splits": 16})
PARTS = ("decode", "far", "batch", "prefill", "reference", "sweep")


def main_gpu(args) -> None:
    import json
    import os
    smoke = os.environ.get("SMOKE") == "1"
    n_layers = 2 if smoke else 32
    contexts = [64, 256] if smoke else [int(c) for c in args.contexts.split(",")]
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; known: {', '.join(PARTS)}")
    device = jax.devices()[0]
    result = dict(device=str(device.device_kind), jax=jax.__version__, layers=n_layers,
                  unroll=args.unroll, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  shape="llama3-8b: 32 heads, 8 kv heads, head_dim 128, page 16")
    hbm = hbm_read_bandwidth(2 ** 20 if smoke else 4 * 2 ** 30)
    result["hbm_read_GBps"] = hbm / 1e9
    print(f"{device.device_kind}: HBM read {hbm / 1e9:.0f} GB/s (bfloat16 sum); "
          f"layers {'unrolled' if args.unroll else 'in a scan'}")
    runs = result["decode"] = []

    def save():   # after every run: a timeout keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    def run(ctx, kv_dtype, weights=0, **kw):
        try:
            r = gpu_decode(ctx, kv_dtype, n_layers, weights, unroll=args.unroll, **kw)
        except Exception as e:  # noqa: BLE001 -- record the failure, measure the rest
            traceback.print_exc()
            runs.append(dict(context=ctx, kv_dtype=kv_dtype, knobs=kw,
                             error=f"{type(e).__name__}: {e}"[:3000]))
            return save()
        r["fraction_of_hbm"] = r["kv_read_GBps"] * 1e9 / hbm
        stats = getattr(device, "memory_stats", lambda: None)() or {}
        r["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        runs.append(r)
        save()
        print(f"decode ctx {ctx:>6} {kv_dtype:>8} b{r['batch']} {r['kernel']} {kw or ''}: "
              f"{r['us_per_layer']:8.1f} us/layer, KV read {r['kv_read_GBps']:6.0f} GB/s = "
              f"{100 * r['fraction_of_hbm']:.0f}% of HBM"
              + (f"; held {r['bytes_held'] / 1e9:.1f} GB (cache + 8B bf16 weights) on one GPU"
                 if weights else ""), flush=True)

    if "decode" in parts:
        for kv_dtype in ("bfloat16", "int8"):
            for ctx in contexts:
                longest_int8 = kv_dtype == "int8" and ctx == max(contexts)
                run(ctx, kv_dtype, (2 ** 20 if smoke else 16 * 10 ** 9) if longest_int8 else 0)
    if "far" in parts:
        for kv_dtype in ("bfloat16", "int8"):      # correctness past 4 GiB of cache
            try:
                c = gpu_far_pages_check(kv_dtype, n_layers, max(contexts))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                c = dict(kv_dtype=kv_dtype, error=f"{type(e).__name__}: {e}"[:3000])
            result.setdefault("far_pages_check", []).append(c)
            save()
            print(f"far pages check {c}")
    if "batch" in parts:
        for kv_dtype in ("bfloat16", "int8"):      # serving: 8 rows at the shortest context
            run(contexts[0], kv_dtype, batch=8)
    if "prefill" in parts:
        for reference, knobs in ((False, {}), (True, {}),
                                 (False, {"block_m": 128, "num_warps": 8}),
                                 (False, {"num_warps": 8})):
            try:
                p = gpu_prefill(64 if smoke else 512, 64 if smoke else 1536, n_layers,
                                reference, **knobs)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                p = dict(kernel="reference" if reference else "pallas", knobs=knobs,
                         error=f"{type(e).__name__}: {e}"[:3000])
            result.setdefault("prefill", []).append(p)
            save()
            print(f"prefill {p}")
    if "reference" in parts:
        run(contexts[0], "bfloat16", reference=True)
    if "sweep" in parts:    # variant by variant, so a time limit cuts whole variants
        variants = [("bfloat16", k) for k in (SWEEP_BF16[:3] if smoke else SWEEP_BF16)] + \
            [("int8", k) for k in (SWEEP_INT8[:2] if smoke else SWEEP_INT8)]
        for kv_dtype, knobs in variants:
            for ctx in contexts:
                run(ctx, kv_dtype, **knobs)
    best = {}
    for r in runs:
        if "fraction_of_hbm" in r and r["kernel"] == "pallas" and r["batch"] == 1:
            key = (r["context"], r["kv_dtype"])
            if r["fraction_of_hbm"] > best.get(key, {}).get("fraction_of_hbm", -1):
                best[key] = r
    result["best"] = [dict(context=c, kv_dtype=d, knobs=r["knobs"],
                           us_per_layer=r["us_per_layer"],
                           fraction_of_hbm=r["fraction_of_hbm"])
                      for (c, d), r in sorted(best.items())]
    save()
    for b in result["best"]:
        print(f"best ctx {b['context']:>6} {b['kv_dtype']:>8}: {b['us_per_layer']:8.1f} "
              f"us/layer = {100 * b['fraction_of_hbm']:.0f}% of HBM with "
              f"{b['knobs'] or 'defaults'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,128")
    ap.add_argument("--cached", default="0,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="Pallas decode on the GPU (see above)")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--json", default=None, help="GPU mode: write the figures here")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"GPU mode: which measurements ({', '.join(PARTS)})")
    ap.add_argument("--unroll", action="store_true",
                    help="GPU mode: unroll the layers instead of a scan")
    args = ap.parse_args()
    if args.gpu:
        return main_gpu(args)
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
