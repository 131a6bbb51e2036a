#!/usr/bin/env python
"""Decode roofline of a GGUF model as ktjax places it: bytes of the parameters one decode
token reads (routed experts weighted by used / total) ÷ the machine's measured read bandwidth.

  python scripts/roofline.py MODEL.gguf [--rules cpu] [--read-gbps GB/s] [--json]

Host tensors count their packed bytes (`keep`: the GGUF blocks), device tensors their dense
bytes (float32 on CPU), the embedding one row; a tied head counts the embedding once more.
"""
from __future__ import annotations

import argparse
import json

from ktjax import rules as placement_rules
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.models.info import _HOST_BYTES

_FLOAT = ("F32", "F16", "BF16")


def active_bytes(path: str, rules: str = "cpu", device_itemsize: int = 4) -> dict:
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    placement = placement_rules.place(f, spec.table, cfg.n_layers, rules, "cpu")
    total = experts = 0.0
    for p, d in placement.items():
        tspec = spec.table[p]
        names = [n for n in tspec.names(cfg.n_layers) if n in f.tensors]
        if p == "output" and not names:  # tied head reads the embedding matrix
            names = [spec.table["token_embd"].gguf_name]
        for n in names:
            t = f.tensors[n]
            if p == "token_embd":
                size = t.shape[-1] * 4.0           # one row, gathered
            elif d.placement == "host":
                size = t.data.nbytes if d.format == "keep" and t.qtype.name not in _FLOAT \
                    else t.n_elements * _HOST_BYTES.get(d.format, 1.125)
            else:
                size = t.n_elements * (4 if len(tspec.shape) == 1 else
                                       {"bf16": 2, "f32": 4}.get(d.format, device_itemsize))
            if tspec.kind == "experts":
                size *= cfg.moe.n_used / cfg.moe.n_experts
                experts += size
            total += size
    return {"model": path, "active_bytes_per_token": total, "expert_bytes_per_token": experts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rules", default="cpu")
    ap.add_argument("--read-gbps", type=float, default=None,
                    help="a bandwidth measured elsewhere, instead of measuring here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    row = active_bytes(args.model, args.rules)
    from ktjax import _native  # only to measure
    bw = args.read_gbps or max(_native.read_bandwidth_gbps(0, 5) for _ in range(2))
    row.update(read_gbps=bw, roofline_tok_s=bw * 1e9 / row["active_bytes_per_token"])
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.model}: {row['active_bytes_per_token'] / 2**20:.1f} MiB per token "
              f"(experts {row['expert_bytes_per_token'] / 2**20:.1f}), read {bw:.1f} GB/s "
              f"-> roofline {row['roofline_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
