"""GLM-4.5 / 4.6 / 4.5-Air (GGUF `glm4moe`): GQA attention with q/k/v biases, optional q/k
RMSNorm, partial NeoX RoPE (rope.dimension_count of each head), a post-attention norm before
the FFN; leading dense layers, then MoE layers with a shared expert and sigmoid routing with
a score-correction bias, renormalized top-k and a routed scaling factor (DeepSeek-V3's).

The multi-token-prediction layers the files carry after the trunk (`nextn_predict_layers`,
tensors blk.{n_layers}.*) serve speculative decoding only; they are knowingly skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ktjax import weights
from ktjax.errors import UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers, moe
from ktjax.models.base import (AttentionContext, Batch, GqaConfig, KVCache, TensorSpec,
                               decoder_forward)
from ktjax.models.deepseek2 import mtp_tensors, routing_config, trunk_layers
from ktjax.models.llama import attention

ARCHITECTURES = ("glm4moe",)


@dataclass(frozen=True)
class Glm4MoeConfig(GqaConfig):
    rope_base: float
    rope_dim: int
    rope_scaling: layers.RopeScaling
    n_dense_layers: int
    qk_norm: bool
    moe: moe.MoeConfig

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Glm4MoeConfig":
        a = f.architecture
        common = GqaConfig.gguf_fields(f)
        common["n_layers"] = trunk_layers(f)
        n_dense = int(f.get(f"{a}.leading_dense_block_count", 0))
        if not 0 <= n_dense < common["n_layers"]:
            raise UnsupportedModelError(
                f"{f.path}: {a}.leading_dense_block_count = {n_dense} with "
                f"{common['n_layers']} layers (expected 0..{common['n_layers'] - 1})")
        if f.get(f"{a}.rope.dimension_sections", None):
            raise UnsupportedModelError(f"{f.path}: {a}.rope.dimension_sections (multimodal "
                                        "M-RoPE) is not supported")
        return cls(**common,
                   rope_base=float(f.get(f"{a}.rope.freq_base", 10000.0)),
                   rope_dim=int(f.get(f"{a}.rope.dimension_count", common["head_dim"])),
                   rope_scaling=layers.RopeScaling.from_gguf(f),
                   n_dense_layers=n_dense,
                   qk_norm=f"blk.{n_dense}.attn_q_norm.weight" in f.tensors,
                   moe=routing_config(f, n_dense, default_gating=2))


CONFIG = Glm4MoeConfig


def ignored_tensors(cfg: Glm4MoeConfig, f: GGUFFile) -> set[str]:
    return mtp_tensors(f, cfg.n_layers)


def tensor_table(cfg: Glm4MoeConfig) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table: the leading dense layers form the stack "dense",
    the MoE layers the stack "layers"."""
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv = cfg.n_heads * d, cfg.n_kv_heads * d
    attn = {
        "attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "attn_q": TensorSpec("blk.{}.attn_q.weight", (hq, h)),
        "attn_k": TensorSpec("blk.{}.attn_k.weight", (hkv, h)),
        "attn_v": TensorSpec("blk.{}.attn_v.weight", (hkv, h)),
        "attn_q_bias": TensorSpec("blk.{}.attn_q.bias", (hq,)),
        "attn_k_bias": TensorSpec("blk.{}.attn_k.bias", (hkv,)),
        "attn_v_bias": TensorSpec("blk.{}.attn_v.bias", (hkv,)),
        "attn_output": TensorSpec("blk.{}.attn_output.weight", (h, hq)),
        "post_attention_norm": TensorSpec("blk.{}.post_attention_norm.weight", (h,)),
    }
    if cfg.qk_norm:
        attn["attn_q_norm"] = TensorSpec("blk.{}.attn_q_norm.weight", (d,))
        attn["attn_k_norm"] = TensorSpec("blk.{}.attn_k_norm.weight", (d,))
    return moe.leading_dense_table(attn, cfg.moe, h, cfg.intermediate_size, cfg.vocab_size,
                                   cfg.n_dense_layers, cfg.n_layers)


def _block(cfg: Glm4MoeConfig, inv_freq: jax.Array, routed: bool, lp: dict, x: jax.Array,
           layer: jax.Array, ctx: AttentionContext):
    x, k, v = attention(cfg, inv_freq, lp, x, ctx, neox=True)
    h = layers.rms_norm(x, lp["post_attention_norm"], cfg.rms_eps)
    if routed:
        y = moe.moe_ffn(cfg.moe, lp, h)
    else:
        gate, up = weights.project(lp, ("ffn_gate", "ffn_up"), h)
        y = weights.linear(lp["ffn_down"], jax.nn.silu(gate) * up)
    return x + y, (k, v)


def make_forward(cfg: Glm4MoeConfig, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config."""
    inv_freq = cfg.rope_scaling.inv_freq(cfg.rope_dim, cfg.rope_base)
    stacks = moe.leading_dense_stacks(cfg.n_dense_layers)

    def forward(params: dict, kv: KVCache, batch: Batch):
        freq = jnp.asarray(inv_freq)
        return decoder_forward(params, kv, batch, block=None, backend=backend,
                               rms_eps=cfg.rms_eps,
                               stacks=[(key, partial(_block, cfg, freq, routed))
                                       for key, routed in stacks])
    return forward
