#!/usr/bin/env python
"""Can a Mosaic GPU kernel read paged KV at HBM speed? (the question before porting the
Pallas attention off the deprecated Triton lowering; docs/kernel-notes.md, "gpu-attention,
second pass").

The kernel reads one KV head's pages of an 8B-shaped cache ([pages, 16, 8 heads, 128]
bfloat16, the engine's layout) through a table, as decode attention does: a program per
(sequence, KV head, split of the context) runs plgpu.emit_pipeline over its pages, each
step a TMA copy of the page's [16, 128] tile (rows strided by the 8 heads) into shared memory
at the coordinates the block table gives, max_concurrent_steps copies in flight, and adds the
tile into a float32 accumulator (the arithmetic a decode step's QK dot would replace). 32
layers' caches are read in one jitted scan (as a decode step does), timed against a
bfloat16 sum over 4 GiB in the same run, per context, pipeline depth and split count; first
checked against jnp on random pages. Reads keys only: the bytes are half a layer's KV.

    python scripts/mosaic_paged_read.py [--contexts 4096,32768,131072] [--json out.json]

SMOKE=1: tiny sizes in the Mosaic GPU interpreter (CPU check; jax >= 0.10.2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import jax.experimental.pallas.mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import best_of, hbm_read_bandwidth  # noqa: E402

KV_HEADS, HEAD_DIM, PAGE = 8, 128, 16


def paged_sum(cache: jax.Array, tables: jax.Array, *, n_splits: int, steps: int,
              interpret: bool = False) -> jax.Array:
    """cache [P, page, n_kv, d], tables [B, n] page ids -> [B, n_kv, n_splits, page, d]:
    each split's pages of each head summed in float32 (n divisible by n_splits)."""
    _, page, n_kv, d = cache.shape
    b, n = tables.shape
    per = n // n_splits

    def body(cache_gmem, tab_gmem, o_gmem):
        bi, g, s = (jax.lax.axis_index(a) for a in ("b", "g", "s"))
        acc = plgpu.emit_pipeline(
            lambda _, tile, acc: acc + tile[...].astype(jnp.float32),
            grid=(per,),
            in_specs=[plgpu.BlockSpec((None, page, None, d),
                                      lambda j: (tab_gmem[bi, s * per + j], 0, g, 0))],
            max_concurrent_steps=steps,
            init_carry=jnp.zeros((page, d), jnp.float32),
        )(cache_gmem)
        o_gmem[bi, g, s] = acc

    extra = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        extra["interpret"] = InterpretGPUParams()
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((b, n_kv, n_splits, page, d), jnp.float32),
        grid=(b, n_kv, n_splits), grid_names=("b", "g", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **extra)
    return kernel(cache, tables)


def reference(cache: jax.Array, tables: jax.Array, n_splits: int) -> jax.Array:
    pages = cache[tables].astype(jnp.float32)                    # [B, n, page, n_kv, d]
    b, n, page, n_kv, d = pages.shape
    return pages.reshape(b, n_splits, n // n_splits, page, n_kv, d).sum(2) \
        .transpose(0, 3, 1, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    smoke = os.environ.get("SMOKE") == "1"
    interpret = smoke
    contexts = [256] if smoke else [int(c) for c in args.contexts.split(",")]
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, runs=[])

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    rng = np.random.default_rng(0)
    try:   # correctness first: random pages, scattered table
        n = 64 if smoke else 512
        cache = jnp.asarray(rng.standard_normal((n + 1, PAGE, KV_HEADS, HEAD_DIM)),
                            jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(np.arange(1, n + 1))[None], jnp.int32)
        got = jax.jit(partial(paged_sum, n_splits=4, steps=2, interpret=interpret))(
            cache, tables)
        err = float(jnp.abs(got - reference(cache, tables, 4)).max())
        result["check"] = dict(max_abs_err=err, ok=err < 1e-2)
    except Exception as e:  # noqa: BLE001 -- the failure is the finding
        traceback.print_exc()
        result["check"] = dict(error=f"{type(e).__name__}: {e}"[:3000])
    print(f"check {result['check']}", flush=True)
    save()
    if "error" in result["check"] and not smoke:
        return
    hbm = hbm_read_bandwidth(2 ** 20 if smoke else 4 * 2 ** 30)
    result["hbm_read_GBps"] = hbm / 1e9
    print(f"{result['device']}: HBM read {hbm / 1e9:.0f} GB/s", flush=True)
    layers = 2 if smoke else 32
    for ctx in contexts:
        # one cache of `layers` layers, each layer's pages its own (no L2 reuse between
        # layers), all read in one jitted scan: launch overhead as in a decode step
        n = ctx // PAGE
        cache = jnp.zeros((layers * n + 1, PAGE, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(np.arange(1, n + 1))[None], jnp.int32)
        for steps in ((2,) if smoke else (2, 4, 8)):
            for splits in ((4,) if smoke else (16, 32, 64)):
                run = dict(context=ctx, layers=layers, steps=steps, splits=splits)
                try:
                    kernel = partial(paged_sum, n_splits=splits, steps=steps,
                                     interpret=interpret)

                    @jax.jit
                    def step(cache, tables, kernel=kernel):
                        return jax.lax.scan(lambda c, i: (c, kernel(cache, tables + i * n)),
                                            None, jnp.arange(layers, dtype=jnp.int32))[1]
                    seconds = best_of(step, (cache, tables), calls=5) / layers
                    read = n * PAGE * KV_HEADS * HEAD_DIM * 2
                    run.update(us_per_layer=seconds * 1e6, GBps=read / seconds / 1e9,
                               fraction_of_hbm=read / seconds / hbm)
                    print(f"ctx {ctx:>6} steps {steps} splits {splits:>3}: {seconds * 1e6:8.1f} "
                          f"us/layer, {read / seconds / 1e9:6.0f} GB/s = "
                          f"{100 * read / seconds / hbm:.0f}% of HBM", flush=True)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    run["error"] = f"{type(e).__name__}: {e}"[:3000]
                result["runs"].append(run)
                save()
        del cache

if __name__ == "__main__":
    main()
