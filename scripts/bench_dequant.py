"""Dequantization speed: ktjax native (threaded) vs gguf.quants.dequantize (numpy).

Prints a table per GGUF type (output MB/s of float32, ns per element, speed-up);
--json prints one JSON object per line instead. Both run in this process on the same
random data, so compare the ratio, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import time

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktjax import _native
from ktjax.gguf.quants import F16_FIELD_OFFSETS, SUPPORTED_QTYPES, dequantize


def random_tensor(qtype: GGMLQuantizationType, n_elements: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_elements of qtype, with finite float16 scales (as in real files)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // block_size
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal(n_elements, dtype=np.float32).view(np.uint8)
    if qtype == GGMLQuantizationType.F16:
        return rng.standard_normal(n_elements).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.BF16:
        return rng.standard_normal(n_elements).astype(ml_dtypes.bfloat16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELD_OFFSETS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="one JSON line per type")
    ap.add_argument("--elements", type=int, default=1 << 22, help="elements per tensor")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for qtype in sorted(SUPPORTED_QTYPES, key=int):
        n = args.elements // 256 * 256
        raw = random_tensor(qtype, n, rng)
        shape = (n // 4096, 4096)
        raw2d = raw.reshape(shape[0], -1)
        t_native = best_time(lambda: dequantize(raw, qtype, shape), args.repeat)
        t_gguf = best_time(lambda: gguf_dequantize(raw2d, qtype), max(1, args.repeat // 2))
        out_mb = n * 4 / 1e6
        rows.append({
            "type": qtype.name, "elements": n, "threads": _native.num_threads(),
            "native_MBps": out_mb / t_native, "gguf_MBps": out_mb / t_gguf,
            "native_ns_per_elem": t_native / n * 1e9, "gguf_ns_per_elem": t_gguf / n * 1e9,
            "speedup": t_gguf / t_native,
        })
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'type':6} {'native MB/s':>12} {'gguf MB/s':>10} {'native ns/el':>13} "
          f"{'gguf ns/el':>11} {'speed-up':>9}   ({rows[0]['threads']} threads, "
          f"{rows[0]['elements']} elements, MB/s of float32 output)")
    for r in rows:
        print(f"{r['type']:6} {r['native_MBps']:12.0f} {r['gguf_MBps']:10.0f} "
              f"{r['native_ns_per_elem']:13.3f} {r['gguf_ns_per_elem']:11.3f} {r['speedup']:8.1f}x")
    print("F32: gguf returns a zero-copy view, ktjax an owned copy. F32/F16/BF16 and the "
          "fast quant types are bound by memory bandwidth (output pages are fresh each call).")


if __name__ == "__main__":
    main()
