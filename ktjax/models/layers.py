"""Building blocks shared by the model families: pure functions over arrays (the calls on
weights, which depend on where a weight lives, are in ktjax.weights)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kernels.rms_norm import rms_norm  # noqa: F401  (re-exported for the families)


def rope_inv_freq(rotary_dim: int, base: float, linear_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2]; `linear_factor` stretches positions."""
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    return (inv / linear_factor).astype(np.float32)


# YaRN's ramp bounds (rotations): llama.cpp's and transformers' defaults.
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
ROPE_SCALINGS = ("none", "linear", "yarn")


def yarn_inv_freq(dim: int, base: float, factor: float, original_context: int,
                  beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW
                  ) -> np.ndarray:
    """YaRN's inverse frequencies [dim // 2]: interpolated (divided by `factor`) and original
    frequencies blended over a ramp of dimensions, as ggml's rope_yarn (its correction range
    truncated to whole dimensions, transformers' `truncate`)."""
    extrapolated = rope_inv_freq(dim, base).astype(np.float64)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    keep = 1.0 - ramp   # 1: original frequency (fast dims), 0: interpolated (slow dims)
    return (extrapolated / factor * (1 - keep) + extrapolated * keep).astype(np.float32)


@dataclass(frozen=True)
class RopeScaling:
    """A GGUF file's `{arch}.rope.scaling.*` as llama.cpp reads it for the GQA families."""

    kind: str = "none"          # ROPE_SCALINGS
    factor: float = 1.0
    original_context: int = 0
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    attn_factor: float = 1.0    # rope.scaling.attn_factor
    yarn_log_multiplier: float = 0.0

    @classmethod
    def from_gguf(cls, f, allowed: tuple[str, ...] = ROPE_SCALINGS) -> "RopeScaling":
        """Reads the keys; a scaling type outside `allowed` is an UnsupportedModelError.
        llama.cpp's default type is linear, which without a factor changes nothing."""
        from ktjax.errors import UnsupportedModelError

        a = f.architecture
        get = lambda key, default: f.get(f"{a}.rope.scaling.{key}", default)
        kind = get("type", "none")
        factor = float(get("factor", None) or f.get(f"{a}.rope.scale_linear", None) or 1.0)
        if kind not in allowed:
            raise UnsupportedModelError(f"{a}.rope.scaling.type = {kind!r} is not supported "
                                        f"(supported: {', '.join(allowed)})")
        if kind == "linear" and factor == 1.0:
            kind = "none"
        return cls(kind=kind, factor=factor,
                   original_context=int(get("original_context_length", None) or
                                        f.get(f"{a}.context_length")),
                   beta_fast=float(get("yarn_beta_fast", YARN_BETA_FAST)),
                   beta_slow=float(get("yarn_beta_slow", YARN_BETA_SLOW)),
                   attn_factor=float(get("attn_factor", 1.0)),
                   yarn_log_multiplier=float(get("yarn_log_multiplier", 0.0)))

    def inv_freq(self, dim: int, base: float) -> np.ndarray:
        if self.kind == "yarn":
            return yarn_inv_freq(dim, base, self.factor, self.original_context,
                                 self.beta_fast, self.beta_slow)
        return rope_inv_freq(dim, base, self.factor if self.kind == "linear" else 1.0)

    @property
    def mscale(self) -> float:
        """What llama.cpp multiplies cos and sin by (llama_context's yarn_attn_factor times
        rope_yarn's 1 + 0.1 ln factor): transformers' YaRN attention_factor."""
        if self.kind != "yarn":
            return self.attn_factor

        def get_mscale(m: float) -> float:  # llama_context's, m = transformers' mscale
            return 1.0 if self.factor <= 1.0 else 0.1 * m * math.log(self.factor) + 1.0

        # yarn_log_multiplier holds mscale_all_dim (deepseek2 has its own reading)
        m = get_mscale(1.0)
        if self.yarn_log_multiplier:
            m /= get_mscale(self.yarn_log_multiplier)
        return self.attn_factor * m


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool,
               mscale: float = 1.0) -> jax.Array:
    """Rotary embedding of x [B, T, heads, hd] at positions [B, T].

    neox=True rotates the two halves of the head (GPT-NeoX / HF layout: qwen2/3, gemma3);
    neox=False rotates adjacent pairs (llama.cpp's layout for `llama`, whose q/k weights the
    converter permuted). Dimensions past 2 * len(inv_freq) pass through; `mscale` (YaRN)
    scales the rotated ones.
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, T, rot/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    xr = x[..., :rot].astype(jnp.float32)
    if neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), x[..., rot:]], axis=-1)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)
