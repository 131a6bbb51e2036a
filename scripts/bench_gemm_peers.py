"""Our AMX GEMM against oneDNN's (Intel's AMX kernels, through PyTorch) on this host, same process.

bench_moe's qlen-1024 figures are a DeepSeek-V3 layer's expert GEMMs: about 128 tokens per
expert at 64 experts, 32 at 256. This times one weight of each shape, held in cache, at those
token counts, every kernel in turn within each round (the AMX host's rate drifts between
and within runs), beside the AMX compute roofline measured in the same rounds:

    python scripts/bench_gemm_peers.py [--shapes 2048x7168,7168x2048] [--tokens 32,128,1024]
                                       [--rounds 3] [--threads 16]

One JSON line per shape and token count: TFLOPS (int8: TOPS) per round for ours (bf16 and
int8 with row scales, activations quantized inside the call) and oneDNN's (bf16 matmul; u8 x
s8 quantized linear with x quantized beforehand, writing u8 as PyTorch's quantized linear does,
and f32 as ours does), and amx_peak_tops. Needs an AMX CPU and a PyTorch build with oneDNN
(the device machine has one; it is not a ktjax dependency).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import sys
import time
from types import ModuleType
from typing import Callable

import numpy as np

from ktjax import _native


def wall_seconds(call: Callable[[], object]) -> Callable[[], float]:
    """`call` timed by the wall clock."""
    def run() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    return run


def best_seconds(run: Callable[[], float], iters: int) -> float:
    run()
    return min(run() for _ in range(iters))


def keep_freed_memory() -> None:
    """Serve every block from the heap and keep freed ones (glibc). Otherwise glibc maps each
    block over 32 MiB afresh and unmaps it on free, and each oneDNN call, whose output PyTorch
    allocates, faults its pages in again (allocating and touching 128 MiB: 7 ms that way, 0.3
    ms reused, numpy on the 2-core machine)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def onednn_calls(torch: ModuleType, w: np.ndarray, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """oneDNN's bf16 matmul and int8 linears (u8 activations, s8 weights per channel) on w, x,
    writing u8 (torch.ops.quantized) and f32 (torch.ops.onednn, as PyTorch's compiler calls it)."""
    tw, tx = torch.from_numpy(w).to(torch.bfloat16), torch.from_numpy(x).to(torch.bfloat16)
    fw, fx = torch.from_numpy(w), torch.from_numpy(x)
    scales = fw.abs().amax(dim=1).double() / 127
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)
    qw = torch.quantize_per_channel(fw, scales, zeros, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    x_scale = float(np.abs(x).max()) / 127
    qx = torch.quantize_per_tensor(fx, x_scale, 128, torch.quint8)
    qx_u8 = qx.int_repr()
    packed_f32 = torch.ops.onednn.qlinear_prepack(qw.int_repr(), list(x.shape))
    return {"onednn_bf16": lambda: torch.nn.functional.linear(tx, tw),
            "onednn_int8": lambda: torch.ops.quantized.linear(qx, packed, 1.0, 0),
            "onednn_int8_f32": lambda: torch.ops.onednn.qlinear_pointwise(
                qx_u8, x_scale, 128, packed_f32, scales.float(), zeros, None, 1.0, 0,
                torch.float32, "none", [None], "")}


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
    keep_freed_memory()
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
            # Ours as time_linear times the call itself: its binding first allocates and zeroes
            # y, which a caller of the kernel provides (timed around the binding, [7168, 2048]
            # at 1024 tokens on 16 threads read 6.0-6.7 TOPS against 10.7-11.7 inside).
            runs = {name: (lambda h=h, x=x: _native.time_linear([h], x, "", 1)) for name, h in handles.items()}
            runs.update({name: wall_seconds(call) for name, call in onednn_calls(torch, w, x).items()})
            cases.append(({"shape": shape, "tokens": t}, 2 * n * k * t, runs))
    rows = [dict(c[0], **{name: [] for name in c[2]}, amx_peak_tops=[]) for c in cases]
    for _ in range(args.rounds):
        for row, (_, ops, runs) in zip(rows, cases):
            row["amx_peak_tops"].append(round(_native.amx_tile_peak_tops(), 1))
            iters = max(3, int(2e10 // ops))
            for name, run in runs.items():
                row[name].append(round(ops / best_seconds(run, iters) / 1e12, 2))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
