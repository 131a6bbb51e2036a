"""Host quantized-linear benchmark: GB/s of weight read vs this machine's read bandwidth.

For each layer shape of SmolLM2-135M and Gemma 3 270M and each format, packs enough
copies of the weight that they exceed the caches (rotating over them per call), times
calls in C++ (no Python per call), and reports µs per call, weight GB/s, GFLOPS and the
fraction of read bandwidth measured in the same run.

    python scripts/bench_linear.py [--tokens 1,32] [--formats q4_1,q4_k,q8_0,int8,int8_row,int4,bf16]
                                   [--isa avx512] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import gguf
import numpy as np

from ktjax import _native

T = gguf.GGMLQuantizationType
MODELS = {
    "smollm2-135m": {"q": (576, 576), "kv": (192, 576), "o": (576, 576), "gate_up": (1536, 576),
                     "down": (576, 1536), "lm_head": (49152, 576)},
    "gemma3-270m": {"q": (1024, 640), "kv": (256, 640), "o": (640, 1024), "gate_up": (2048, 640),
                    "down": (640, 2048), "lm_head": (262144, 640)},
}
GGUF_FORMATS = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0,
                "q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K,
                "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS, "mxfp4": T.MXFP4, "iq2_xxs": T.IQ2_XXS,
                "iq3_xxs": T.IQ3_XXS, "iq3_s": T.IQ3_S, "iq1_s": T.IQ1_S, "tq2_0": T.TQ2_0}
FLOAT_FORMATS = ("int8", "int8_row", "int4", "bf16")


def make_weight(fmt: str, n: int, k: int, rng: np.random.Generator) -> int:
    if fmt in FLOAT_FORMATS:
        return _native.pack_float_weight(rng.standard_normal((n, k), dtype=np.float32), fmt)
    qt = GGUF_FORMATS[fmt]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if k % block:
        raise ValueError(f"{fmt} needs K % {block} == 0")
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    # Keep f16 factors finite: a valid small float in every 2-byte slot that may hold one.
    raw16 = raw.view(np.uint16) if size % 2 == 0 else None
    if raw16 is not None:
        raw16[...] = np.where(raw16 & 0x7C00 == 0x7C00, 0x2000, raw16)
    else:
        raw[:, :] = np.where(raw == 0x7C, 0x20, raw)
        raw[:, :] = np.where(raw == 0xFC, 0x20, raw)
    return _native.pack_gguf_weight(raw.reshape(-1), int(qt), n, k)


def bench(model: str, layer: str, fmt: str, tokens: int, isa: str, min_time: float) -> dict:
    n, k = MODELS[model][layer]
    rng = np.random.default_rng(0)
    h0 = make_weight(fmt, n, k, rng)
    wbytes = _native.weight_info(h0)["bytes"]
    copies = max(1, min(2048, 8 * _native.last_level_cache_bytes() // wbytes))  # 8x the LLC
    handles = [h0] + [make_weight(fmt, n, k, rng) for _ in range(copies - 1)]
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    _native.time_linear(handles, x, isa, copies)  # warm-up: page in, size scratch buffers
    iters = max(copies, 4)
    while True:
        sec = _native.time_linear(handles, x, isa, iters)
        if sec * iters >= min_time or iters > 1 << 20:
            break
        iters *= 4
    for h in handles:
        _native.release_weight(h)
    return {"model": model, "layer": layer, "n": n, "k": k, "format": fmt, "tokens": tokens,
            "isa": isa or _native.active_isa(), "us_per_call": sec * 1e6,
            "weight_gbps": wbytes / sec / 1e9, "bytes_per_weight": wbytes / (n * k),
            "gflops": 2.0 * n * k * tokens / sec / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", default="q,kv,o,gate_up,down,lm_head")
    ap.add_argument("--formats", default="q4_1,q4_k,q6_k,q8_0,int8,int4,bf16")
    ap.add_argument("--tokens", default="1,32")
    ap.add_argument("--isa", default="", help="generic|avx2|avx512 (default: active)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--json", default="", help="also write all rows to this file")
    args = ap.parse_args(argv)
    if args.threads:
        _native.set_num_threads(args.threads)
    bw = max(_native.read_bandwidth_gbps(0, 5) for _ in range(2))
    print(f"read bandwidth: {bw:.1f} GB/s, threads {_native.num_threads()}, isa {args.isa or _native.active_isa()}")
    print(f"{'model':14} {'layer':8} {'N':>6} {'K':>5} {'fmt':6} {'T':>4} {'us/call':>9} {'GB/s':>6} {'%bw':>5} {'GFLOPS':>7}")
    rows = []
    for model in args.models.split(","):
        for layer in args.layers.split(","):
            for fmt in args.formats.split(","):
                for t in (int(v) for v in args.tokens.split(",")):
                    try:
                        r = bench(model, layer, fmt, t, args.isa, args.min_time)
                    except ValueError as e:
                        print(f"{model:14} {layer:8} {fmt:6} skipped: {e}")
                        continue
                    r["read_bw_gbps"] = bw
                    r["bw_fraction"] = r["weight_gbps"] / bw
                    rows.append(r)
                    print(f"{model:14} {layer:8} {r['n']:6} {r['k']:5} {fmt:6} {t:4} {r['us_per_call']:9.1f} "
                          f"{r['weight_gbps']:6.1f} {100 * r['bw_fraction']:5.0f} {r['gflops']:7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"time": time.time(), "read_bw_gbps": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
