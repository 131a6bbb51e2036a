"""Gemma 3: interleaved sliding-window (local) and global layers with their own rope bases,
q/k RMSNorm, GeGLU, pre- and post-norms around attention and MLP, sqrt(hidden) embedding scale.
GGUF stores Gemma's (1 + w) norm weights with the 1 already added, so plain RMSNorm applies."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ktjax import weights
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers
from ktjax.models.base import (AttentionContext, Batch, GqaConfig, KVCache, TensorSpec,
                               decoder_forward)

ARCHITECTURES = ("gemma3",)

# llama.cpp's constants for Gemma 3: every 6th layer is global; local layers use base 10000.
SLIDING_WINDOW_PATTERN = 6
LOCAL_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class Gemma3Config(GqaConfig):
    rope_global_base: float
    rope_global_linear_factor: float
    sliding_window: int

    @property
    def query_scale(self) -> float:
        # Gemma 3 27B scales by hidden/heads; the other sizes by head_dim (query_pre_attn_scalar).
        if self.n_layers == 62:
            return (self.hidden_size / self.n_heads) ** -0.5
        return self.head_dim ** -0.5

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Gemma3Config":
        a = f.architecture
        return cls(
            **GqaConfig.gguf_fields(f),
            rope_global_base=float(f.get(f"{a}.rope.freq_base", 1_000_000.0)),
            # Gemma 3 scales its global layers linearly; other scalings are refused.
            rope_global_linear_factor=layers.RopeScaling.from_gguf(f, ("none", "linear")).factor,
            sliding_window=int(f.get(f"{a}.attention.sliding_window")),
        )


CONFIG = Gemma3Config


def tensor_table(cfg: Gemma3Config) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table: parameter path -> tensor name and shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, ff = cfg.n_heads * d, cfg.n_kv_heads * d, cfg.intermediate_size
    return {
        "token_embd": TensorSpec("token_embd.weight", (cfg.vocab_size, h), kind="embedding"),
        "output_norm": TensorSpec("output_norm.weight", (h,)),
        "output": TensorSpec("output.weight", (cfg.vocab_size, h), optional=True),
        "layers.attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "layers.attn_q": TensorSpec("blk.{}.attn_q.weight", (hq, h)),
        "layers.attn_k": TensorSpec("blk.{}.attn_k.weight", (hkv, h)),
        "layers.attn_v": TensorSpec("blk.{}.attn_v.weight", (hkv, h)),
        "layers.attn_q_norm": TensorSpec("blk.{}.attn_q_norm.weight", (d,)),
        "layers.attn_k_norm": TensorSpec("blk.{}.attn_k_norm.weight", (d,)),
        "layers.attn_output": TensorSpec("blk.{}.attn_output.weight", (h, hq)),
        "layers.post_attention_norm": TensorSpec("blk.{}.post_attention_norm.weight", (h,)),
        "layers.ffn_norm": TensorSpec("blk.{}.ffn_norm.weight", (h,)),
        "layers.ffn_gate": TensorSpec("blk.{}.ffn_gate.weight", (ff, h)),
        "layers.ffn_up": TensorSpec("blk.{}.ffn_up.weight", (ff, h)),
        "layers.ffn_down": TensorSpec("blk.{}.ffn_down.weight", (h, ff)),
        "layers.post_ffw_norm": TensorSpec("blk.{}.post_ffw_norm.weight", (h,)),
    }


def _block(cfg: Gemma3Config, inv_local: jax.Array, inv_global: jax.Array, lp: dict,
           x: jax.Array, layer: jax.Array, ctx: AttentionContext):
    b, t, _ = x.shape
    is_global = layer % SLIDING_WINDOW_PATTERN == SLIDING_WINDOW_PATTERN - 1
    inv_freq = jnp.where(is_global, inv_global, inv_local)
    window = jnp.where(is_global, 0, cfg.sliding_window)

    h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q, k, v = weights.project(lp, ("attn_q", "attn_k", "attn_v"), h)
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = layers.apply_rope(layers.rms_norm(q, lp["attn_q_norm"], cfg.rms_eps),
                          ctx.batch.positions, inv_freq, neox=True)
    k = layers.apply_rope(layers.rms_norm(k, lp["attn_k_norm"], cfg.rms_eps),
                          ctx.batch.positions, inv_freq, neox=True)
    a = ctx.attend(q, k, v, scale=cfg.query_scale, sliding_window=window)
    a = weights.linear(lp["attn_output"], a.reshape(b, t, -1))
    x = x + layers.rms_norm(a, lp["post_attention_norm"], cfg.rms_eps)

    h = layers.rms_norm(x, lp["ffn_norm"], cfg.rms_eps)
    gate, up = weights.project(lp, ("ffn_gate", "ffn_up"), h)
    g = layers.gelu_tanh(gate) * up
    m = weights.linear(lp["ffn_down"], g)
    return x + layers.rms_norm(m, lp["post_ffw_norm"], cfg.rms_eps), (k, v)


def make_forward(cfg: Gemma3Config, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config."""
    # numpy here, constants of the trace below: jnp.asarray outside a trace compiles a
    # program (0.1 s of a start from artifacts, which traces nothing)
    inv_local = layers.rope_inv_freq(cfg.head_dim, LOCAL_ROPE_BASE)
    inv_global = layers.rope_inv_freq(cfg.head_dim, cfg.rope_global_base,
                                      cfg.rope_global_linear_factor)

    def forward(params: dict, kv: KVCache, batch: Batch):
        return decoder_forward(params, kv, batch,
                               block=partial(_block, cfg, jnp.asarray(inv_local),
                                             jnp.asarray(inv_global)),
                               backend=backend, rms_eps=cfg.rms_eps,
                               embed_scale=cfg.hidden_size ** 0.5)
    return forward
