"""Paged attention for CPU programs: the native host kernel (`ktjax_paged_attention`, XLA FFI)
for every step, decode and prefill chunks alike.

The kernel reads the layer's pages where they lie; the reference gathers every page of the
bucket into a copy per layer, which on a CPU costs more than the attention arithmetic. One
kernel for every step size also keeps a row's result independent of the batch: its keys are
folded in an order fixed by its own positions (cpu_kernels/attention), where the reference's
XLA reductions run over the bucket's padded length, and a switch between the two by chunk
size made a prompt's output depend on the other prompts of its step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.errors import KernelError
from ktjax.host.ffi import register_targets
from ktjax.kernels import kv_quant


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array | None,
                    k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                    block_tables: jax.Array, cache_lens: jax.Array, q_positions: jax.Array, *,
                    scale: float, sliding_window: jax.Array | int | None = None,
                    values_in_keys: int | None = None,
                    sinks: jax.Array | None = None) -> jax.Array:
    """paged_attention_ref.paged_attention's contract, run by the host kernel (float32 or
    bfloat16 pages; int8 pages are refused); `sinks` [H] as the reference takes them."""
    if kv_quant.is_int8(k_cache):
        raise KernelError("the host attention kernel reads float32 or bfloat16 KV pages, not "
                          "int8 (kv_cache_dtype int8 needs attention 'reference' or 'pallas')")
    register_targets()
    b, t, h, _ = q.shape
    value_dim = values_in_keys or v_cache.shape[-1]
    f32 = jnp.float32
    k_new = k_new.astype(f32)
    v_new = k_new if v_new is None else v_new.astype(f32)
    window = jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32)
    sink_logits = jnp.zeros((0,), f32) if sinks is None else jnp.asarray(sinks, f32)
    call = jax.ffi.ffi_call("ktjax_paged_attention",
                            jax.ShapeDtypeStruct((b, t, h, value_dim), f32))
    out = call(q.astype(f32), k_new, v_new, k_cache, v_cache,
               jnp.asarray(layer, jnp.int32), block_tables.astype(jnp.int32),
               cache_lens.astype(jnp.int32), q_positions.astype(jnp.int32), window, sink_logits,
               scale=np.float32(scale), values_in_keys=np.int64(values_in_keys or 0))
    return out.astype(q.dtype)
