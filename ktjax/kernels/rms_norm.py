"""RMSNorm: the jnp reference, and on CPU the host kernel (ktjax_rms_norm_f32).

CPU programs use the host kernel because XLA CPU's reduction order follows the array's
shape: a row normalized among 8 rows differed in the last bit from the same row alone, and
greedy output depended on the batch. The host kernel sums each row in order, whatever the
row count."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.host.ffi import register_targets


def rms_norm_reference(x32: jax.Array, w32: jax.Array, eps: float) -> jax.Array:
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w32


def rms_norm_host(x32: jax.Array, w32: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x**2) + eps) * w`` over the last axis, f32, in the host kernel; the
    handler checks shapes and dtypes and names a bad argument."""
    register_targets()
    call = jax.ffi.ffi_call("ktjax_rms_norm_f32", jax.ShapeDtypeStruct(x32.shape, jnp.float32))
    return call(x32, w32, eps=np.float32(eps))  # a numpy scalar: attributes must be static


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, returned in x's dtype. GGUF stores Gemma's (1 + w) already folded
    into `weight`."""
    x32, w32 = x.astype(jnp.float32), weight.astype(jnp.float32)
    y = jax.lax.platform_dependent(x32, w32, cpu=lambda a, b: rms_norm_host(a, b, eps),
                                   default=lambda a, b: rms_norm_reference(a, b, eps))
    return y.astype(x.dtype)
