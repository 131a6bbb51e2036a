"""Mixture-of-experts feed-forward shared by the MoE families: routing in XLA (softmax or
sigmoid scores, optional score-correction bias and group-limited top-k, as DeepSeek), the
routed experts through `weights.experts` (grouped matmuls on the device or the host MoE
kernel, as placed), optional shared expert with a sigmoid gate."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ktjax import weights
from ktjax.errors import UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.models.base import TensorSpec

# The routed experts' table keys (gate, up, down; kind "experts"); the loader makes of the
# three one expert set (weights.HostExperts or DeviceExperts) under EXPERTS.
EXPERT_KEYS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
EXPERTS = "ffn_exps"

# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values; files from before the key are softmax.
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}


@dataclass(frozen=True)
class MoeConfig:
    n_experts: int
    n_used: int
    expert_ffn: int
    norm_topk: bool           # renormalize the k selected weights to sum to 1
    shared_ffn: int = 0       # 0: no shared expert
    shared_gate: bool = False  # qwen2moe: sigmoid(h . w) scales the shared expert
    gating: str = "softmax"    # or "sigmoid" (DeepSeek-V3)
    score_bias: bool = False   # exp_probs_b: added to the scores for selection only
    n_groups: int = 1          # group-limited top-k: experts only from the best groups
    n_groups_used: int = 1
    group_score: str = "top2"  # a group's score: sum of its top-2 scores (V3) or "max" (V2)
    weights_scale: float = 1.0  # routed scaling factor

    @classmethod
    def from_gguf(cls, f: GGUFFile, *, default_ffn: int, norm_topk: bool,
                  shared: bool = False) -> "MoeConfig":
        """Reads `{arch}.expert_*`; refuses routing this module does not implement."""
        a = f.architecture
        n_experts = int(f.get(f"{a}.expert_count"))
        n_used = int(f.get(f"{a}.expert_used_count", 0))
        if not 0 < n_used <= n_experts:
            raise UnsupportedModelError(
                f"{f.path}: {a}.expert_used_count = {n_used} with {n_experts} experts "
                "(expected 1..expert_count)")
        gating = int(f.get(f"{a}.expert_gating_func", 1))
        if GATING_FUNCS.get(gating) != "softmax":
            raise UnsupportedModelError(
                f"{f.path}: {a}.expert_gating_func = {gating} "
                f"({GATING_FUNCS.get(gating, 'unknown')}) is not supported for {a}; "
                "only softmax routing")
        for key in ("expert_group_count", "expert_weights_scale"):
            value = f.get(f"{a}.{key}", None)
            if value not in (None, 0, 1, 1.0):
                raise UnsupportedModelError(
                    f"{f.path}: {a}.{key} = {value} is not supported for {a}")
        return cls(
            n_experts=n_experts, n_used=n_used,
            expert_ffn=int(f.get(f"{a}.expert_feed_forward_length", default_ffn)),
            norm_topk=bool(f.get(f"{a}.expert_weights_norm", norm_topk)),
            shared_ffn=int(f.get(f"{a}.expert_shared_feed_forward_length", 0)) if shared else 0,
            shared_gate=shared)


def tensor_table(cfg: MoeConfig, hidden: int) -> dict[str, TensorSpec]:
    """Router, routed experts (GGUF `ffn_*_exps`, [E, out, in]) and the shared expert."""
    e, ff = cfg.n_experts, cfg.expert_ffn
    t = {
        "layers.ffn_gate_inp": TensorSpec("blk.{}.ffn_gate_inp.weight", (e, hidden)),
        "layers.ffn_gate_exps": TensorSpec("blk.{}.ffn_gate_exps.weight", (e, ff, hidden),
                                           kind="experts"),
        "layers.ffn_up_exps": TensorSpec("blk.{}.ffn_up_exps.weight", (e, ff, hidden),
                                         kind="experts"),
        "layers.ffn_down_exps": TensorSpec("blk.{}.ffn_down_exps.weight", (e, hidden, ff),
                                           kind="experts"),
    }
    if cfg.shared_ffn:
        s = cfg.shared_ffn
        t["layers.ffn_gate_shexp"] = TensorSpec("blk.{}.ffn_gate_shexp.weight", (s, hidden))
        t["layers.ffn_up_shexp"] = TensorSpec("blk.{}.ffn_up_shexp.weight", (s, hidden))
        t["layers.ffn_down_shexp"] = TensorSpec("blk.{}.ffn_down_shexp.weight", (hidden, s))
    if cfg.score_bias:
        t["layers.exp_probs_b"] = TensorSpec("blk.{}.exp_probs_b.bias", (e,))
    if cfg.shared_gate:
        t["layers.ffn_gate_inp_shexp"] = TensorSpec("blk.{}.ffn_gate_inp_shexp.weight", (hidden,))
    return t


def _sum_last(x: jax.Array) -> jax.Array:
    """Sum over the last axis in one fixed order (a pairwise tree of element-wise adds, the
    last element of an associative scan), keepdims. XLA's reduce picks its order by the
    array's shape, so a token's routing weights differed in the last bit between batches."""
    return jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 1)[..., -1:]


def _exp_nonpositive(x: jax.Array) -> jax.Array:
    """e^x for x <= 0 in plain float arithmetic (the host attention kernel's formula: 2^n e^r,
    |r| <= ln2 / 2, degree-6 Taylor polynomial, relative error < 2e-7; 0 below -87). XLA
    CPU's exp gave an element other last bits depending on the array's size."""
    x = jnp.maximum(x, -87.0)
    n = jnp.round(x * 1.44269504)
    r = x - n * 0.693145752 - n * 1.42860677e-6
    p = r * (1.0 / 720) + (1.0 / 120)
    for c in (1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + c
    scaled = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(p, jnp.int32) + (n.astype(jnp.int32) << 23), jnp.float32)
    return jnp.where(x > -87.0, scaled, 0.0)


def _softmax(x: jax.Array) -> jax.Array:
    e = _exp_nonpositive(x - jnp.max(x, axis=-1, keepdims=True))  # max: exact in any order
    return e / _sum_last(e)


def route(h: jax.Array, router, cfg: MoeConfig,
          bias: jax.Array | None = None) -> weights.Route:
    """Scores over all experts, top-k: ids int32 [N, k] and weights float32 [N, k].

    `bias` and the group limit change which experts are chosen, not their weights: the weights
    are the chosen experts' scores, optionally renormalized, times `weights_scale`."""
    logits = weights.linear(router, h).astype(jnp.float32)
    scores = _softmax(logits) if cfg.gating == "softmax" else \
        jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if cfg.n_groups > 1:
        groups = choice.reshape(*choice.shape[:-1], cfg.n_groups, -1)
        group_scores = groups.max(-1) if cfg.group_score == "max" else \
            jax.lax.top_k(groups, 2)[0].sum(-1)
        _, best = jax.lax.top_k(group_scores, cfg.n_groups_used)
        keep = jnp.any(best[..., None] == jnp.arange(cfg.n_groups), axis=-2)   # [N, groups]
        choice = jnp.where(jnp.repeat(keep, groups.shape[-1], axis=-1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.n_used)
    chosen = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk:
        chosen = chosen / _sum_last(chosen)
    if cfg.weights_scale != 1.0:
        chosen = chosen * cfg.weights_scale
    return weights.Route(ids.astype(jnp.int32), chosen)


def moe_ffn(cfg: MoeConfig, lp: dict, h: jax.Array) -> jax.Array:
    """The MoE feed-forward of one layer on normed hidden states h [B, T, H]."""
    b, t, hidden = h.shape
    x = h.reshape(b * t, hidden)
    chosen = route(x, lp["ffn_gate_inp"], cfg, lp.get("exp_probs_b"))

    def shared(x: jax.Array) -> jax.Array:
        s = weights.linear(lp["ffn_down_shexp"],
                           jax.nn.silu(weights.linear(lp["ffn_gate_shexp"], x)) *
                           weights.linear(lp["ffn_up_shexp"], x))
        if cfg.shared_gate:
            gate = _sum_last(x.astype(jnp.float32) * lp["ffn_gate_inp_shexp"].astype(jnp.float32))
            s = s * jax.nn.sigmoid(gate)
        return s

    # routed + shared; host experts in GPU programs run while the device computes `shared`
    y = weights.experts_plus(lp[EXPERTS], x, chosen, shared if cfg.shared_ffn else None)
    return y.reshape(b, t, hidden).astype(h.dtype)


def leading_dense_stacks(n_dense: int) -> list[tuple[str, bool]]:
    """(params key, routed) of each stack in leading_dense_table's layout, in layer order."""
    return [("layers", True)] if n_dense == 0 else [("dense", False), ("layers", True)]


def leading_dense_table(attn: dict[str, TensorSpec], cfg: MoeConfig, hidden: int, ffn: int,
                        vocab: int, n_dense: int, n_layers: int) -> dict[str, TensorSpec]:
    """The tensor table of a model whose first `n_dense` layers have a dense FFN (stack
    "dense") and the rest routed experts (stack "layers"), both with the `attn` tensors
    (keys without a stack prefix), as DeepSeek and GLM-4.5 files lay them out."""
    dense = dict(attn, ffn_gate=TensorSpec("blk.{}.ffn_gate.weight", (ffn, hidden)),
                 ffn_up=TensorSpec("blk.{}.ffn_up.weight", (ffn, hidden)),
                 ffn_down=TensorSpec("blk.{}.ffn_down.weight", (hidden, ffn)))
    routed = dict(attn, **{k.split(".", 1)[1]: v for k, v in tensor_table(cfg, hidden).items()})
    t = {
        "token_embd": TensorSpec("token_embd.weight", (vocab, hidden), kind="embedding"),
        "output_norm": TensorSpec("output_norm.weight", (hidden,)),
        "output": TensorSpec("output.weight", (vocab, hidden), optional=True),
    }
    for stack, specs, span in (("dense", dense, (0, n_dense)),
                               ("layers", routed, (n_dense, n_layers))):
        if span[0] < span[1]:
            t.update({f"{stack}.{k}": dataclasses.replace(v, layer_range=span)
                      for k, v in specs.items()})
    return t
