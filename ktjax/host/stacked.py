"""`ktjax_stacked_matvec`: few-row matmuls against one layer of a stacked float weight, read in
place by the host kernel (no per-layer copy of the slice, which XLA makes inside a scan)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.host.ffi import register_targets


def stacked_matvec(x: jax.Array, stack: jax.Array, layer: jax.Array) -> jax.Array:
    """y [M, G, N] = x [M, G, K] . stack[layer] ([L, G, N, K], float32 or bfloat16) over K."""
    register_targets()
    m, g, _ = x.shape
    call = jax.ffi.ffi_call("ktjax_stacked_matvec",
                            jax.ShapeDtypeStruct((m, g, stack.shape[2]), jnp.float32))
    return call(x.astype(jnp.float32), stack, jnp.asarray(layer, jnp.int32))
