"""Tiny random DeepSeek-V2/V3 models built with transformers and written to GGUF (`deepseek2`)
with llama.cpp's names, so ktjax and transformers run the very same weights."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ktjax.gguf.synthetic import add_byte_level_tokenizer, byte_level_vocab

ARCH = "deepseek2"
# transformers parameter (after model.layers.N.) -> GGUF tensor (after blk.N.)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def hf_deepseek(version: int, *, q_lora_rank: int | None = 24, yarn: bool = False,
                n_layers: int = 3, seed: int = 0, **overrides):
    """A random DeepseekV{version}ForCausalLM (float32, eval) of tiny dimensions; weights
    re-drawn at unit scale (the default init's std 0.02 leaves routing near ties)."""
    import torch
    import transformers

    vocab = len(byte_level_vocab()[0])
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
              n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32,
              q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:  # mscale == mscale_all_dim, as the released models: cos/sin unscaled
        kw["max_position_embeddings"] = 64   # = factor x original
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707,
                "beta_fast": 32, "beta_slow": 1}
    if version == 2:
        kw.update(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                  routed_scaling_factor=2.0)
        config = transformers.DeepseekV2Config(rope_parameters=rope, **dict(kw, **overrides))
        cls = transformers.DeepseekV2ForCausalLM
    else:
        kw.update(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
        config = transformers.DeepseekV3Config(rope_parameters=rope, **dict(kw, **overrides))
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def write_deepseek_gguf(path: str | Path, model, *, split_kv_b: bool = False,
                        metadata: dict | None = None, mtp_layer: bool = False) -> Path:
    """The model's weights as GGUF `deepseek2` (float32). split_kv_b writes llama.cpp's MLA
    form (attn_k_b transposed / attn_v_b per head, MQA-style key/value lengths); `metadata`
    overrides or adds `deepseek2.*` keys (bad-input tests)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), ARCH)
    a = lambda key: f"{ARCH}.{key}"
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers + mtp_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_vocab_size(c.vocab_size)
    qk, r = c.qk_nope_head_dim + c.qk_rope_head_dim, c.kv_lora_rank
    if split_kv_b:
        w.add_head_count_kv(1)
        w.add_key_length(r + c.qk_rope_head_dim)
        w.add_value_length(r)
        w.add_uint32(a("attention.key_length_mla"), qk)
        w.add_uint32(a("attention.value_length_mla"), c.v_head_dim)
    else:
        w.add_head_count_kv(c.num_attention_heads)
        w.add_key_length(qk)
        w.add_value_length(c.v_head_dim)
    meta: dict[str, int | float | bool | str] = {
        "attention.kv_lora_rank": r, "leading_dense_block_count": c.first_k_dense_replace,
        "expert_count": c.n_routed_experts, "expert_used_count": c.num_experts_per_tok,
        "expert_feed_forward_length": c.moe_intermediate_size,
        "expert_shared_count": c.n_shared_experts,
        "expert_weights_scale": float(c.routed_scaling_factor)}
    if c.q_lora_rank:
        meta["attention.q_lora_rank"] = c.q_lora_rank
    if mtp_layer:
        meta["nextn_predict_layers"] = 1
    v3 = c.model_type == "deepseek_v3"
    meta["expert_weights_norm"] = bool(v3 and c.norm_topk_prob)
    meta["expert_gating_func"] = 2 if v3 else 1
    if v3 or c.topk_method == "group_limited_greedy":
        meta["expert_group_count"] = c.n_group
        meta["expert_group_used_count"] = c.topk_group
    rope = c.rope_parameters
    if rope["rope_type"] == "yarn":
        meta.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
                     "rope.scaling.original_context_length":
                         rope["original_max_position_embeddings"],
                     "rope.scaling.yarn_log_multiplier": 0.1 * rope["mscale_all_dim"]})
    for key, value in dict(meta, **(metadata or {})).items():
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32,
               str: w.add_string}[type(value)]
        add(a(key), value)
    add_byte_level_tokenizer(w)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for name, x in state.items():
        if name in _GLOBAL_NAMES:
            w.add_tensor(_GLOBAL_NAMES[name], np.ascontiguousarray(x))
            continue
        _, _, layer, rest = name.split(".", 3)
        p = f"blk.{layer}."
        if rest == "mlp.experts.gate_up_proj":   # [E, 2I, H] -> gate, up
            gate, up = np.split(x, 2, axis=1)
            w.add_tensor(p + "ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(p + "ffn_up_exps.weight", np.ascontiguousarray(up))
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:  # as llama.cpp's converter
            kv_b = x.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, r)
            k_b, v_b = kv_b[:, :c.qk_nope_head_dim], kv_b[:, c.qk_nope_head_dim:]
            w.add_tensor(p + "attn_k_b.weight", np.ascontiguousarray(k_b.transpose(0, 2, 1)))
            w.add_tensor(p + "attn_v_b.weight", np.ascontiguousarray(v_b))
        else:
            w.add_tensor(p + _LAYER_NAMES[rest], np.ascontiguousarray(x))
    if mtp_layer:
        h, n = c.hidden_size, c.num_hidden_layers
        rng = np.random.default_rng(1)
        for name, shape in (("nextn.eh_proj.weight", (h, 2 * h)), ("nextn.enorm.weight", (h,)),
                            ("nextn.hnorm.weight", (h,)), ("attn_norm.weight", (h,)),
                            ("nextn.shared_head_norm.weight", (h,))):
            w.add_tensor(f"blk.{n}.{name}", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
