"""Fused host MoE benchmark: µs per layer call, weight GB/s, TFLOPS, fraction of the read
bandwidth measured in the same run.

    python scripts/bench_moe.py --shape deepseek-v3 --qlen 1,32 --format int8 --threads N --json

Each layer holds `--experts` experts (fewer than the model where memory is short) and calls
rotate over `--layers` layers, by default enough that a rotation at the smallest qlen
touches 8x the last-level cache: the AMX host's 300 MiB L3 still kept enough of a 1.5 GB
rotation to add 5% to the int8 decode's GB/s (17% at 0.7 GB). Tokens are
routed uniformly at random (top-k distinct experts each). Weight GB/s counts the unique
experts a call touches times their packed bytes (the bytes the kernel reads; file_gbps the
same experts' GGUF bytes, which differ where the host layout does). With --rounds N, every
format's layers are built first (memory for all of them) and each round takes a bandwidth
probe and then times every format: medians of the rounds are reported, fractions of the
read bandwidth against their own round's probe, and each format's speed against the first
format's in the same rounds (a shared host drifts more between runs than formats differ). Where the kernels use AMX, the same run
also measures the AMX compute roofline (amx_peak_tops: int8 tile products on every thread,
no loads; it moves between instances of a shared host), and peak_fraction is TFLOPS over
it, halved for the formats the AMX kernels multiply in bf16 tiles (all but int8_row). The
AMX kernels take experts with 16 or more tokens; fewer run on AVX-512, for which the
fraction is only a distance. Formats other than int8_row take the tiles only with
KTJAX_BATCH_INVARIANT=0 (by default they stay on AVX-512: see docs/kernel-notes.md). With --json, one JSON line per measurement goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import gguf
import numpy as np

from ktjax import _native
from ktjax.gguf.quants import F16_FIELD_OFFSETS

SHAPES = {  # hidden, intermediate, experts in the model, top-k
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "gpt-oss-120b": (2880, 2880, 128, 4),
}
T = gguf.GGMLQuantizationType
# Random GGUF data of these types packs to the format: int8/g32 (Q8_0 as is), int8/row (bf16
# converted at load, as kt-kernel's int8), int4/g32+min, bf16; q4_k, q5_k and q6_k as real
# Q4_K_M / Q5_K_M files hold their experts (int4/g32 + min, int5/g32 + min, int6/g16 + min,
# K-quant scales).
# The IQ, TQ and MXFP4 types pack to int4 indices into their 16-entry tables (int4lut/g32;
# IQ2_XS, IQ2_S, IQ1_M: g16), exactly (cpu_kernels/quants/iq_groups.h).
RAW_TYPES = {"int8": T.Q8_0, "int8_row": T.BF16, "int4": T.Q4_0, "bf16": T.BF16, "q4_k": T.Q4_K,
             "q5_k": T.Q5_K, "q6_k": T.Q6_K, "iq4_xs": T.IQ4_XS, "iq4_nl": T.IQ4_NL,
             "mxfp4": T.MXFP4, "iq2_xxs": T.IQ2_XXS, "iq3_xxs": T.IQ3_XXS, "iq3_s": T.IQ3_S,
             "iq1_s": T.IQ1_S, "iq1_m": T.IQ1_M, "tq1_0": T.TQ1_0, "tq2_0": T.TQ2_0, "iq2_xs": T.IQ2_XS,
             "iq2_s": T.IQ2_S}


def random_raw(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.BF16:  # sign, exponent 2^-7..2^0, random mantissa: all from one draw
        r = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint16)
        bits = (r & 0x807F) | ((120 + ((r >> 7) & 7)) << 7)
        return bits.view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELD_OFFSETS[qtype]:  # finite scales
        raw[:, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == T.MXFP4:  # e8m0 exponent: values near 2^-7
        raw[:, 0] = 120
    if qtype == T.IQ1_M:  # f16 d = 0.01 in the top nibbles of the four scale words at 48..55
        d = int(np.float16(0.01).view(np.uint16))
        words = raw[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        raw[:, 48:56] = words.view(np.uint8)
    return raw


def random_layer(fmt: str, experts: int, hidden: int, inter: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random GGUF data of the gate, up and down matrices of `experts` experts."""
    qt = RAW_TYPES[fmt]
    return [random_raw(qt, experts * inter, hidden, rng), random_raw(qt, experts * inter, hidden, rng),
            random_raw(qt, experts * hidden, inter, rng)]


def pack_layer(native, fmt: str, raw: list[np.ndarray], experts: int, hidden: int, inter: int,
               epilogue: dict | None = None) -> int:
    """Packs random_layer's data in `native` (a build of the native module) as `fmt`, with
    an expert epilogue (activation and biases) where given."""
    qt = RAW_TYPES[fmt]
    extra = {} if epilogue is None else {"epilogue": epilogue}  # older builds lack it
    return native.pack_experts_gguf(raw[0].reshape(-1), int(qt), raw[1].reshape(-1), int(qt),
                                    raw[2].reshape(-1), int(qt), experts, hidden, inter,
                                    fmt if qt == T.BF16 else "int8", **extra)


def gpt_oss_epilogue(experts: int, hidden: int, inter: int, rng: np.random.Generator) -> dict:
    """gpt-oss's clamped SwiGLU and random biases of every projection."""
    b = lambda rows: rng.standard_normal((experts, rows)).astype(np.float32) * 0.1  # noqa: E731
    return {"activation": "swiglu_oai", "alpha": 1.702, "limit": 7.0,
            "gate_bias": b(inter), "up_bias": b(inter), "down_bias": b(hidden)}


def make_layer(fmt: str, experts: int, hidden: int, inter: int, rng: np.random.Generator,
               epilogue: bool = False) -> int:
    ep = gpt_oss_epilogue(experts, hidden, inter, rng) if epilogue else None
    return pack_layer(_native, fmt, random_layer(fmt, experts, hidden, inter, rng), experts, hidden,
                      inter, ep)


def layers_for_rotation(experts: int, top_k: int, qlen: int, expert_bytes: float, llc: int,
                        min_bytes: float = 0.0) -> int:
    """Layers whose rotation touches 8x the last-level cache (and min_bytes) at qlen (uniform
    routing), >= 2."""
    touched = experts * (1.0 - (1.0 - top_k / experts) ** qlen)
    return max(2, math.ceil(max(8 * llc, min_bytes) / (touched * expert_bytes)))


def report_overhead(top_k: int, bw: float, as_json: bool) -> None:
    """Fixed cost of a call: pool wake-up (empty parallel_for) and a MoE with tiny experts."""
    _native.time_parallel_for(1000)
    pool_us = min(_native.time_parallel_for(20000) for _ in range(3)) * 1e6
    rng = np.random.default_rng(1)
    e, h, i = 2 * top_k, 64, 32
    layer = _native.pack_experts_float(rng.standard_normal((e, i, h), dtype=np.float32),
                                       rng.standard_normal((e, i, h), dtype=np.float32),
                                       rng.standard_normal((e, h, i), dtype=np.float32), "int8")
    ids = rng.choice(e, top_k, replace=False).astype(np.int32)[None]
    wts = np.full((1, top_k), 1.0 / top_k, np.float32)
    x = rng.standard_normal((1, h), dtype=np.float32)
    _native.time_moe(x, [ids], wts, [layer], 1000)
    moe_us = min(_native.time_moe(x, [ids], wts, [layer], 5000) for _ in range(3)) * 1e6
    _native.release_weight(layer)
    row = {"measure": "overhead", "threads": _native.num_threads(), "parallel_for_us": pool_us,
           "tiny_moe_us": moe_us, "top_k": top_k, "read_bw_gbps": bw}
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        print(f"overhead: empty parallel_for {pool_us:.2f} us, tiny MoE call (top-{top_k}) {moe_us:.2f} us")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deepseek-v3", choices=sorted(SHAPES))
    ap.add_argument("--qlen", default="1,32")
    ap.add_argument("--format", default="int8", help="comma list of " + ", ".join(RAW_TYPES))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--experts", type=int, default=0, help="experts per layer (default: min(model, 2*top_k))")
    ap.add_argument("--layers", type=int, default=0,
                    help="layers to rotate over (default: 8x the last-level cache touched per rotation)")
    ap.add_argument("--min-rotation-gib", type=float, default=0.0,
                    help="rotate over at least this many GiB (a VM's reported L3 can be smaller than what caches)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of (read-bandwidth probe, every format and qlen timed); with more than one, "
                         "every format's layers are built first and the rounds interleave them; medians reported")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", action="store_true", help="one JSON line per measurement")
    ap.add_argument("--epilogue", default="none",
                    help="comma list of none, swiglu_oai (gpt-oss's biased, clamped SwiGLU experts)")
    ap.add_argument("--overhead", action="store_true",
                    help="also measure the per-call overhead: an empty parallel_for and a tiny MoE call")
    args = ap.parse_args(argv)
    if args.threads:
        _native.set_num_threads(args.threads)
    hidden, inter, model_experts, top_k = SHAPES[args.shape]
    experts = args.experts or min(model_experts, 2 * top_k)
    def probe() -> float:
        return max(_native.read_bandwidth_gbps(0, 5) for _ in range(2))

    bw = probe()
    amx_peak = _native.amx_tile_peak_tops() if _native.active_isa() == "amx" else 0.0
    llc = _native.last_level_cache_bytes()
    qlens = [int(q) for q in args.qlen.split(",")]
    if not args.json:
        print(f"{args.shape}: hidden {hidden}, inter {inter}, {experts}/{model_experts} experts, top-{top_k}; "
              f"read bandwidth {bw:.1f} GB/s, threads {_native.num_threads()}, isa {_native.active_isa()}"
              + (f", AMX roofline {amx_peak:.1f} int8 TOPS" if amx_peak else ""))
    rng = np.random.default_rng(0)
    if args.overhead:
        report_overhead(top_k, bw, args.json)
    for epilogue in args.epilogue.split(","):
        if epilogue not in ("none", "swiglu_oai"):
            ap.error(f"--epilogue: unknown {epilogue!r}")
    # (format, epilogue) pairs, labelled "Q4_K" or "Q4_K+swiglu_oai"
    variants = {f if e == "none" else f"{f}+{e}": (f, e)
                for f in args.format.split(",") for e in args.epilogue.split(",")}
    formats = list(variants)

    def build(label: str) -> dict:
        fmt, epilogue = variants[label]
        biased = epilogue != "none"
        raw = random_layer(fmt, experts, hidden, inter, rng)
        file_bytes = sum(r.nbytes for r in raw) / experts  # the GGUF bytes of one expert
        ep = gpt_oss_epilogue(experts, hidden, inter, rng) if biased else None
        layers = [pack_layer(_native, fmt, raw, experts, hidden, inter, ep)]
        del raw
        expert_bytes = _native.weight_info(layers[0])["bytes"] / experts
        count = args.layers or layers_for_rotation(experts, top_k, min(qlens), expert_bytes, llc,
                                                   args.min_rotation_gib * 2**30)
        layers += [make_layer(fmt, experts, hidden, inter, rng, biased) for _ in range(count - 1)]
        calls = {}
        for qlen in qlens:
            # Each layer routes differently, so a rotation touches distinct experts.
            ids = [np.stack([rng.choice(experts, top_k, replace=False) for _ in range(qlen)]).astype(np.int32)
                   for _ in layers]
            calls[qlen] = (ids, np.full((qlen, top_k), 1.0 / top_k, np.float32),
                           rng.standard_normal((qlen, hidden), dtype=np.float32))
            _native.time_moe(calls[qlen][2], ids, calls[qlen][1], layers, len(layers))  # warm-up
        return {"layers": layers, "file_bytes": file_bytes, "expert_bytes": expert_bytes, "calls": calls,
                "secs": {q: [] for q in qlens}, "bws": {q: [] for q in qlens}}

    def time_call(st: dict, qlen: int) -> float:
        ids, wts, x = st["calls"][qlen]
        iters = len(st["layers"])
        while True:
            sec = _native.time_moe(x, ids, wts, st["layers"], iters)
            if sec * iters >= args.min_time or iters >= 1 << 16:
                return sec
            iters *= 2

    def report(fmt: str, st: dict, qlen: int, first: dict | None) -> None:
        ids = st["calls"][qlen][0]
        expert_bytes, file_bytes, layers = st["expert_bytes"], st["file_bytes"], st["layers"]
        secs, bws = st["secs"][qlen], st["bws"][qlen]
        touched = float(np.mean([len(np.unique(i)) for i in ids]))
        fractions = [touched * expert_bytes / s / 1e9 / b for s, b in zip(secs, bws)]
        sec, bw = float(np.median(secs)), float(np.median(bws))
        row = {"shape": args.shape, "format": variants[fmt][0], "epilogue": variants[fmt][1],
               "qlen": qlen, "threads": _native.num_threads(),
               "isa": _native.active_isa(), "experts_per_layer": experts, "layers": len(layers),
               "touched_bytes_per_rotation": touched * expert_bytes * len(layers),
               "rotation_over_llc": touched * expert_bytes * len(layers) / llc,
               "us_per_call": sec * 1e6, "weight_gbps": touched * expert_bytes / sec / 1e9,
               "tflops": 2.0 * qlen * top_k * 3 * hidden * inter / sec / 1e12,
               "read_bw_gbps": bw, "packed_bytes_per_expert": expert_bytes,
               "file_bytes_per_expert": file_bytes, "file_gbps": touched * file_bytes / sec / 1e9,
               # each round's weight GB/s over the probe taken at the start of its round
               "bw_fraction": float(np.median(fractions))}
        if len(secs) > 1:
            row["rounds"] = len(secs)
            row["bw_fraction_rounds"] = [round(f, 3) for f in fractions]
        if first is not None:  # the first format's time over this one's, round by round
            row["speed_vs_" + formats[0]] = float(np.median(np.array(first["secs"][qlen]) / np.array(secs)))
        if amx_peak:
            row["amx_peak_tops"] = amx_peak
            row["peak_fraction"] = row["tflops"] / (amx_peak if fmt == "int8_row" else amx_peak / 2)
        if args.json:
            print(json.dumps(row), flush=True)
            return
        peak = f" ({100 * row['peak_fraction']:.0f}% of AMX roofline)" if amx_peak else ""
        vs = f"  x{row['speed_vs_' + formats[0]]:.2f} {formats[0]}'s speed" if first is not None else ""
        print(f"{fmt:7} qlen {qlen:5}: {row['us_per_call']:10.1f} us/call  {row['weight_gbps']:6.1f} GB/s "
              f"({100 * row['bw_fraction']:.0f}% of read bw {bw:.1f})  {8 * expert_bytes / (3 * hidden * inter):.2f} "
              f"bits/weight read (file {8 * file_bytes / (3 * hidden * inter):.2f}){vs}  {row['tflops']:.3f} TFLOPS{peak}",
              flush=True)

    if args.rounds <= 1:  # one format at a time: only its layers in memory
        for fmt in formats:
            st = build(fmt)
            for qlen in qlens:
                st["secs"][qlen].append(time_call(st, qlen))
                st["bws"][qlen].append(bw)
                report(fmt, st, qlen, None)
            for h in st["layers"]:
                _native.release_weight(h)
        return 0
    states = {fmt: build(fmt) for fmt in formats}
    for _ in range(args.rounds):
        bw = probe()
        for fmt in formats:
            for qlen in qlens:
                states[fmt]["secs"][qlen].append(time_call(states[fmt], qlen))
                states[fmt]["bws"][qlen].append(bw)
    for i, fmt in enumerate(formats):
        for qlen in qlens:
            report(fmt, states[fmt], qlen, states[formats[0]] if i > 0 else None)
    for st in states.values():
        for h in st["layers"]:
            _native.release_weight(h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
