"""`ktjax info`: what a GGUF model is and what running it costs, without loading weights."""
from __future__ import annotations

import os
from collections import defaultdict

from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.models.catalog import resolve_model


def describe(model: str) -> str:
    path = resolve_model(model)
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    mix: dict[str, list[int]] = defaultdict(lambda: [0, 0])   # type -> [tensors, elements]
    for t in f.tensors.values():
        mix[t.qtype.name][0] += 1
        mix[t.qtype.name][1] += t.n_elements
    n_params = sum(t.n_elements for t in f.tensors.values())
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    ctx = min(cfg.context_length, 4096)
    gib = 1024 ** 3
    lines = [
        f"model         {os.path.basename(path)}  ({os.path.getsize(path) / gib:.2f} GiB file)",
        f"architecture  {f.architecture} ({spec.family.__name__.rsplit('.', 1)[-1]} family)",
        f"parameters    {n_params / 1e6:.1f} M",
        f"layers        {cfg.n_layers}, hidden {cfg.hidden_size}, heads {cfg.n_heads} "
        f"(kv {cfg.n_kv_heads}) x {cfg.head_dim}, ffn {cfg.intermediate_size}",
        f"vocabulary    {cfg.vocab_size}",
        f"context       {cfg.context_length}",
        "quant mix     " + ", ".join(
            f"{name}: {n} tensors, {100 * el / n_params:.1f}% of weights"
            for name, (n, el) in sorted(mix.items(), key=lambda kv: -kv[1][1])),
        "memory        weights {:.2f} GiB as float32 (CPU) / {:.2f} GiB as bfloat16 (GPU); "
        "KV cache {:.1f} KiB per token as float32, {:.2f} GiB for 4 x {} tokens".format(
            n_params * 4 / gib, n_params * 2 / gib, kv_per_token * 4 / 1024,
            4 * ctx * kv_per_token * 4 / gib, ctx),
    ]
    return "\n".join(lines)
