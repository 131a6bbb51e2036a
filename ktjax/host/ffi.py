"""Registers the native XLA FFI targets (CPU handlers, and the CUDA bridge of the layered host
targets for GPU programs) and wraps rms_norm as a jnp-facing function."""

from __future__ import annotations

import threading

import jax
import numpy as np

from ktjax import _native

_lock = threading.Lock()
_registered = False


def register_targets() -> None:
    """Registers, once, every handler of ``_native.ffi_targets()`` for the CPU platform and of
    ``_native.cuda_ffi_targets()`` (host kernels called from GPU programs) for CUDA."""
    global _registered
    with _lock:
        if _registered:
            return
        for name, capsule in _native.ffi_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        for name, capsule in _native.cuda_ffi_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis on the host CPU: ``x / sqrt(mean(x**2) + eps) * w``.

    x: f32[..., H], w: f32[H]. Shapes and dtypes are checked by the native handler, which
    raises (as XlaRuntimeError / JaxRuntimeError) a message naming the bad argument.
    """
    register_targets()
    call = jax.ffi.ffi_call("ktjax_rms_norm_f32", jax.ShapeDtypeStruct(x.shape, x.dtype))
    return call(x, w, eps=np.float32(eps))  # a numpy scalar: attributes must be static
