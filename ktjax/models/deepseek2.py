"""DeepSeek-V2, V2-Lite and V3 (GGUF `deepseek2`): multi-head latent attention (MLA) with an
optional q LoRA, decoupled RoPE dims and YaRN scaling; leading dense layers, then MoE layers
with shared experts and softmax (V2) or sigmoid + score-correction bias (V3) routing, grouped
top-k and a routed scaling factor.

The paged cache holds one latent per token and layer: the normed kv LoRA output and the
rotated RoPE key, kv_lora_rank + rope dims, as a single KV "head" whose first kv_lora_rank
dims double as the values (`cache_spec`: value_dim 0). Attention runs absorbed: W_UK is folded
into the query and W_UV into the output, so no per-token key or value is ever expanded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import weights
from ktjax.errors import UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers, moe
from ktjax.models.base import (AttentionContext, Batch, KVCache, KVCacheSpec, TensorSpec,
                               decoder_forward, gguf_vocab_size)

ARCHITECTURES = ("deepseek2",)


def trunk_layers(f: GGUFFile) -> int:
    """block_count less the multi-token-prediction layers the file declares after the trunk."""
    a = f.architecture
    total, mtp = int(f.get(f"{a}.block_count")), int(f.get(f"{a}.nextn_predict_layers", 0))
    if not 0 <= mtp < total:
        raise UnsupportedModelError(f"{f.path}: {a}.nextn_predict_layers = {mtp} with "
                                    f"{total} blocks (expected 0..{total - 1})")
    return total - mtp


def mtp_tensors(f: GGUFFile, n_layers: int) -> set[str]:
    """The file's tensors of layers past the trunk (multi-token prediction), not loaded."""
    layer_of = (re.match(r"blk\.(\d+)\.", n) for n in f.tensors)
    return {m.string for m in layer_of if m and int(m.group(1)) >= n_layers}


@dataclass(frozen=True)
class Yarn:
    factor: float
    original_context: int
    log_multiplier: float   # 0.1 * mscale_all_dim: the softmax scale grows by (1 + m ln f)^2
    attn_factor: float = 1.0


@dataclass(frozen=True)
class Deepseek2Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    q_lora_rank: int          # 0: a plain q projection (V2-Lite)
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    intermediate_size: int    # the leading dense layers' FFN
    n_dense_layers: int
    rms_eps: float
    rope_base: float
    yarn: Yarn | None
    context_length: int
    split_kv_b: bool          # attn_k_b / attn_v_b (llama.cpp's MLA files) instead of attn_kv_b
    moe: moe.MoeConfig

    @property
    def cache_spec(self) -> KVCacheSpec:
        """One latent "head" per token and layer (kv_lora_rank + rope dims); the values are
        its first kv_lora_rank dims, so none are cached apart."""
        return KVCacheSpec(self.n_layers, 1, self.kv_lora_rank + self.qk_rope_dim, 0)

    @property
    def query_scale(self) -> float:
        scale = (self.qk_nope_dim + self.qk_rope_dim) ** -0.5
        if self.yarn is not None:  # as llama.cpp: mscale^2 on the logits, RoPE left unscaled
            m = self.yarn.attn_factor * (1 + self.yarn.log_multiplier * math.log(self.yarn.factor))
            scale *= m * m
        return scale

    def cache_bytes_per_token(self, itemsize: int) -> tuple[int, int]:
        """(latent cache, expanded per-head keys and values) bytes per token, all layers."""
        latent = self.cache_spec.bytes_per_token(1)
        expanded = self.n_layers * self.n_heads * (self.qk_nope_dim + self.qk_rope_dim +
                                                   self.v_head_dim)
        return latent * itemsize, expanded * itemsize

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Deepseek2Config":
        a = f.architecture
        get = lambda key, *default: f.get(f"{a}.{key}", *default)
        n_layers = trunk_layers(f)
        rope_dim = int(get("rope.dimension_count"))
        # llama.cpp's MLA files describe the latent MQA view in key/value_length and keep the
        # per-head sizes in key/value_length_mla; older files have only the per-head sizes.
        qk_dim = int(get("attention.key_length_mla", None) or get("attention.key_length"))
        v_dim = int(get("attention.value_length_mla", None) or get("attention.value_length"))
        n_dense = int(get("leading_dense_block_count", 0))
        if not 0 <= n_dense < n_layers:
            raise UnsupportedModelError(f"{f.path}: {a}.leading_dense_block_count = {n_dense} "
                                        f"with {n_layers} layers (expected 0..{n_layers - 1})")
        return cls(
            architecture=a, vocab_size=gguf_vocab_size(f), hidden_size=int(get("embedding_length")),
            n_layers=n_layers, n_heads=int(get("attention.head_count")),
            q_lora_rank=int(get("attention.q_lora_rank", 0)),
            kv_lora_rank=int(get("attention.kv_lora_rank")),
            qk_nope_dim=qk_dim - rope_dim, qk_rope_dim=rope_dim, v_head_dim=v_dim,
            intermediate_size=int(get("feed_forward_length")), n_dense_layers=n_dense,
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)), yarn=_yarn(f),
            context_length=int(get("context_length")),
            split_kv_b=f"blk.{n_layers - 1}.attn_k_b.weight" in f.tensors,
            moe=routing_config(f, n_dense))


def _yarn(f: GGUFFile) -> Yarn | None:
    a = f.architecture
    kind = f.get(f"{a}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise UnsupportedModelError(f"{f.path}: {a}.rope.scaling.type = {kind!r} is not "
                                    "supported for deepseek2 (none or yarn)")
    return Yarn(factor=float(f.get(f"{a}.rope.scaling.factor")),
                original_context=int(f.get(f"{a}.rope.scaling.original_context_length")),
                log_multiplier=float(f.get(f"{a}.rope.scaling.yarn_log_multiplier", 0.0)),
                attn_factor=float(f.get(f"{a}.rope.scaling.attn_factor", 1.0)))


def routing_config(f: GGUFFile, n_dense: int, default_gating: int = 1) -> moe.MoeConfig:
    """DeepSeek-style routing from `{arch}.expert_*` (also GLM-4.5's, whose files may leave
    the gating function out: `default_gating`); configs this code cannot run are refused
    with the key that makes them so."""
    a = f.architecture
    get = lambda key, default=None: f.get(f"{a}.{key}", default)

    def refuse(key: str, why: str):
        raise UnsupportedModelError(f"{f.path}: {a}.{key} = {get(key)!r}: {why}")

    n_experts, n_used = int(get("expert_count", 0)), int(get("expert_used_count", 0))
    if n_experts <= 0:
        refuse("expert_count", "deepseek2 needs routed experts")
    if not 0 < n_used <= n_experts:
        refuse("expert_used_count", f"expected 1..{n_experts} (expert_count)")
    gating = moe.GATING_FUNCS.get(int(get("expert_gating_func", 0)) or default_gating)
    if gating is None:
        refuse("expert_gating_func", "only 1 (softmax) and 2 (sigmoid) are supported")
    n_groups, n_groups_used = int(get("expert_group_count", 1) or 1), \
        int(get("expert_group_used_count", 1) or 1)
    if n_experts % n_groups:
        refuse("expert_group_count", f"does not divide the {n_experts} experts")
    if not 0 < n_groups_used <= n_groups:
        refuse("expert_group_used_count", f"expected 1..{n_groups} (expert_group_count)")
    if n_groups > 1 and n_groups_used * (n_experts // n_groups) < n_used:
        refuse("expert_group_used_count", f"its groups hold fewer than {n_used} experts")
    if gating == "sigmoid" and n_groups > 1 and n_experts // n_groups < 2:
        refuse("expert_group_count", "sigmoid routing scores a group by its top 2 experts")
    expert_ffn = int(get("expert_feed_forward_length"))
    n_shared = int(get("expert_shared_count", 0))
    return moe.MoeConfig(
        n_experts=n_experts, n_used=n_used, expert_ffn=expert_ffn,
        norm_topk=bool(get("expert_weights_norm", False)),
        shared_ffn=n_shared * expert_ffn, gating=gating,
        score_bias=f"blk.{n_dense}.exp_probs_b.bias" in f.tensors,
        n_groups=n_groups, n_groups_used=n_groups_used,
        # DeepSeek-V2's group_limited_greedy ranks groups by their best expert, V3's noaux_tc
        # by the sum of their two best (llama.cpp uses the latter for both).
        group_score="max" if gating == "softmax" else "top2",
        weights_scale=float(get("expert_weights_scale", 1.0) or 1.0))


CONFIG = Deepseek2Config


def ignored_tensors(cfg: Deepseek2Config, f: GGUFFile) -> set[str]:
    """DeepSeek-V3's multi-token-prediction layer (blk.{n_layers}.*, with its nextn.*
    tensors) serves speculative decoding only: knowingly not loaded."""
    return mtp_tensors(f, cfg.n_layers)


def tensor_table(cfg: Deepseek2Config) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table. Layers 0..n_dense-1 form the stack "dense" (dense
    FFN), the rest the stack "layers" (MoE); both have the attention tensors."""
    h, n_heads, r = cfg.hidden_size, cfg.n_heads, cfg.kv_lora_rank
    qk = cfg.qk_nope_dim + cfg.qk_rope_dim
    attn = {
        "attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "attn_kv_a_mqa": TensorSpec("blk.{}.attn_kv_a_mqa.weight", (r + cfg.qk_rope_dim, h)),
        "attn_kv_a_norm": TensorSpec("blk.{}.attn_kv_a_norm.weight", (r,)),
        "attn_output": TensorSpec("blk.{}.attn_output.weight", (h, n_heads * cfg.v_head_dim)),
        "ffn_norm": TensorSpec("blk.{}.ffn_norm.weight", (h,)),
    }
    if cfg.q_lora_rank:
        q = cfg.q_lora_rank
        attn["attn_q_a"] = TensorSpec("blk.{}.attn_q_a.weight", (q, h))
        attn["attn_q_a_norm"] = TensorSpec("blk.{}.attn_q_a_norm.weight", (q,))
        attn["attn_q_b"] = TensorSpec("blk.{}.attn_q_b.weight", (n_heads * qk, q))
    else:
        attn["attn_q"] = TensorSpec("blk.{}.attn_q.weight", (n_heads * qk, h))
    # The up-projections are absorbed into the queries and outputs per head, in XLA.
    if cfg.split_kv_b:
        attn["attn_k_b"] = TensorSpec("blk.{}.attn_k_b.weight", (n_heads, r, cfg.qk_nope_dim),
                                      kind="per_head")
        attn["attn_v_b"] = TensorSpec("blk.{}.attn_v_b.weight", (n_heads, cfg.v_head_dim, r),
                                      kind="per_head")
    else:
        attn["attn_kv_b"] = TensorSpec("blk.{}.attn_kv_b.weight",
                                       (n_heads * (cfg.qk_nope_dim + cfg.v_head_dim), r),
                                       kind="per_head")
    return moe.leading_dense_table(attn, cfg.moe, h, cfg.intermediate_size, cfg.vocab_size,
                                   cfg.n_dense_layers, cfg.n_layers)


def yarn_inv_freq(dim: int, base: float, yarn: Yarn | None) -> np.ndarray:
    """RoPE inverse frequencies [dim // 2], YaRN-blended when the file declares it."""
    if yarn is None:
        return layers.rope_inv_freq(dim, base)
    return layers.yarn_inv_freq(dim, base, yarn.factor, yarn.original_context)


def _up_projections(cfg: Deepseek2Config, lp: dict):
    """W_UK [H, r, nope] and W_UV [H, v, r] (for per_head_linear) from attn_kv_b or
    llama.cpp's split k_b/v_b."""
    if cfg.split_kv_b:
        return lp["attn_k_b"], lp["attn_v_b"]
    kv_b = weights.as_array(lp["attn_kv_b"]).reshape(cfg.n_heads,
                                                     cfg.qk_nope_dim + cfg.v_head_dim, -1)
    return jnp.swapaxes(kv_b[:, :cfg.qk_nope_dim], 1, 2), kv_b[:, cfg.qk_nope_dim:]


def _attention(cfg: Deepseek2Config, inv_freq: jax.Array, lp: dict, x: jax.Array,
               ctx: AttentionContext) -> tuple[jax.Array, jax.Array]:
    """Absorbed MLA: (attention output [B, T, H], this step's latents [B, T, 1, r + rope])."""
    b, t, _ = x.shape
    r, pos = cfg.kv_lora_rank, ctx.batch.positions
    h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    if cfg.q_lora_rank:
        q_a = layers.rms_norm(weights.linear(lp["attn_q_a"], h), lp["attn_q_a_norm"],
                              cfg.rms_eps)
        q = weights.linear(lp["attn_q_b"], q_a)
    else:
        q = weights.linear(lp["attn_q"], h)
    q = q.reshape(b, t, cfg.n_heads, -1)
    q_nope, q_pe = q[..., :cfg.qk_nope_dim], q[..., cfg.qk_nope_dim:]
    kv = weights.linear(lp["attn_kv_a_mqa"], h)
    latent = layers.rms_norm(kv[..., :r], lp["attn_kv_a_norm"], cfg.rms_eps)
    # DeepSeek rotates adjacent pairs (llama.cpp's rope type NORM); the converter keeps them.
    q_pe = layers.apply_rope(q_pe, pos, inv_freq, neox=False)
    k_pe = layers.apply_rope(kv[:, :, None, r:], pos, inv_freq, neox=False)
    w_uk, w_uv = _up_projections(cfg, lp)
    q_latent = weights.per_head_linear(w_uk, q_nope).astype(x.dtype)
    k_latent = jnp.concatenate([latent[:, :, None], k_pe], axis=-1)      # [B, T, 1, r + rope]
    o = ctx.attend(jnp.concatenate([q_latent, q_pe], axis=-1), k_latent, None,
                   scale=cfg.query_scale, values_in_keys=r)                # [B, T, H, r]
    o = weights.per_head_linear(w_uv, o).astype(x.dtype)
    return weights.linear(lp["attn_output"], o.reshape(b, t, -1)), k_latent


def _block(cfg: Deepseek2Config, inv_freq: jax.Array, routed: bool, lp: dict, x: jax.Array,
           layer: jax.Array, ctx: AttentionContext):
    a, k_latent = _attention(cfg, inv_freq, lp, x, ctx)
    x = x + a
    h = layers.rms_norm(x, lp["ffn_norm"], cfg.rms_eps)
    if routed:
        y = moe.moe_ffn(cfg.moe, lp, h)
    else:
        gate, up = weights.project(lp, ("ffn_gate", "ffn_up"), h)
        y = weights.linear(lp["ffn_down"], jax.nn.silu(gate) * up)
    no_values = jnp.zeros((*k_latent.shape[:-1], 0), k_latent.dtype)
    return x + y, (k_latent, no_values)


def make_forward(cfg: Deepseek2Config, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config."""
    inv_freq = yarn_inv_freq(cfg.qk_rope_dim, cfg.rope_base, cfg.yarn)
    stacks = moe.leading_dense_stacks(cfg.n_dense_layers)

    def forward(params: dict, kv: KVCache, batch: Batch):
        freq = jnp.asarray(inv_freq)
        return decoder_forward(params, kv, batch, block=None, backend=backend,
                               rms_eps=cfg.rms_eps,
                               stacks=[(key, partial(_block, cfg, freq, routed))
                                       for key, routed in stacks])
    return forward
