"""Building blocks shared by the model families: pure functions over arrays (the calls on
weights, which depend on where a weight lives, are in ktjax.weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kernels.rms_norm import rms_norm  # noqa: F401  (re-exported for the families)


def rope_inv_freq(rotary_dim: int, base: float, linear_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2]; `linear_factor` stretches positions."""
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    return (inv / linear_factor).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool) -> jax.Array:
    """Rotary embedding of x [B, T, heads, hd] at positions [B, T].

    neox=True rotates the two halves of the head (GPT-NeoX / HF layout: qwen2/3, gemma3);
    neox=False rotates adjacent pairs (llama.cpp's layout for `llama`, whose q/k weights the
    converter permuted). Dimensions past 2 * len(inv_freq) pass through.
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, T, rot/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
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
