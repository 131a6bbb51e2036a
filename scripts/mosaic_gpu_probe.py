#!/usr/bin/env python
"""Mosaic GPU for paged attention: the questions before porting the Pallas kernels off the
deprecated Triton lowering (docs/kernel-notes.md, "gpu-attention, second pass"). Two
kernels over an 8B-shaped cache ([pages, 16, 8 heads, 128] bfloat16, the engine's layout),
a program per (sequence, KV head, split of the context), plgpu.emit_pipeline over the split's
pages with each step a TMA copy of a page's [16, 128] tile (rows strided by the 8 heads) at
the coordinates the block table gives, max_concurrent_steps copies in flight:

- read: adds each key tile into a float32 accumulator. Can TMA page copies reach HBM speed?
- decode: flash-decoding of one query token: the group's 4 query heads padded to wgmma's 64
  rows, S = Q K^T (wgmma, K transposed in shared memory), online softmax, O += P V (wgmma
  with K = 16 keys: V's tile swizzled at 32 bytes), partials per split merged in jnp. Does a
  wgmma decode compile and run, and how near HBM does it get?

Each is checked against jnp on random pages first, then 32 layers' caches are read in one
jitted scan (as a decode step does) and timed against a bfloat16 sum over 4 GiB in the same
run, per context, pipeline depth and split count. Every context's pages are full.

    python scripts/mosaic_gpu_probe.py [--kernels read,decode] [--contexts 4096,32768,131072]
        [--json out.json]

SMOKE=1: tiny sizes on CPU: `read` runs in the Mosaic GPU interpreter; `decode` is only
lowered for CUDA (the interpreter has no transposed shared-memory operand for wgmma).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import best_of, hbm_read_bandwidth  # noqa: E402

KV_HEADS, HEAD_DIM, PAGE, REP = 8, 128, 16, 4
WGMMA_ROWS = 64


def _kernel(body, out_type, grid, interpret, scratch_types=()):
    extra = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        extra["interpret"] = InterpretGPUParams()
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch_types, grid=grid,
        grid_names=("b", "g", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **extra)


def paged_sum(cache: jax.Array, tables: jax.Array, *, n_splits: int, steps: int,
              interpret: bool = False) -> jax.Array:
    """cache [P, page, n_kv, d], tables [B, n] page ids -> [B, n_kv, n_splits, page, d]:
    each split's pages of each head summed in float32 (n divisible by n_splits)."""
    _, page, n_kv, d = cache.shape
    b, n = tables.shape
    per = n // n_splits

    def body(cache_gmem, tab_gmem, o_gmem):
        bi, g, s = (lax.axis_index(a) for a in ("b", "g", "s"))
        acc = plgpu.emit_pipeline(
            lambda _, tile, acc: acc + tile[...].astype(jnp.float32),
            grid=(per,),
            in_specs=[plgpu.BlockSpec((None, page, None, d),
                                      lambda j: (tab_gmem[bi, s * per + j], 0, g, 0))],
            max_concurrent_steps=steps,
            init_carry=jnp.zeros((page, d), jnp.float32),
        )(cache_gmem)
        o_gmem[bi, g, s] = acc

    out = jax.ShapeDtypeStruct((b, n_kv, n_splits, page, d), jnp.float32)
    return _kernel(body, out, (b, n_kv, n_splits), interpret)(cache, tables)


def paged_sum_reference(cache, tables, n_splits):
    pages = cache[tables].astype(jnp.float32)                    # [B, n, page, n_kv, d]
    b, n, page, n_kv, d = pages.shape
    return pages.reshape(b, n_splits, n // n_splits, page, n_kv, d).sum(2) \
        .transpose(0, 3, 1, 2, 4)


def decode_partials(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, tables: jax.Array,
                    *, n_splits: int, steps: int, interpret: bool = False):
    """q [B, n_kv, 64, d] (the group's heads, scaled, padded to 64 rows), caches [P, page,
    n_kv, d], tables [B, n] (full pages) -> each split's (unnormalized output [B, n_kv, S,
    64, d], running max, sum [B, n_kv, S, 64])."""
    b, n_kv, rows, d = q.shape
    page = k_cache.shape[1]
    n = tables.shape[1]
    per = n // n_splits
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    # PV contracts over one page (16 keys): V's tile needs a 32-byte swizzle
    v_swizzled = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))

    def body(q_gmem, k_gmem, v_gmem, tab_gmem, o_gmem, m_gmem, l_gmem, q_smem, q_bar):
        bi, g, s = (lax.axis_index(a) for a in ("b", "g", "s"))
        plgpu.copy_gmem_to_smem(q_gmem.at[bi, g], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)

        def step(_, k_tile, v_tile, carry):
            acc, m, l = carry

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
                return acc_ref[...]
            scores = pl.run_scoped(qk, plgpu.ACC((rows, page), jnp.float32))
            m_new = jnp.maximum(m, scores.max(axis=1))
            p = jnp.exp(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=1)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(q_smem.dtype), v_tile)
                return acc_ref[...]
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + \
                pl.run_scoped(pv, plgpu.ACC((rows, d), jnp.float32))
            return acc, m_new, l

        page_at = lambda j: (tab_gmem[bi, s * per + j], 0, g, 0)        # noqa: E731
        init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -1e30, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, m, l = plgpu.emit_pipeline(
            step, grid=(per,),
            in_specs=[plgpu.BlockSpec((None, page, None, d), page_at, transforms=swizzled),
                      plgpu.BlockSpec((None, page, None, d), page_at,
                                      transforms=v_swizzled)],
            max_concurrent_steps=steps, init_carry=init)(k_gmem, v_gmem)
        o_gmem[bi, g, s] = acc
        m_gmem[bi, g, s] = m
        l_gmem[bi, g, s] = l

    part = (b, n_kv, n_splits, rows)
    out = (jax.ShapeDtypeStruct((*part, d), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
           jax.ShapeDtypeStruct(part, jnp.float32))
    scratch = [plgpu.SMEM((rows, d), q.dtype, transforms=swizzled), plgpu.Barrier(num_arrivals=1)]
    return _kernel(body, out, (b, n_kv, n_splits), interpret, scratch)(q, k_cache, v_cache,
                                                                       tables)


def decode(q, k_cache, v_cache, tables, *, n_splits, steps, interpret=False):
    """q [B, H, d] one token per sequence -> [B, H, d] (float32): the kernel's partials
    merged in jnp."""
    b, h, d = q.shape
    n_kv = k_cache.shape[2]
    qg = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype).reshape(b, n_kv, h // n_kv, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, WGMMA_ROWS - h // n_kv), (0, 0)))
    o, m, l = decode_partials(qg, k_cache, v_cache, tables, n_splits=n_splits, steps=steps,
                              interpret=interpret)
    w = jnp.exp(m - m.max(axis=2, keepdims=True))
    out = (o * w[..., None]).sum(2) / (l * w).sum(2)[..., None]
    return out[:, :, :h // n_kv].reshape(b, h, d)


def decode_reference(q, k_cache, v_cache, tables):
    b, h, d = q.shape
    n_kv = k_cache.shape[2]
    k = k_cache[tables].astype(jnp.float32).reshape(b, -1, n_kv, d)
    v = v_cache[tables].astype(jnp.float32).reshape(b, -1, n_kv, d)
    qg = q.astype(jnp.float32).reshape(b, n_kv, h // n_kv, d) * d ** -0.5
    p = jax.nn.softmax(jnp.einsum("bgrd,bsgd->bgrs", qg, k), axis=-1)
    return jnp.einsum("bgrs,bsgd->bgrd", p, v).reshape(b, h, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="read,decode")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    smoke = os.environ.get("SMOKE") == "1"
    contexts = [256] if smoke else [int(c) for c in args.contexts.split(",")]
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, runs=[],
                  checks={})
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)

    kernels = args.kernels.split(",")
    for name in kernels:   # correctness first: random pages, a scattered table
        n = 64 if smoke else 512
        k_cache, v_cache = f(n + 1, PAGE, KV_HEADS, HEAD_DIM), f(n + 1, PAGE, KV_HEADS, HEAD_DIM)
        tables = jnp.asarray(rng.permutation(np.arange(1, n + 1))[None], jnp.int32)
        try:
            if name == "read":
                got = jax.jit(partial(paged_sum, n_splits=4, steps=2, interpret=smoke))(
                    k_cache, tables)
                want = paged_sum_reference(k_cache, tables, 4)
            elif smoke:     # decode: lowering only (see the docstring)
                q = f(1, KV_HEADS * REP, HEAD_DIM)
                text = jax.jit(partial(decode, n_splits=4, steps=2)).trace(
                    q, k_cache, v_cache, tables).lower(lowering_platforms=("cuda",)).as_text()
                result["checks"][name] = dict(lowered="mosaic_gpu" in text)
                print(f"check {name}: {result['checks'][name]}", flush=True)
                continue
            else:
                q = f(1, KV_HEADS * REP, HEAD_DIM)
                got = jax.jit(partial(decode, n_splits=4, steps=2))(q, k_cache, v_cache, tables)
                want = decode_reference(q, k_cache, v_cache, tables)
            err = float(jnp.abs(got - want).max())
            result["checks"][name] = dict(max_abs_err=err, ok=err < 2e-2)
        except Exception as e:  # noqa: BLE001 -- the failure is the finding
            traceback.print_exc()
            result["checks"][name] = dict(error=f"{type(e).__name__}: {e}"[:3000])
        print(f"check {name}: {result['checks'][name]}", flush=True)
        save()
    timed = [k for k in kernels if result["checks"].get(k, {}).get("ok")]
    if not timed:
        return
    hbm = hbm_read_bandwidth(2 ** 20 if smoke else 4 * 2 ** 30)
    result["hbm_read_GBps"] = hbm / 1e9
    print(f"{result['device']}: HBM read {hbm / 1e9:.0f} GB/s", flush=True)
    layers = 2 if smoke else 32
    for ctx in contexts:
        # `layers` layers, each with its own pages (no L2 reuse between layers), read in one
        # jitted scan: launch overhead as in a decode step
        n = ctx // PAGE
        shape = (layers * n + 1, PAGE, KV_HEADS, HEAD_DIM)
        k_cache, v_cache = jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(np.arange(1, n + 1))[None], jnp.int32)
        q = f(1, KV_HEADS * REP, HEAD_DIM)
        for name in timed:
            for steps in ((2,) if smoke else (4, 8)):
                for splits in ((4,) if smoke else (32, 64)):
                    run = dict(kernel=name, context=ctx, layers=layers, steps=steps,
                               splits=splits)
                    try:
                        # the caches are arguments: closed over, jit would embed them
                        if name == "read":
                            def one(k, v, t, steps=steps, splits=splits):
                                return paged_sum(k, t, n_splits=splits, steps=steps,
                                                 interpret=smoke)
                            read = n * PAGE * KV_HEADS * HEAD_DIM * 2
                        else:
                            def one(k, v, t, steps=steps, splits=splits):
                                return decode(q, k, v, t, n_splits=splits, steps=steps)
                            read = 2 * n * PAGE * KV_HEADS * HEAD_DIM * 2

                        @jax.jit
                        def step(k, v, tables, one=one):
                            return lax.scan(lambda c, i: (c, one(k, v, tables + i * n)),
                                            None, jnp.arange(layers, dtype=jnp.int32))[1]
                        seconds = best_of(step, (k_cache, v_cache, tables), calls=5) / layers
                        run.update(us_per_layer=seconds * 1e6, GBps=read / seconds / 1e9,
                                   fraction_of_hbm=read / seconds / hbm)
                        print(f"{name:>6} ctx {ctx:>6} steps {steps} splits {splits:>3}: "
                              f"{seconds * 1e6:8.1f} us/layer, {read / seconds / 1e9:6.0f} GB/s"
                              f" = {100 * read / seconds / hbm:.0f}% of HBM", flush=True)
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        run["error"] = f"{type(e).__name__}: {e}"[:3000]
                    result["runs"].append(run)
                    save()
        del k_cache, v_cache


if __name__ == "__main__":
    main()
