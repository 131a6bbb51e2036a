"""The llama family: `llama` (Llama 2/3, SmolLM2, Mistral), `qwen2` (q/k/v bias), `qwen3`
(q/k RMSNorm). GQA, RoPE with llama3-style frequency factors (GGUF tensor rope_freqs) or
linear scaling, tied or separate output head."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ktjax.errors import UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import AttentionBackend
from ktjax.models import layers
from ktjax.models.base import AttentionContext, Batch, KVCache, TensorSpec, decoder_forward

ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_linear_factor: float
    context_length: int

    @property
    def rope_neox(self) -> bool:
        # llama.cpp's converter permutes llama q/k into adjacent-pair rotation; qwen keeps NeoX.
        return self.architecture != "llama"

    @property
    def attn_bias(self) -> bool:
        return self.architecture == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.architecture == "qwen3"

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "LlamaConfig":
        a = f.architecture
        if int(f.get(f"{a}.expert_count", 0)) > 0:
            raise UnsupportedModelError(
                f"{a} with {f.get(f'{a}.expert_count')} experts (mixture-of-experts) is not "
                "supported yet")
        hidden = int(f.get(f"{a}.embedding_length"))
        n_heads = int(f.get(f"{a}.attention.head_count"))
        head_dim = int(f.get(f"{a}.attention.key_length", hidden // n_heads))
        scaling = f.get(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(f"{a}.rope.scaling.type = {scaling!r} is not supported")
        vocab = f.get(f"{a}.vocab_size", None) or len(f.get("tokenizer.ggml.tokens", [])) \
            or f.tensors["token_embd.weight"].shape[0]
        return cls(
            architecture=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            n_layers=int(f.get(f"{a}.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(f.get(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            intermediate_size=int(f.get(f"{a}.feed_forward_length")),
            rms_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_base=float(f.get(f"{a}.rope.freq_base", 10000.0)),
            rope_dim=int(f.get(f"{a}.rope.dimension_count", head_dim)),
            rope_linear_factor=float(f.get(f"{a}.rope.scaling.factor", 1.0))
            if scaling == "linear" else 1.0,
            context_length=int(f.get(f"{a}.context_length")),
        )


CONFIG = LlamaConfig


def tensor_table(cfg: LlamaConfig) -> dict[str, TensorSpec]:
    """The family's one GGUF-name table: parameter path -> tensor name and shape."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.n_heads * cfg.head_dim, \
        cfg.n_kv_heads * cfg.head_dim
    t = {
        "token_embd": TensorSpec("token_embd.weight", (cfg.vocab_size, h)),
        "output_norm": TensorSpec("output_norm.weight", (h,)),
        "output": TensorSpec("output.weight", (cfg.vocab_size, h), optional=True),
        "rope_freqs": TensorSpec("rope_freqs.weight", (cfg.rope_dim // 2,), optional=True),
        "layers.attn_norm": TensorSpec("blk.{}.attn_norm.weight", (h,)),
        "layers.attn_q": TensorSpec("blk.{}.attn_q.weight", (hq, h)),
        "layers.attn_k": TensorSpec("blk.{}.attn_k.weight", (hkv, h)),
        "layers.attn_v": TensorSpec("blk.{}.attn_v.weight", (hkv, h)),
        "layers.attn_output": TensorSpec("blk.{}.attn_output.weight", (h, hq)),
        "layers.ffn_norm": TensorSpec("blk.{}.ffn_norm.weight", (h,)),
        "layers.ffn_gate": TensorSpec("blk.{}.ffn_gate.weight", (cfg.intermediate_size, h)),
        "layers.ffn_up": TensorSpec("blk.{}.ffn_up.weight", (cfg.intermediate_size, h)),
        "layers.ffn_down": TensorSpec("blk.{}.ffn_down.weight", (h, cfg.intermediate_size)),
    }
    if cfg.attn_bias:
        t["layers.attn_q_bias"] = TensorSpec("blk.{}.attn_q.bias", (hq,))
        t["layers.attn_k_bias"] = TensorSpec("blk.{}.attn_k.bias", (hkv,))
        t["layers.attn_v_bias"] = TensorSpec("blk.{}.attn_v.bias", (hkv,))
    if cfg.qk_norm:
        t["layers.attn_q_norm"] = TensorSpec("blk.{}.attn_q_norm.weight", (d,))
        t["layers.attn_k_norm"] = TensorSpec("blk.{}.attn_k_norm.weight", (d,))
    return t


def _block(cfg: LlamaConfig, inv_freq: jax.Array, lp: dict, x: jax.Array, layer: jax.Array,
           ctx: AttentionContext):
    b, t, _ = x.shape
    pos = ctx.batch.positions
    h = layers.rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    q = layers.linear(h, lp["attn_q"], lp.get("attn_q_bias")).reshape(b, t, cfg.n_heads, -1)
    k = layers.linear(h, lp["attn_k"], lp.get("attn_k_bias")).reshape(b, t, cfg.n_kv_heads, -1)
    v = layers.linear(h, lp["attn_v"], lp.get("attn_v_bias")).reshape(b, t, cfg.n_kv_heads, -1)
    if cfg.qk_norm:
        q = layers.rms_norm(q, lp["attn_q_norm"], cfg.rms_eps)
        k = layers.rms_norm(k, lp["attn_k_norm"], cfg.rms_eps)
    q = layers.apply_rope(q, pos, inv_freq, cfg.rope_neox)
    k = layers.apply_rope(k, pos, inv_freq, cfg.rope_neox)
    a = ctx.attend(q, k, v, scale=cfg.head_dim ** -0.5)
    x = x + layers.linear(a.reshape(b, t, -1), lp["attn_output"])
    h = layers.rms_norm(x, lp["ffn_norm"], cfg.rms_eps)
    g = jax.nn.silu(layers.linear(h, lp["ffn_gate"])) * layers.linear(h, lp["ffn_up"])
    return x + layers.linear(g, lp["ffn_down"]), (k, v)


def make_forward(cfg: LlamaConfig, backend: AttentionBackend):
    """forward(params, kv, batch) -> (logits [B, R, V], kv) for this config."""
    base_inv_freq = layers.rope_inv_freq(cfg.rope_dim, cfg.rope_base, cfg.rope_linear_factor)

    def forward(params: dict, kv: KVCache, batch: Batch):
        inv_freq = jnp.asarray(base_inv_freq)
        if "rope_freqs" in params:  # llama3-style scaling: per-frequency divisors
            inv_freq = inv_freq / params["rope_freqs"].astype(jnp.float32)
        return decoder_forward(params, kv, batch, block=partial(_block, cfg, inv_freq),
                               backend=backend, rms_eps=cfg.rms_eps)
    return forward
