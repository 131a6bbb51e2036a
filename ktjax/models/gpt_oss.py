"""gpt-oss (GGUF `gpt-oss`): GQA attention with biases and a learned sink logit per head,
sliding-window layers alternating with full ones (even layers slide, as llama.cpp's pattern
2), NeoX RoPE with YaRN; every layer a mixture of experts routed by a biased router (top-k of
the logits, softmax over the chosen), experts with biases and the clamped SwiGLU of gpt-oss:
(clamp(up, ±7) + 1) · g · sigmoid(1.702 g), g = min(gate, 7).

Placement: the routed experts go where the rules say, as for the other MoE families. On the
host (the CPU default) each layer's expert set is stored with its biases and the clamped
SwiGLU (ktjax.expert_activation), MXFP4 blocks repacked losslessly; a rules file's
`experts:` section (n_cpu_moe, device_blocks, hot) moves some of them to the device
(ktjax.hybrid_experts, biases gathered into the pool); device experts run as grouped matmuls
here (MXFP4 dequantized at load). Attention runs on the engine's backend (reference, cpu and
pallas all take the sinks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ktjax import weights
from ktjax.errors import UnsupportedModelError
from ktjax.expert_activation import ExpertActivation
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers
from ktjax.models.base import (AttentionContext, Batch, GqaConfig, KVCache, TensorSpec,
                               decoder_forward, gguf_vocab_size)
from ktjax.models.moe import EXPERTS

ARCHITECTURES = ("gpt-oss",)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants
# the loader stores it with host expert sets and hybrid pools
EXPERT_ACTIVATION = ExpertActivation("swiglu_oai", SWIGLU_ALPHA, SWIGLU_LIMIT)


@dataclass(frozen=True)
class GptOssConfig(GqaConfig):
    rope_base: float
    rope_dim: int
    rope_scaling: layers.RopeScaling
    sliding_window: int
    n_experts: int
    n_used: int
    expert_ffn: int

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "GptOssConfig":
        a = f.architecture
        get = lambda key, *default: f.get(f"{a}.{key}", *default)
        n_experts, n_used = int(get("expert_count", 0)), int(get("expert_used_count", 0))
        if not 0 < n_used <= n_experts:
            raise UnsupportedModelError(f"{f.path}: {a}.expert_used_count = {n_used} with "
                                        f"{n_experts} experts (expected 1..expert_count)")
        expert_ffn = int(get("expert_feed_forward_length"))
        common = dict(
            architecture=a, vocab_size=gguf_vocab_size(f),
            hidden_size=int(get("embedding_length")), n_layers=int(get("block_count")),
            n_heads=int(get("attention.head_count")),
            n_kv_heads=int(get("attention.head_count_kv")),
            head_dim=int(get("attention.key_length")),
            intermediate_size=int(get("feed_forward_length", expert_ffn)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            context_length=int(get("context_length")))
        swa_base = get("rope.freq_base_swa", None)
        base = float(get("rope.freq_base", 10000.0))
        if swa_base is not None and float(swa_base) != base:
            raise UnsupportedModelError(f"{f.path}: {a}.rope.freq_base_swa = {swa_base} "
                                        "differs from rope.freq_base; not supported")
        return cls(**common, rope_base=base,
                   rope_dim=int(get("rope.dimension_count", common["head_dim"])),
                   rope_scaling=layers.RopeScaling.from_gguf(f),
                   sliding_window=int(get("attention.sliding_window")),
                   n_experts=n_experts, n_used=n_used, expert_ffn=expert_ffn)


CONFIG = GptOssConfig


def tensor_table(cfg: GptOssConfig) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table. Expert biases [E, n] are declared vectors (float32
    on the device, used by device experts); the loader also stores them with host expert
    sets."""
    h, d, e, ff = cfg.hidden_size, cfg.head_dim, cfg.n_experts, cfg.expert_ffn
    hq, hkv = cfg.n_heads * d, cfg.n_kv_heads * d
    return {
        "token_embd": TensorSpec("token_embd.weight", (cfg.vocab_size, h), kind="embedding"),
        "output_norm": TensorSpec("output_norm.weight", (h,)),
        "output": TensorSpec("output.weight", (cfg.vocab_size, h), optional=True),
        "layers.attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "layers.attn_q": TensorSpec("blk.{}.attn_q.weight", (hq, h)),
        "layers.attn_k": TensorSpec("blk.{}.attn_k.weight", (hkv, h)),
        "layers.attn_v": TensorSpec("blk.{}.attn_v.weight", (hkv, h)),
        "layers.attn_q_bias": TensorSpec("blk.{}.attn_q.bias", (hq,)),
        "layers.attn_k_bias": TensorSpec("blk.{}.attn_k.bias", (hkv,)),
        "layers.attn_v_bias": TensorSpec("blk.{}.attn_v.bias", (hkv,)),
        "layers.attn_output": TensorSpec("blk.{}.attn_output.weight", (h, hq)),
        "layers.attn_output_bias": TensorSpec("blk.{}.attn_output.bias", (h,)),
        "layers.attn_sinks": TensorSpec("blk.{}.attn_sinks.weight", (cfg.n_heads,)),
        "layers.post_attention_norm": TensorSpec("blk.{}.post_attention_norm.weight", (h,)),
        "layers.ffn_gate_inp": TensorSpec("blk.{}.ffn_gate_inp.weight", (e, h)),
        "layers.ffn_gate_inp_bias": TensorSpec("blk.{}.ffn_gate_inp.bias", (e,)),
        "layers.ffn_gate_exps": TensorSpec("blk.{}.ffn_gate_exps.weight", (e, ff, h),
                                           kind="experts"),
        "layers.ffn_up_exps": TensorSpec("blk.{}.ffn_up_exps.weight", (e, ff, h), kind="experts"),
        "layers.ffn_down_exps": TensorSpec("blk.{}.ffn_down_exps.weight", (e, h, ff),
                                           kind="experts"),
        "layers.ffn_gate_exps_bias": TensorSpec("blk.{}.ffn_gate_exps.bias", (e, ff), kind="vector"),
        "layers.ffn_up_exps_bias": TensorSpec("blk.{}.ffn_up_exps.bias", (e, ff), kind="vector"),
        "layers.ffn_down_exps_bias": TensorSpec("blk.{}.ffn_down_exps.bias", (e, h), kind="vector"),
    }


_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # x [M, in] . w [E, out, in] over `in`
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _experts(lp: dict, x: jax.Array, ids: jax.Array, route_w: jax.Array) -> jax.Array:
    """The chosen experts' clamped-SwiGLU FFN with biases, weighted and summed per token.
    Host and hybrid sets hold their biases and activation; device experts: the N*k (token,
    expert) pairs sorted by expert, one ragged matmul per matrix."""
    w = lp[EXPERTS]
    if not isinstance(w, weights.DeviceExperts):
        return weights.experts_plus(w, x, weights.Route(ids, route_w), None)
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    expert, token = flat[order], order // k
    sizes = jnp.bincount(flat, length=w.gate.shape[0]).astype(jnp.int32)

    def mm(a, m, bias):
        y = jax.lax.ragged_dot_general(a.astype(m.dtype), m, sizes, _RAGGED,
                                       preferred_element_type=jnp.float32)
        return y + lp[bias].astype(jnp.float32)[expert]

    xs = x[token]
    g = EXPERT_ACTIVATION.apply(mm(xs, w.gate, "ffn_gate_exps_bias"),
                                mm(xs, w.up, "ffn_up_exps_bias"))
    y = mm(g, w.down, "ffn_down_exps_bias") * route_w.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y)


def _moe(cfg: GptOssConfig, lp: dict, h: jax.Array) -> jax.Array:
    b, t, hidden = h.shape
    x = h.reshape(b * t, hidden)
    logits = weights.linear(lp["ffn_gate_inp"], x.astype(jnp.float32), lp["ffn_gate_inp_bias"])
    top, ids = jax.lax.top_k(logits, cfg.n_used)
    route_w = jax.nn.softmax(top, axis=-1)   # llama.cpp's SOFTMAX_WEIGHT gating
    y = _experts(lp, x, ids.astype(jnp.int32), route_w)
    return y.reshape(b, t, hidden).astype(h.dtype)


def _block(cfg: GptOssConfig, inv_freq: jax.Array, lp: dict, x: jax.Array, layer: jax.Array,
           ctx: AttentionContext):
    b, t, _ = x.shape
    pos = ctx.batch.positions
    h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q, k, v = weights.project(lp, ("attn_q", "attn_k", "attn_v"), h)
    q = q.reshape(b, t, cfg.n_heads, -1)
    k = k.reshape(b, t, cfg.n_kv_heads, -1)
    v = v.reshape(b, t, cfg.n_kv_heads, -1)
    mscale = cfg.rope_scaling.mscale
    q = layers.apply_rope(q, pos, inv_freq, neox=True, mscale=mscale)
    k = layers.apply_rope(k, pos, inv_freq, neox=True, mscale=mscale)
    window = jnp.where(layer % 2 == 0, cfg.sliding_window, 0)
    a = ctx.attend(q, k, v, scale=cfg.rope_dim ** -0.5, sliding_window=window,
                   sinks=lp["attn_sinks"])
    x = x + weights.linear(lp["attn_output"], a.reshape(b, t, -1), lp["attn_output_bias"])
    h = layers.rms_norm(x, lp["post_attention_norm"], cfg.rms_eps)
    return x + _moe(cfg, lp, h), (k, v)


def make_forward(cfg: GptOssConfig, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config, attending on
    `backend` (every backend takes the sinks)."""
    inv_freq = cfg.rope_scaling.inv_freq(cfg.rope_dim, cfg.rope_base)

    def forward(params: dict, kv: KVCache, batch: Batch):
        return decoder_forward(params, kv, batch,
                               block=partial(_block, cfg, jnp.asarray(inv_freq)),
                               backend=backend, rms_eps=cfg.rms_eps)
    return forward
