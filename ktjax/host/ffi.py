"""Registers the native XLA FFI targets (CPU handlers, and the CUDA bridge of the layered host
targets for GPU programs)."""

from __future__ import annotations

import threading

import jax

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

