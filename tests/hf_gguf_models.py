"""Tiny random GLM-4.5 (`glm4moe`), gpt-oss (`gpt-oss`) and YaRN-scaled Qwen3 models built
with transformers and written to GGUF with llama.cpp's names and keys, so ktjax and
transformers run the very same weights."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ktjax.gguf.synthetic import add_byte_level_tokenizer, byte_level_vocab

# transformers parameter (after model.layers.N.) -> GGUF tensor (after blk.N.)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # gpt-oss
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _randomize(model, seed: int):
    """Weights re-drawn at unit scale (the default init's std 0.02 leaves routing near ties)."""
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1 or name.endswith("_bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def hf_glm4moe(*, n_layers: int = 3, qk_norm: bool = False, yarn: bool = False, seed: int = 0,
               **overrides):
    import transformers

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    kw = dict(vocab_size=len(byte_level_vocab()[0]), hidden_size=64, intermediate_size=96,
              moe_intermediate_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, n_shared_experts=1, n_routed_experts=8,
              num_experts_per_tok=2, first_k_dense_replace=1, attention_bias=True,
              use_qk_norm=qk_norm, norm_topk_prob=True, routed_scaling_factor=2.5,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if yarn:
        rope.update(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                    beta_fast=32.0, beta_slow=1.0)
        kw["max_position_embeddings"] = 64
    config = transformers.Glm4MoeConfig(rope_parameters=rope, **dict(kw, **overrides))
    return _randomize(transformers.Glm4MoeForCausalLM(config).float().eval(), seed)


def hf_gpt_oss(*, n_layers: int = 4, yarn: bool = True, seed: int = 0, **overrides):
    import transformers

    rope = {"rope_type": "default", "rope_theta": 150000.0}
    if yarn:  # gpt-oss ships YaRN without truncation; llama.cpp always truncates
        rope.update(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                    beta_fast=32.0, beta_slow=1.0, truncate=True)
    kw = dict(vocab_size=len(byte_level_vocab()[0]), hidden_size=64, intermediate_size=32,
              num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
              layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(n_layers)],
              max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
              attention_bias=True)
    config = transformers.GptOssConfig(rope_parameters=rope, **dict(kw, **overrides))
    model = transformers.GptOssForCausalLM(config).float().eval()
    model.config._attn_implementation = "eager"  # sinks need the eager path
    return _randomize(model, seed)


def _add(w: gguf.GGUFWriter, arch: str, meta: dict) -> None:
    for key, value in meta.items():
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32,
               str: w.add_string}[type(value)]
        add(f"{arch}.{key}", value)


def _common_meta(c, n_blocks: int) -> dict:
    return {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": n_blocks, "attention.head_count": c.num_attention_heads,
            "attention.head_count_kv": c.num_key_value_heads,
            "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
            "rope.freq_base": float(c.rope_parameters["rope_theta"]),
            "vocab_size": c.vocab_size}


def _rope_meta(c) -> dict:
    rope = c.rope_parameters
    if rope["rope_type"] != "yarn":
        return {}
    meta = {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
            "rope.scaling.original_context_length": rope["original_max_position_embeddings"]}
    if rope.get("mscale_all_dim"):  # as llama.cpp's converters (mscale 1 assumed)
        meta["rope.scaling.yarn_log_multiplier"] = float(rope["mscale_all_dim"])
    return meta


def _write_tensors(w: gguf.GGUFWriter, model, convert=None, names=None,
                   expert_qtype: gguf.GGMLQuantizationType | None = None) -> None:
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for name, x in state.items():
        if name in _GLOBAL_NAMES:
            w.add_tensor(_GLOBAL_NAMES[name], np.ascontiguousarray(x))
            continue
        _, _, layer, rest = name.split(".", 3)
        p = f"blk.{layer}."
        out = convert(rest, x) if convert else None
        if out is None and rest == "mlp.experts.gate_up_proj":   # [E, H, 2I] or [E, 2I, H]
            gate, up = np.split(x, 2, axis=1)
            out = {"ffn_gate_exps.weight": gate, "ffn_up_exps.weight": up}
        if out is None:
            out = {(names or {}).get(rest) or _LAYER_NAMES[rest]: x}
        for gname, arr in out.items():
            arr = np.ascontiguousarray(arr)
            if expert_qtype is not None and gname.endswith("_exps.weight"):
                w.add_tensor(p + gname, gguf.quants.quantize(arr, expert_qtype),
                             raw_dtype=expert_qtype)
            else:
                w.add_tensor(p + gname, arr)


def _finish(w: gguf.GGUFWriter) -> None:
    add_byte_level_tokenizer(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_glm4moe_gguf(path: str | Path, model, *, mtp_layer: bool = False) -> Path:
    """GGUF `glm4moe` (float32) of the model; `mtp_layer` appends a multi-token-prediction
    layer as the real files carry (block_count + 1, nextn_predict_layers 1)."""
    c, arch = model.config, "glm4moe"
    w = gguf.GGUFWriter(str(path), arch)
    rot = int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0))
    meta = _common_meta(c, c.num_hidden_layers + mtp_layer) | _rope_meta(c) | {
        "feed_forward_length": c.intermediate_size, "rope.dimension_count": rot,
        "expert_count": c.n_routed_experts, "expert_used_count": c.num_experts_per_tok,
        "expert_feed_forward_length": c.moe_intermediate_size,
        "expert_shared_count": c.n_shared_experts,
        "leading_dense_block_count": c.first_k_dense_replace,
        "expert_weights_scale": float(c.routed_scaling_factor),
        "expert_weights_norm": bool(c.norm_topk_prob), "expert_gating_func": 2,
        "nextn_predict_layers": int(mtp_layer)}
    _add(w, arch, meta)
    _write_tensors(w, model)
    if mtp_layer:
        h, n = c.hidden_size, c.num_hidden_layers
        rng = np.random.default_rng(1)
        for name, shape in (("nextn.eh_proj.weight", (h, 2 * h)), ("nextn.enorm.weight", (h,)),
                            ("nextn.hnorm.weight", (h,)), ("attn_norm.weight", (h,))):
            w.add_tensor(f"blk.{n}.{name}", rng.standard_normal(shape).astype(np.float32))
    _finish(w)
    return Path(path)


def _gpt_oss_experts(rest: str, x: np.ndarray):
    """transformers keeps gate and up interleaved in [E, H, 2I] (and its matrices as
    [in, out]); llama.cpp's converter splits and transposes them."""
    if rest == "mlp.experts.gate_up_proj":
        return {"ffn_gate_exps.weight": x[..., ::2].transpose(0, 2, 1),
                "ffn_up_exps.weight": x[..., 1::2].transpose(0, 2, 1)}
    if rest == "mlp.experts.gate_up_proj_bias":
        return {"ffn_gate_exps.bias": x[..., ::2], "ffn_up_exps.bias": x[..., 1::2]}
    if rest == "mlp.experts.down_proj":
        return {"ffn_down_exps.weight": x.transpose(0, 2, 1)}
    if rest == "mlp.experts.down_proj_bias":
        return {"ffn_down_exps.bias": x}
    return None


def write_gpt_oss_gguf(path: str | Path, model,
                       expert_qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """GGUF `gpt-oss` of the model, as llama.cpp's converter lays it out: float32, the
    routed experts in `expert_qtype` if given (MXFP4 in the released files)."""
    c, arch = model.config, "gpt-oss"
    w = gguf.GGUFWriter(str(path), arch)
    meta = _common_meta(c, c.num_hidden_layers) | _rope_meta(c) | {
        "feed_forward_length": c.intermediate_size, "rope.dimension_count": c.head_dim,
        "expert_count": c.num_local_experts, "expert_used_count": c.num_experts_per_tok,
        "expert_feed_forward_length": c.intermediate_size,
        "attention.sliding_window": c.sliding_window}
    _add(w, arch, meta)
    _write_tensors(w, model, _gpt_oss_experts, expert_qtype=expert_qtype)
    _finish(w)
    return Path(path)


def hf_qwen3_yarn(*, seed: int = 0, mscale_all_dim: float | None = None):
    """Qwen3 with YaRN (factor 4 over 16 original positions: a 128K model in miniature);
    `mscale_all_dim` (with mscale 1) changes YaRN's attention factor."""
    import transformers

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16}
    if mscale_all_dim:
        rope.update(mscale=1.0, mscale_all_dim=mscale_all_dim)
    config = transformers.Qwen3Config(
        vocab_size=len(byte_level_vocab()[0]), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=rope)
    return _randomize(transformers.Qwen3ForCausalLM(config).float().eval(), seed)


def write_qwen3_gguf(path: str | Path, model) -> Path:
    c, arch = model.config, "qwen3"
    w = gguf.GGUFWriter(str(path), arch)
    _add(w, arch, _common_meta(c, c.num_hidden_layers) | _rope_meta(c) |
         {"feed_forward_length": c.intermediate_size})
    _write_tensors(w, model, names={"post_attention_layernorm.weight": "ffn_norm.weight"})
    _finish(w)
    return Path(path)
