#!/usr/bin/env python
"""Quantized device matmuls (ktjax.device_quant) against the dense bf16 dot, per form and row
count: the reduction form (codes -> values -> products -> sums in one fusion), the
dequantize + dot form and the Pallas GEMV (ktjax/kernels/quant_matmul.py; GPU only), on a
Llama-3-8B FFN matrix.

  python scripts/bench_quant_matmul.py --json            # on the GPU
  python scripts/bench_quant_matmul.py --n 512 --k 256   # small, anywhere
  python scripts/bench_quant_matmul.py --sweep --json    # + the GEMV's launch shapes

--sweep times the GEMV at every launch shape of SWEEP (rows per program x values per loop
step x warps) at the first row count of each math kind (FMA rows, tensor-core rows), keeps
the best in `pallas_us` (its shape in `pallas_tuning`, the key=value form KTJAX_QUANT_GEMV
takes) and uses that winner for the kind's other rows and qtypes.

Each figure is the best of --repeats timings of --calls back-to-back calls (dispatch is
asynchronous, so launch latency overlaps); `weight_gbps` = the matrix's stored bytes / time,
the figure a bandwidth-bound decode matmul is judged by.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ktjax import device_quant as dq
from ktjax.kernels import quant_matmul

T = gguf.GGMLQuantizationType
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
              T.Q6_K: (208,)}


def random_matrix(qtype: T, n: int, k: int, rng) -> dq.QuantMatrix:
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // elems, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = np.full((n, k // elems), 1e-3, np.float16).view(
            np.uint8).reshape(n, k // elems, 2)
    arrays, statics = dq.pack_gguf(raw.reshape(n, -1), qtype, (n, k))
    return dq.QuantMatrix(**{a: jnp.asarray(v) for a, v in arrays.items()}, **statics,
                          format="keep")


SWEEP = {"rows": (8, 16, 32), "values": (512, 1024, 2048), "warps": (4, 8)}


def tuning_spec(t: quant_matmul.GemvTuning) -> str:
    return f"rows={t.rows},values={t.values},warps={t.warps},stages={t.stages}," \
        f"magic={int(t.magic)}"


def time_gemv(qm, x, tunings, calls: int, repeats: int) -> tuple[float, str] | str:
    """(best seconds, its tuning spec) over `tunings`, or the first error's text."""
    best, error = None, None
    for t in tunings:
        if not quant_matmul.supported(qm, x.shape[0], t.rows or None):
            continue
        try:
            g = jax.jit(functools.partial(quant_matmul.gemv, tuning=t))
            s = timed(g, qm, x, calls=calls, repeats=repeats)
        except Exception as e:  # noqa: BLE001 - a lowering failure is a result here
            error = error or f"{tuning_spec(t)}: {type(e).__name__}: {str(e)[:300]}"
            continue
        if best is None or s < best[0]:
            best = (s, tuning_spec(t))
    return best or error or "no launch shape takes this matrix"


def timed(f, *args, calls: int, repeats: int) -> float:
    """Best seconds per call."""
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            y = f(*args)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", default="1,2,4,8,16,64,512")
    ap.add_argument("--qtypes", default="Q4_K,Q8_0,Q6_K")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="try the GEMV's launch shapes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dense = jnp.asarray(rng.standard_normal((args.n, args.k)).astype(np.float32) * 0.02,
                        jnp.bfloat16)
    dense_dot = jax.jit(lambda w, x: jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    results = []
    winners: dict = {}        # "fma" / "dot" rows -> the sweep's best GemvTuning
    for name in args.qtypes.split(","):
        qm = random_matrix(T[name], args.n, args.k, rng)
        for m in [int(r) for r in args.rows.split(",")]:
            x = jnp.asarray(rng.standard_normal((m, args.k)), jnp.bfloat16)
            row = {"qtype": name, "n": args.n, "k": args.k, "rows": m,
                   "weight_bytes": qm.nbytes}
            for form, limit in (("reduce", 1 << 30), ("dot", 0)):
                os.environ["KTJAX_QUANT_REDUCE_ROWS"] = str(limit)
                f = jax.jit(dq.linear)           # the form is picked at trace time
                s = timed(f, qm, x, calls=args.calls, repeats=args.repeats)
                row[f"{form}_us"] = s * 1e6
                row[f"{form}_weight_gbps"] = qm.nbytes / s / 1e9
            default = quant_matmul.tuning_from_env()
            kind = "dot" if m >= quant_matmul.DOT_ROWS else "fma"
            if args.sweep and kind not in winners:
                tunings = [dataclasses.replace(default, rows=r, values=v, warps=w)
                           for r, v, w in itertools.product(*SWEEP.values())]
                tunings.append(dataclasses.replace(default, magic=not default.magic))
            else:
                tunings = [winners.get(kind, default)]
            got = time_gemv(qm, x, tunings, args.calls, args.repeats)
            if isinstance(got, str):
                row["pallas_error"] = got
            else:
                row["pallas_us"] = got[0] * 1e6
                row["pallas_weight_gbps"] = qm.nbytes / got[0] / 1e9
                row["pallas_tuning"] = got[1]
                if args.sweep:
                    winners.setdefault(kind, next(t for t in tunings
                                                  if tuning_spec(t) == got[1]))
            s = timed(dense_dot, dense, x, calls=args.calls, repeats=args.repeats)
            row["bf16_dot_us"] = s * 1e6
            row["bf16_weight_gbps"] = dense.nbytes / s / 1e9
            row["best"] = min((f for f in ("reduce", "dot", "pallas") if f"{f}_us" in row),
                              key=lambda f: row[f"{f}_us"])
            results.append(row)
            if not args.json:
                print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    os.environ.pop("KTJAX_QUANT_REDUCE_ROWS", None)
    if args.json:
        print(json.dumps({"device": jax.devices()[0].device_kind, "results": results}))


if __name__ == "__main__":
    main()
