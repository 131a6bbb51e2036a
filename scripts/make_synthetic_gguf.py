#!/usr/bin/env python
"""Write a GGUF with random weights in a real model's shapes (optionally fewer layers), for
benchmarks, with a byte-level BPE tokenizer padded to the real vocabulary so `ktjax.LLM`
(and llama.cpp) load it. MoE shapes: routed experts in Q4_K or Q8_0 (--experts-qtype), other
matrices Q8_0, norms and routers F32. Dense llama shapes: every matrix in --qtype (Q4_K as a
Q4_K_M file has it, with the output head in Q6_K), norms F32.

  python scripts/make_synthetic_gguf.py --shape qwen3-30b-a3b --layers 48 \
      --experts-qtype Q4_K /tmp/qwen3-30b-a3b-q4k.gguf
  python scripts/make_synthetic_gguf.py --shape llama3-8b --qtype Q4_K /tmp/llama3-8b-q4k.gguf
  python scripts/make_synthetic_gguf.py --shape smollm2-135m --qtype Q8_0 /tmp/smollm2-q8.gguf

Quantized tensors are a tiled pool of random raw blocks whose scale fields are small finite
f16 values (a valid tensor of that type, written at disk speed); values repeat across
experts, which changes nothing for bandwidth-bound benchmarks.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import gguf
import numpy as np

from ktjax.gguf.synthetic import add_byte_level_tokenizer

T = gguf.GGMLQuantizationType
POOL_BYTES = 16 << 20
# f16 scale fields per block type: (byte offsets, value).
_SCALES = {T.Q8_0: ((0,), 5e-4), T.Q4_K: ((0, 2), 1e-4), T.Q6_K: ((208,), 5e-4)}
# Dense shapes: the matrices' type -> (token embedding, output head) types.
_DENSE_TYPES = {T.Q4_K: (T.Q4_K, T.Q6_K), T.Q8_0: (T.Q8_0, T.Q8_0), T.BF16: (T.BF16, T.BF16)}


@dataclass(frozen=True)
class Shape:
    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int                  # dense FFN (deepseek2's leading layers)
    experts: int
    used: int
    expert_ffn: int
    context: int
    rope_base: float
    kv_heads: int = 0         # qwen3moe
    head_dim: int = 0
    mla: dict = field(default_factory=dict)   # deepseek2 metadata and sizes
    tied: bool = False        # dense llama: output head = token embedding


SHAPES = {
    "smollm2-135m": Shape("llama", 49152, 576, 30, 9, 1536, 0, 0, 0, 8192, 100000.0,
                          kv_heads=3, head_dim=64, tied=True),
    "llama3-8b": Shape("llama", 128256, 4096, 32, 32, 14336, 0, 0, 0, 8192, 500000.0,
                       kv_heads=8, head_dim=128),
    "llama-tiny": Shape("llama", 512, 256, 2, 4, 512, 0, 0, 0, 2048, 10000.0,   # smoke runs
                        kv_heads=2, head_dim=64),
    "qwen3-30b-a3b": Shape("qwen3moe", 151936, 2048, 48, 32, 6144, 128, 8, 768, 40960, 1e6,
                           kv_heads=4, head_dim=128),
    # smoke runs and CPU tests (tests/test_hybrid.py): the MoE families' code paths, tiny
    "qwen3moe-tiny": Shape("qwen3moe", 512, 256, 4, 4, 512, 16, 4, 256, 2048, 1e6,
                           kv_heads=2, head_dim=64),
    "deepseek2-tiny": Shape(
        "deepseek2", 512, 256, 4, 4, 512, 16, 4, 256, 2048, 10000.0,
        mla=dict(q_lora=0, kv_lora=64, rope=32, nope=32, v=32, dense=1, shared=1,
                 gating=2, norm=True, scale=2.5, groups=4, groups_used=2, bias=True,
                 yarn_factor=4.0, yarn_orig=512, yarn_log_mul=0.1)),
    "deepseek-v2-lite": Shape(
        "deepseek2", 102400, 2048, 27, 16, 10944, 64, 6, 1408, 163840, 10000.0,
        mla=dict(q_lora=0, kv_lora=512, rope=64, nope=128, v=128, dense=1, shared=2,
                 gating=1, norm=False, scale=1.0, groups=1, groups_used=1, bias=False,
                 yarn_factor=40.0, yarn_orig=4096, yarn_log_mul=0.0707)),
    "deepseek-v3": Shape(
        "deepseek2", 129280, 7168, 61, 128, 18432, 256, 8, 2048, 163840, 10000.0,
        mla=dict(q_lora=1536, kv_lora=512, rope=64, nope=128, v=128, dense=3, shared=1,
                 gating=2, norm=True, scale=2.5, groups=8, groups_used=4, bias=True,
                 yarn_factor=40.0, yarn_orig=4096, yarn_log_mul=0.1)),
}


def _pool(qtype: T, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.BF16:   # random normal values (random bytes would hold NaNs)
        x = (0.02 * rng.standard_normal(POOL_BYTES // 4)).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(POOL_BYTES // block_bytes, block_bytes), dtype=np.uint8)
    offsets, value = _SCALES[qtype]
    for off in offsets:
        raw[:, off:off + 2] = np.full(len(raw), value, np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def _tiled(pool: np.ndarray, size: int) -> np.ndarray:
    """`pool` repeated to at least `size` bytes by doubling copies (memcpy speed); keeps the
    block boundaries since the pool is whole blocks."""
    out = np.empty(max(size, 2 * pool.size), np.uint8)
    out[:pool.size] = pool
    filled = pool.size
    while filled < out.size:
        n = min(filled, out.size - filled)
        out[filled:filled + n] = out[:n]
        filled += n
    return out


def dense_tensor_list(s: Shape, n_layers: int, qtype: T) -> list[tuple[str, tuple, T]]:
    """A dense llama's tensors: (name, numpy shape, type), in file order."""
    h, f32 = s.hidden, T.F32
    embd_qtype, head_qtype = _DENSE_TYPES[qtype]
    hq, hkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = [("token_embd.weight", (s.vocab, h), embd_qtype), ("output_norm.weight", (h,), f32)]
    if not s.tied:
        out.append(("output.weight", (s.vocab, h), head_qtype))
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (h,), f32), (p + "ffn_norm.weight", (h,), f32),
                (p + "attn_q.weight", (hq, h), qtype), (p + "attn_k.weight", (hkv, h), qtype),
                (p + "attn_v.weight", (hkv, h), qtype), (p + "attn_output.weight", (h, hq), qtype),
                (p + "ffn_gate.weight", (s.ffn, h), qtype), (p + "ffn_up.weight", (s.ffn, h), qtype),
                (p + "ffn_down.weight", (h, s.ffn), qtype)]
    return out


def tensor_list(s: Shape, n_layers: int, experts_qtype: T) -> list[tuple[str, tuple, T]]:
    """(name, numpy shape, type) of every tensor, in file order."""
    h, q8, f32 = s.hidden, T.Q8_0, T.F32
    out = [("token_embd.weight", (s.vocab, h), q8), ("output_norm.weight", (h,), f32),
           ("output.weight", (s.vocab, h), q8)]
    m = s.mla
    n_dense = min(m.get("dense", 0), n_layers - 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (h,), f32), (p + "ffn_norm.weight", (h,), f32)]
        if s.arch == "qwen3moe":
            hq, hkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
            out += [(p + "attn_q.weight", (hq, h), q8), (p + "attn_k.weight", (hkv, h), q8),
                    (p + "attn_v.weight", (hkv, h), q8), (p + "attn_output.weight", (h, hq), q8),
                    (p + "attn_q_norm.weight", (s.head_dim,), f32),
                    (p + "attn_k_norm.weight", (s.head_dim,), f32)]
        else:
            qk, r = m["nope"] + m["rope"], m["kv_lora"]
            if m["q_lora"]:
                out += [(p + "attn_q_a.weight", (m["q_lora"], h), q8),
                        (p + "attn_q_a_norm.weight", (m["q_lora"],), f32),
                        (p + "attn_q_b.weight", (s.heads * qk, m["q_lora"]), q8)]
            else:
                out += [(p + "attn_q.weight", (s.heads * qk, h), q8)]
            out += [(p + "attn_kv_a_mqa.weight", (r + m["rope"], h), q8),
                    (p + "attn_kv_a_norm.weight", (r,), f32),
                    (p + "attn_k_b.weight", (s.heads, r, m["nope"]), q8),
                    (p + "attn_v_b.weight", (s.heads, m["v"], r), q8),
                    (p + "attn_output.weight", (h, s.heads * m["v"]), q8)]
        if i < n_dense:
            out += [(p + "ffn_gate.weight", (s.ffn, h), q8), (p + "ffn_up.weight", (s.ffn, h), q8),
                    (p + "ffn_down.weight", (h, s.ffn), q8)]
            continue
        e, ff = s.experts, s.expert_ffn
        # rows that are no whole number of blocks fall back to Q8_0, as llama.cpp's quantizer
        # does (DeepSeek-V2-Lite's down_exps: 1408 = 5.5 Q4_K blocks)
        down_qtype = experts_qtype if ff % gguf.GGML_QUANT_SIZES[experts_qtype][0] == 0 else q8
        out += [(p + "ffn_gate_inp.weight", (e, h), f32),
                (p + "ffn_gate_exps.weight", (e, ff, h), experts_qtype),
                (p + "ffn_up_exps.weight", (e, ff, h), experts_qtype),
                (p + "ffn_down_exps.weight", (e, h, ff), down_qtype)]
        if m.get("bias"):
            out.append((p + "exp_probs_b.bias", (e,), f32))
        if m.get("shared"):
            sh = m["shared"] * ff
            out += [(p + "ffn_gate_shexp.weight", (sh, h), q8),
                    (p + "ffn_up_shexp.weight", (sh, h), q8),
                    (p + "ffn_down_shexp.weight", (h, sh), q8)]
    return out


def write(path: str, shape: str, n_layers: int, experts_qtype: T, seed: int = 0) -> None:
    """experts_qtype: the routed experts' type (MoE shapes) or every matrix's (dense)."""
    s = SHAPES[shape]
    n_layers = n_layers or s.layers
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, s.arch)
    a = lambda key: f"{s.arch}.{key}"
    w.add_name(f"synthetic {shape} ({n_layers} layers, {experts_qtype.name})")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(s.rope_base)
    w.add_vocab_size(s.vocab)
    if s.experts:
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.used)
        w.add_expert_feed_forward_length(s.expert_ffn)
    m = s.mla
    if s.arch in ("qwen3moe", "llama"):
        w.add_head_count_kv(s.kv_heads)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    else:  # llama.cpp's MLA form: MQA view in key/value_length, per-head sizes in *_mla
        w.add_head_count_kv(1)
        w.add_key_length(m["kv_lora"] + m["rope"])
        w.add_value_length(m["kv_lora"])
        w.add_uint32(a("attention.key_length_mla"), m["nope"] + m["rope"])
        w.add_uint32(a("attention.value_length_mla"), m["v"])
        w.add_rope_dimension_count(m["rope"])
        if m["q_lora"]:
            w.add_uint32(a("attention.q_lora_rank"), m["q_lora"])
        w.add_uint32(a("attention.kv_lora_rank"), m["kv_lora"])
        w.add_uint32(a("leading_dense_block_count"), min(m["dense"], n_layers - 1))
        w.add_uint32(a("expert_shared_count"), m["shared"])
        w.add_float32(a("expert_weights_scale"), m["scale"])
        w.add_bool(a("expert_weights_norm"), m["norm"])
        w.add_uint32(a("expert_gating_func"), m["gating"])
        w.add_uint32(a("expert_group_count"), m["groups"])
        w.add_uint32(a("expert_group_used_count"), m["groups_used"])
        w.add_string(a("rope.scaling.type"), "yarn")
        w.add_float32(a("rope.scaling.factor"), m["yarn_factor"])
        w.add_uint32(a("rope.scaling.original_context_length"), m["yarn_orig"])
        w.add_float32(a("rope.scaling.yarn_log_multiplier"), m["yarn_log_mul"])
    add_byte_level_tokenizer(w, pad_to=s.vocab, eos_id=0)

    tensors = dense_tensor_list(s, n_layers, experts_qtype) if s.arch == "llama" else \
        tensor_list(s, n_layers, experts_qtype)
    for name, shp, qt in tensors:
        if qt == T.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            elems, nbytes = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = (*shp[:-1], shp[-1] // elems * nbytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pools = {qt: _pool(qt, rng) for qt in {*_SCALES, T.BF16}}
    for name, shp, qt in tensors:
        if qt == T.F32:
            center = 0.0 if name.endswith(".bias") else 1.0
            scale = 1.0 / np.sqrt(shp[-1]) if len(shp) == 2 else 0.05
            w.write_tensor_data((center * (len(shp) == 1) +
                                 scale * rng.standard_normal(shp)).astype(np.float32))
            continue
        elems, nbytes = gguf.GGML_QUANT_SIZES[qt]
        size = int(np.prod(shp)) // elems * nbytes
        if pools[qt].size < size:
            pools[qt] = _tiled(pools[qt], size)
        w.write_tensor_data(pools[qt][:size])
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=0, help="layers to write (default: all)")
    ap.add_argument("--experts-qtype", choices=("Q4_K", "Q8_0"), default="Q4_K",
                    help="MoE shapes: the routed experts' type")
    ap.add_argument("--qtype", choices=("Q4_K", "Q8_0", "BF16"), default=None,
                    help="dense shapes: every matrix's type (default Q4_K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out")
    args = ap.parse_args()
    t = time.perf_counter()
    qtype = args.qtype or "Q4_K" if SHAPES[args.shape].arch == "llama" else args.experts_qtype
    write(args.out, args.shape, args.layers, T[qtype], args.seed)
    print(f"{args.out}: {args.shape}, {args.layers or SHAPES[args.shape].layers} layers, "
          f"{qtype}, {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
