"""The llama family: `llama` (Llama 2/3, SmolLM2, Mistral; Mixtral when it has `ffn_*_exps`),
`qwen2` (q/k/v bias), `qwen3` (q/k RMSNorm) and their mixture-of-experts variants `qwen2moe`
(shared expert with a sigmoid gate) and `qwen3moe`. GQA, RoPE with llama3-style frequency
factors (GGUF tensor rope_freqs), linear or YaRN scaling, tied or separate output head."""
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

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")

# MoE routing per architecture: (renormalize top-k weights, shared expert), as llama.cpp.
_MOE = {"llama": (True, False), "qwen2moe": (False, True), "qwen3moe": (True, False)}


@dataclass(frozen=True)
class LlamaConfig(GqaConfig):
    rope_base: float
    rope_dim: int
    rope_scaling: layers.RopeScaling
    moe: moe.MoeConfig | None = None   # every layer's FFN is a mixture of experts

    @property
    def rope_neox(self) -> bool:
        # llama.cpp's converter permutes llama q/k into adjacent-pair rotation; qwen keeps NeoX.
        return self.architecture != "llama"

    @property
    def attn_bias(self) -> bool:
        return self.architecture in ("qwen2", "qwen2moe")

    @property
    def qk_norm(self) -> bool:
        return self.architecture in ("qwen3", "qwen3moe")

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "LlamaConfig":
        a = f.architecture
        n_experts = int(f.get(f"{a}.expert_count", 0))
        if a.endswith("moe") and n_experts <= 0:
            raise UnsupportedModelError(f"{f.path}: {a} needs {a}.expert_count > 0")
        if n_experts and a not in _MOE:
            raise UnsupportedModelError(f"{a} with {n_experts} experts is not supported")
        common = GqaConfig.gguf_fields(f)
        return cls(
            **common,
            rope_base=float(f.get(f"{a}.rope.freq_base", 10000.0)),
            rope_dim=int(f.get(f"{a}.rope.dimension_count", common["head_dim"])),
            rope_scaling=layers.RopeScaling.from_gguf(f),
            moe=moe.MoeConfig.from_gguf(f, default_ffn=common["intermediate_size"],
                                        norm_topk=_MOE[a][0], shared=_MOE[a][1])
            if n_experts else None,
        )


CONFIG = LlamaConfig


def tensor_table(cfg: LlamaConfig) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table: parameter path -> tensor name and shape."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.n_heads * cfg.head_dim, \
        cfg.n_kv_heads * cfg.head_dim
    t = {
        "token_embd": TensorSpec("token_embd.weight", (cfg.vocab_size, h), kind="embedding"),
        "output_norm": TensorSpec("output_norm.weight", (h,)),
        "output": TensorSpec("output.weight", (cfg.vocab_size, h), optional=True),
        "rope_freqs": TensorSpec("rope_freqs.weight", (cfg.rope_dim // 2,), optional=True),
        "layers.attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "layers.attn_q": TensorSpec("blk.{}.attn_q.weight", (hq, h)),
        "layers.attn_k": TensorSpec("blk.{}.attn_k.weight", (hkv, h)),
        "layers.attn_v": TensorSpec("blk.{}.attn_v.weight", (hkv, h)),
        "layers.attn_output": TensorSpec("blk.{}.attn_output.weight", (h, hq)),
        "layers.ffn_norm": TensorSpec("blk.{}.ffn_norm.weight", (h,)),
    }
    if cfg.moe:
        t.update(moe.tensor_table(cfg.moe, h))
    else:
        ff = cfg.intermediate_size
        t["layers.ffn_gate"] = TensorSpec("blk.{}.ffn_gate.weight", (ff, h))
        t["layers.ffn_up"] = TensorSpec("blk.{}.ffn_up.weight", (ff, h))
        t["layers.ffn_down"] = TensorSpec("blk.{}.ffn_down.weight", (h, ff))
    if cfg.attn_bias:
        t["layers.attn_q_bias"] = TensorSpec("blk.{}.attn_q.bias", (hq,))
        t["layers.attn_k_bias"] = TensorSpec("blk.{}.attn_k.bias", (hkv,))
        t["layers.attn_v_bias"] = TensorSpec("blk.{}.attn_v.bias", (hkv,))
    if cfg.qk_norm:
        t["layers.attn_q_norm"] = TensorSpec("blk.{}.attn_q_norm.weight", (d,))
        t["layers.attn_k_norm"] = TensorSpec("blk.{}.attn_k_norm.weight", (d,))
    return t


def attention(cfg: GqaConfig, inv_freq: jax.Array, lp: dict, x: jax.Array,
              ctx: AttentionContext, neox: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm GQA attention (optional q/k RMSNorm, rope): x plus the attention output,
    and the step's keys and values. Llama's and GLM-4.5's layers share it."""
    b, t, _ = x.shape
    h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q, k, v = weights.project(lp, ("attn_q", "attn_k", "attn_v"), h)
    q = q.reshape(b, t, cfg.n_heads, -1)
    k = k.reshape(b, t, cfg.n_kv_heads, -1)
    v = v.reshape(b, t, cfg.n_kv_heads, -1)
    if cfg.qk_norm:
        q = layers.rms_norm(q, lp["attn_q_norm"], cfg.rms_eps)
        k = layers.rms_norm(k, lp["attn_k_norm"], cfg.rms_eps)
    pos, mscale = ctx.batch.positions, cfg.rope_scaling.mscale
    q = layers.apply_rope(q, pos, inv_freq, neox, mscale)
    k = layers.apply_rope(k, pos, inv_freq, neox, mscale)
    a = ctx.attend(q, k, v, scale=cfg.head_dim ** -0.5)
    return x + weights.linear(lp["attn_output"], a.reshape(b, t, -1)), k, v


def _block(cfg: LlamaConfig, inv_freq: jax.Array, lp: dict, x: jax.Array, layer: jax.Array,
           ctx: AttentionContext):
    x, k, v = attention(cfg, inv_freq, lp, x, ctx, cfg.rope_neox)
    h = layers.rms_norm(x, lp["ffn_norm"], cfg.rms_eps)
    if cfg.moe:
        return x + moe.moe_ffn(cfg.moe, lp, h), (k, v)
    gate, up = weights.project(lp, ("ffn_gate", "ffn_up"), h)
    g = jax.nn.silu(gate) * up
    return x + weights.linear(lp["ffn_down"], g), (k, v)


def make_forward(cfg: LlamaConfig, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config."""
    base_inv_freq = cfg.rope_scaling.inv_freq(cfg.rope_dim, cfg.rope_base)

    def forward(params: dict, kv: KVCache, batch: Batch):
        inv_freq = jnp.asarray(base_inv_freq)
        if "rope_freqs" in params:  # llama3-style scaling: per-frequency divisors
            inv_freq = inv_freq / params["rope_freqs"].astype(jnp.float32)
        return decoder_forward(params, kv, batch, block=partial(_block, cfg, inv_freq),
                               backend=backend, rms_eps=cfg.rms_eps)
    return forward
