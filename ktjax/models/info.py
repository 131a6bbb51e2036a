"""`ktjax info`: what a GGUF model is and what running it costs, without loading weights."""
from __future__ import annotations

import os
from collections import defaultdict

import jax

from ktjax import device_quant, hybrid_experts
from ktjax import rules as placement_rules
from ktjax.engine import kv_cache
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.models.catalog import resolve_model
from ktjax.models.moe import EXPERT_KEYS


# Approximate bytes per element of the host kernels' packed formats (values + group scales).
_HOST_BYTES = {"int8": 1.125, "int8_row": 1.0, "int4": 0.625, "bf16": 2.0}


def placement_memory(f: GGUFFile, spec: loader.ModelSpec, rules: str, platform: str,
                     device_bytes: int) -> tuple[dict, dict[str, float]]:
    """Per rule [decision, tensors, bytes], and the bytes on each of device and host (device
    matrices kept quantized: the exact bytes of the arrays the loader makes)."""
    placement = placement_rules.place(f, spec.table, spec.config.n_layers, rules, platform)
    keep_quantized = loader.keeps_quantized(platform)
    groups: dict = {}
    for path, d in placement.items():
        tspec = spec.table[path]
        names = tspec.names(spec.config.n_layers)
        tensors = [f.tensors.get(n) or f.tensors["token_embd.weight"] for n in names
                   if n in f.tensors or path == "output"]
        g = groups.setdefault(d.rule, [d, 0, 0.0])
        g[1] += len(tensors)
        quantized = d.placement == "device" and tspec.kind == "matrix" and \
            loader.device_quantized(f, [t.name for t in tensors], d.format, keep_quantized)
        for t in tensors:
            if quantized:
                mixed = len({x.qtype for x in tensors}) > 1
                g[2] += device_quant.packed_nbytes(t.qtype, t.shape, d.format, mixed)
                continue
            if d.placement == "host":
                g[2] += t.data.nbytes if d.format == "keep" and t.qtype.name not in \
                    ("F32", "F16", "BF16") else t.n_elements * _HOST_BYTES.get(d.format, 1.125)
            else:
                g[2] += t.n_elements * (4 if len(tspec.shape) == 1 else
                                        {"bf16": 2, "f32": 4}.get(d.format, device_bytes))
    total: dict[str, float] = defaultdict(float)
    for d, _, size in groups.values():
        total[d.placement] += size
    return groups, total


def placement_table(f: GGUFFile, spec: loader.ModelSpec, rules: str, platform: str,
                    device_bytes: int) -> list[str]:
    """One line per rule: placement, format, tensors and their memory per device."""
    groups, total = placement_memory(f, spec, rules, platform, device_bytes)
    placement = placement_rules.place(f, spec.table, spec.config.n_layers, rules, platform)
    lines = [f"placement     {rules} ({platform})"]
    for rule, (d, n, size) in groups.items():
        lines.append(f"  {rule.name:<28} {d.placement:<6} {d.format:<8} "
                     f"{n:>5} tensors {size / 2 ** 20:10.2f} MiB")
    for stack in sorted({p.rpartition(".")[0] for p, d in placement.items()
                         if spec.table[p].kind == "experts" and d.placement == "host"}):
        names = list(zip(*(spec.table[f"{stack}.{k}"].names(spec.config.n_layers)
                           for k in EXPERT_KEYS)))
        moved = hybrid_experts.device_expert_bytes(
            f, names, placement[f"{stack}.{EXPERT_KEYS[0]}"].rule.source,
            spec.config.n_layers, device_bytes)
        if moved:  # the rules' `experts:` section: copies on the device, sets kept on the host
            total["device"] += moved
            lines.append(f"  {'experts on the device':<28} {'device':<6} {'keep':<8} "
                         f"{'':>13} {moved / 2 ** 20:10.2f} MiB")
        streamed = hybrid_experts.stream_host_bytes(
            f, names, placement[f"{stack}.{EXPERT_KEYS[0]}"].rule.source,
            spec.config.n_layers, device_bytes)
        if streamed:  # device_prefill_min_tokens: a second host copy, the device's layout
            total["host"] += streamed
            lines.append(f"  {'experts streamed (copy)':<28} {'host':<6} {'keep':<8} "
                         f"{'':>13} {streamed / 2 ** 20:10.2f} MiB")
    lines.append("  memory: " + ", ".join(f"{p} {v / 2 ** 20:.2f} MiB" for p, v in total.items()))
    return lines


def describe(model: str, rules: str | None = None) -> str:
    path = resolve_model(model)
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    mix: dict[str, list[int]] = defaultdict(lambda: [0, 0])   # type -> [tensors, elements]
    for t in f.tensors.values():
        mix[t.qtype.name][0] += 1
        mix[t.qtype.name][1] += t.n_elements
    n_params = sum(t.n_elements for t in f.tensors.values())
    cache = cfg.cache_spec
    kv_per_token = cache.bytes_per_token(1)
    ctx = min(cfg.context_length, 4096)
    gib = 1024 ** 3
    # what loading on a CPU keeps: the default CPU rules' placement (GGUF blocks, not float32)
    _, cpu_memory = placement_memory(f, spec, placement_rules.rules_for(f.architecture, "cpu"),
                                     "cpu", 4)
    lines = [
        f"model         {os.path.basename(path)}  ({os.path.getsize(path) / gib:.2f} GiB file)",
        f"architecture  {f.architecture} ({spec.family.__name__.rsplit('.', 1)[-1]} family)",
        f"parameters    {n_params / 1e6:.1f} M",
        f"layers        {cfg.n_layers}, hidden {cfg.hidden_size}, heads {cfg.n_heads} "
        f"(kv {cache.n_kv_heads}) x {cache.head_dim}, ffn {cfg.intermediate_size}",
        f"vocabulary    {cfg.vocab_size}",
        f"context       {cfg.context_length}",
        "chat template " + ("yes" if f.metadata.get("tokenizer.chat_template") else
                            "none (a base model? --chat needs --chat-template)"),
        "quant mix     " + ", ".join(
            f"{name}: {n} tensors, {100 * el / n_params:.1f}% of weights"
            for name, (n, el) in sorted(mix.items(), key=lambda kv: -kv[1][1])),
        "memory        weights {:.2f} GiB on CPU (matrices as GGUF blocks in the host "
        "kernels) / {:.2f} GiB all as bfloat16 (GPU); "
        "KV cache {:.1f} KiB per token as float32, {:.2f} GiB for 4 x {} tokens "
        "(kv_cache_dtype int8: {:.1f} KiB per token)".format(
            sum(cpu_memory.values()) / gib, n_params * 2 / gib, kv_per_token * 4 / 1024,
            4 * ctx * kv_per_token * 4 / gib, ctx,
            kv_cache.bytes_per_token(cache, "int8") / 1024),
    ]
    moe = getattr(cfg, "moe", None)   # only mixture-of-experts families have one
    if moe:
        lines.insert(4, f"experts       {moe.n_experts} routed ({moe.n_used} per token) "
                        f"x ffn {moe.expert_ffn}"
                        + (f", shared ffn {moe.shared_ffn}" if moe.shared_ffn else ""))
    if rules is not None:
        platform = jax.default_backend()
        lines += placement_table(f, spec, rules, platform, 4 if platform == "cpu" else 2)
    return "\n".join(lines)
