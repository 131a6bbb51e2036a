"""Our AMX GEMM against oneDNN's (Intel's AMX kernels, through PyTorch) on this host, same process.

bench_moe's qlen-1024 figures are a DeepSeek-V3 layer's expert GEMMs: about 128 tokens per
expert at 64 experts, 32 at 256. This times one weight of each shape, held in cache, at those
token counts, every kernel in turn within each round (the AMX host's rate drifts between
and within runs), beside the AMX compute roofline measured in the same rounds:

    python scripts/bench_gemm_peers.py [--shapes 2048x7168,7168x2048] [--tokens 32,128,1024]
                                       [--rounds 3] [--threads 16]

One JSON line per shape and token count: TFLOPS (int8: TOPS) per round for ours (bf16 and
int8 with row scales, activations quantized inside the call) and oneDNN's (bf16 matmul; u8 x
s8 quantized linear with x quantized beforehand), and amx_peak_tops. Needs an AMX CPU and a
PyTorch build with oneDNN (the device machine has one; it is not a ktjax dependency).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from types import ModuleType
from typing import Callable

import numpy as np

from ktjax import _native


def best_seconds(call: Callable[[], object], iters: int) -> float:
    call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def onednn_calls(torch: ModuleType, w: np.ndarray, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """oneDNN's bf16 matmul and int8 linear (u8 activations, s8 weights per channel) on w, x."""
    tw, tx = torch.from_numpy(w).to(torch.bfloat16), torch.from_numpy(x).to(torch.bfloat16)
    fw = torch.from_numpy(w)
    scales = fw.abs().amax(dim=1).double() / 127
    qw = torch.quantize_per_channel(fw, scales, torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    qx = torch.quantize_per_tensor(torch.from_numpy(x), float(np.abs(x).max()) / 127, 128, torch.quint8)
    return {"onednn_bf16": lambda: torch.nn.functional.linear(tx, tw),
            "onednn_int8": lambda: torch.ops.quantized.linear(qx, packed, 1.0, 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2048x7168,7168x2048", help="comma list of NxK weights")
    p.add_argument("--tokens", default="32,128,1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=16)
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench_gemm_peers.py needs PyTorch (oneDNN is the peer it times)")
    if _native.active_isa() != "amx":
        sys.exit(f"bench_gemm_peers.py compares AMX kernels; this CPU's best is {_native.active_isa()}")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "onednn"
    _native.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cases = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((n, k), dtype=np.float32)
        handles = {"ours_bf16": _native.pack_float_weight(w, "bf16"),
                   "ours_int8": _native.pack_float_weight(w, "int8_row")}
        for t in (int(v) for v in args.tokens.split(",")):
            x = rng.standard_normal((t, k), dtype=np.float32)
            calls = {name: (lambda h=h, x=x: _native.time_linear([h], x, "", 1)) for name, h in handles.items()}
            calls.update(onednn_calls(torch, w, x))
            cases.append(({"shape": shape, "tokens": t}, 2 * n * k * t, calls))
    rows = [dict(c[0], **{name: [] for name in c[2]}, amx_peak_tops=[]) for c in cases]
    for _ in range(args.rounds):
        for row, (_, ops, calls) in zip(rows, cases):
            row["amx_peak_tops"].append(round(_native.amx_tile_peak_tops(), 1))
            iters = max(3, int(2e10 // ops))
            for name, call in calls.items():
                row[name].append(round(ops / best_seconds(call, iters) / 1e12, 2))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
