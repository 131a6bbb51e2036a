"""Logits of a GGUF model from ktjax's forward and from transformers loading the same file."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import rules as placement_rules
from ktjax.engine.kv_cache import make_kv_cache
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import REFERENCE, AttentionBackend
from ktjax.models import loader
from ktjax.models.base import Batch

PAGE = 4


def ktjax_logits(path, ids: np.ndarray, rules: str | None = None,
                 backend: AttentionBackend = REFERENCE) -> np.ndarray:
    """Logits [T, V] for every position of `ids`, one prefill through the paged forward;
    `rules` (a rules file or profile) places the weights, default all on the device;
    attention on `backend` (default the jnp reference)."""
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    placement = placement_rules.place(f, spec.table, cfg.n_layers, rules or "device", "cpu")
    params = loader.load_params(f, spec, placement)
    forward = spec.family.make_forward(cfg, backend)
    t = len(ids)
    n_pages = -(-t // PAGE)
    # Deliberately scattered, non-contiguous pages: the block table must be honoured.
    pages = np.arange(n_pages, dtype=np.int32)[::-1] * 2 + 1
    kv = make_kv_cache(cfg.cache_spec, 2 * n_pages + 1, PAGE, jnp.float32)
    slots = np.array([pages[i // PAGE] * PAGE + i % PAGE for i in range(t)], np.int32)
    batch = Batch(tokens=jnp.asarray(ids[None], jnp.int32),
                  positions=jnp.arange(t, dtype=jnp.int32)[None],
                  slots=jnp.asarray(slots[None]), block_tables=jnp.asarray(pages[None]),
                  cache_lens=jnp.array([0], jnp.int32),
                  logits_index=jnp.arange(t, dtype=jnp.int32)[None])
    # float32 matmuls in full precision on every backend (GPUs default to TF32)
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(forward)(params, kv, batch)
    return np.asarray(logits[0])


def hf_logits(path, ids: np.ndarray) -> np.ndarray:
    """transformers' implementation of the architecture, loading the same GGUF file."""
    return hf_run(hf_model(path), ids)


def hf_run(model, ids: np.ndarray) -> np.ndarray:
    """Logits [T, V] of a transformers model for every position of `ids`."""
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()


def hf_model(path):
    """transformers' implementation of the architecture with the weights of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    f = GGUFFile(path)
    arch = f.architecture
    overrides = {}
    head_dim = f.get(f"{arch}.attention.key_length", None)
    if arch == "qwen3" and head_dim:   # transformers' GGUF mapping ignores key_length
        overrides["head_dim"] = head_dim
    if arch == "gemma3" and head_dim:  # llama.cpp scales queries by head_dim
        overrides["query_pre_attn_scalar"] = head_dim
    # ... and ignores the expert sizes
    for key, hf_key in (("expert_feed_forward_length", "moe_intermediate_size"),
                        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")):
        if f.get(f"{arch}.{key}", None):
            overrides[hf_key] = f.get(f"{arch}.{key}")
    if arch == "llama" and f.get("llama.expert_count", 0):
        model = _hf_mixtral(path, f)
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path),
                                                     dtype=torch.float32, **overrides)
    return model


def _hf_mixtral(path, f: GGUFFile):
    """transformers' Mixtral with the GGUF's weights: its GGUF loader reads `llama` files as
    dense Llama, so the weights are mapped here (gguf's own reader and dequantizer, q/k
    un-permuted as transformers does for llama)."""
    import gguf
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    g = lambda k: f.get(f"llama.{k}")
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    head_dim = g("attention.key_length")
    config = MixtralConfig(
        vocab_size=g("vocab_size"), hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        num_local_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"), rope_theta=g("rope.freq_base"),
        max_position_embeddings=g("context_length"),
        tie_word_embeddings="output.weight" not in f.tensors)
    permute = LlamaTensorProcessor()._reverse_permute_weights
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head", "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate_inp": "mlp.gate"}
    state, experts = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            [int(d) for d in reversed(t.shape)]).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind == "attn_q":
                w = permute(w, n_heads)
            elif kind == "attn_k":
                w = permute(w, n_heads, n_kv)
            if kind.endswith("_exps"):  # Mixtral fuses gate and up: [E, 2I, H]
                experts.setdefault(layer, {})[kind] = w
                continue
            key = f"model.layers.{layer}.{names[kind]}"
        else:
            key = names[parts[0]]
        state[key + ".weight"] = torch.from_numpy(w)
    for layer, gu in experts.items():
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(
            np.concatenate([gu["ffn_gate_exps"], gu["ffn_up_exps"]], axis=1))
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.from_numpy(
            gu["ffn_down_exps"])
    model = MixtralForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model
