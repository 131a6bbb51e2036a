"""Tiny random GGUF models written with gguf.GGUFWriter, for tests of every family and quant type.

Weights are random; K-quant tensors are random raw blocks (the gguf package cannot quantize to
them) with finite, small scale fields, which is a valid K-quant tensor all the same.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ktjax.gguf.synthetic import add_byte_level_tokenizer, byte_level_vocab

T = gguf.GGMLQuantizationType

# Byte offsets and value of the f16 scale fields (d, dmin) in each K-quant block.
_KQUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
                  T.Q6_K: (208,)}



def _random_weight(rng: np.random.Generator, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    """Random tensor stored as `qtype` (raw bytes for quantized types)."""
    x = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if qtype in _KQUANT_SCALES:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = x.size // block_elems
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for off in _KQUANT_SCALES[qtype]:
            raw[:, off:off + 2] = np.full(n_blocks, 2e-3, np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(*shape[:-1], -1)
    return gguf.quants.quantize(x, qtype)


def write_tiny_gguf(path: str | Path, arch: str = "llama", qtype: T = T.F32, *,
                    n_layers: int = 2, hidden: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                    head_dim: int = 16, ffn: int = 128, tied: bool = True,
                    rope_freqs: bool = False, seed: int = 0, context_length: int = 512,
                    skip: tuple[str, ...] = (), extra: dict | None = None,
                    extra_kv: dict[str, int] | None = None, n_experts: int = 0,
                    n_used: int = 2, expert_ffn: int = 32, shared_ffn: int = 0,
                    expert_qtype: T | None = None) -> Path:
    """Write a random model of `arch` ('llama', 'qwen2', 'qwen3', 'qwen2moe', 'qwen3moe',
    'gemma3'); n_experts > 0 replaces the FFN by routed experts (`llama`: Mixtral) in
    `expert_qtype` (default `qtype`), shared_ffn > 0 adds qwen2moe's gated shared expert.

    2-D weights use `qtype`; norms/biases are F32. `skip` leaves tensors out and `extra`
    adds or replaces tensors ({name: float32 array or (raw bytes, GGML type)}) and `extra_kv`
    uint32 metadata, for bad-input tests.
    """
    rng = np.random.default_rng(seed)
    vocab = len(byte_level_vocab()[0])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1_000_000.0)
    w.add_vocab_size(vocab)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(8)
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(n_used)
        if arch != "llama":  # Mixtral's experts use feed_forward_length
            w.add_expert_feed_forward_length(expert_ffn)
        if shared_ffn:
            w.add_expert_shared_feed_forward_length(shared_ffn)
    add_byte_level_tokenizer(w)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)

    hq, hkv = n_heads * head_dim, n_kv_heads * head_dim
    tensors: dict[str, tuple[np.ndarray, T | None]] = {}

    def mat(name, shape, qt=qtype):
        tensors[name] = (_random_weight(rng, shape, qt), qt)

    def vec(name, n, center=1.0):
        tensors[name] = ((center + 0.1 * rng.standard_normal(n)).astype(np.float32), None)

    mat("token_embd.weight", (vocab, hidden), T.F32 if qtype in _KQUANT_SCALES and
        hidden % 256 else qtype)
    vec("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", (vocab, hidden))
    if rope_freqs:
        tensors["rope_freqs.weight"] = (np.linspace(1.0, 8.0, head_dim // 2, dtype=np.float32),
                                        None)
    for i in range(n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", hidden)
        mat(p + "attn_q.weight", (hq, hidden))
        mat(p + "attn_k.weight", (hkv, hidden))
        mat(p + "attn_v.weight", (hkv, hidden))
        mat(p + "attn_output.weight", (hidden, hq))
        vec(p + "ffn_norm.weight", hidden)
        if n_experts:
            eff, eq = ffn if arch == "llama" else expert_ffn, expert_qtype or qtype
            mat(p + "ffn_gate_inp.weight", (n_experts, hidden), T.F32)
            mat(p + "ffn_gate_exps.weight", (n_experts, eff, hidden), eq)
            mat(p + "ffn_up_exps.weight", (n_experts, eff, hidden), eq)
            mat(p + "ffn_down_exps.weight", (n_experts, hidden, eff), eq)
        else:
            mat(p + "ffn_gate.weight", (ffn, hidden))
            mat(p + "ffn_up.weight", (ffn, hidden))
            mat(p + "ffn_down.weight", (hidden, ffn))
        if shared_ffn:
            mat(p + "ffn_gate_shexp.weight", (shared_ffn, hidden))
            mat(p + "ffn_up_shexp.weight", (shared_ffn, hidden))
            mat(p + "ffn_down_shexp.weight", (hidden, shared_ffn))
            vec(p + "ffn_gate_inp_shexp.weight", hidden, center=0.0)
        if arch in ("qwen2", "qwen2moe"):
            for n, size in (("q", hq), ("k", hkv), ("v", hkv)):
                vec(p + f"attn_{n}.bias", size, center=0.0)
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        if arch == "gemma3":
            vec(p + "post_attention_norm.weight", hidden)
            vec(p + "post_ffw_norm.weight", hidden)
    for name, array in (extra or {}).items():
        tensors[name] = array if isinstance(array, tuple) else (array, None)
    for name, (data, qt) in tensors.items():
        if name in skip:
            continue
        if qt is None or qt == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
