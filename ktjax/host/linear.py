"""Quantized linear layers on the host CPU: weights live in the native store (by handle).

``linear_layered`` is an XLA FFI call usable under ``jax.jit`` on the CPU backend (and in CUDA
programs through the bridge); the kernel computes ``y = x @ W.T`` in float32 from packed int8 /
int4 / bf16 weights, quantizing each token's activations to int8 per weight group (bf16
weights: rounding them to bf16).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.host.ffi import register_targets
from ktjax.host.native import native_call

FLOAT_FORMATS = ("int8", "int8_row", "int4", "bf16")


def pack_gguf_weight(raw: np.ndarray, ggml_type: int, shape: tuple[int, int],
                     float_format: str = "int8") -> int:
    """Repacks a GGUF tensor's bytes (numpy shape ``shape`` = (N out, K in)) into the store.

    Quantized types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K; IQ4_NL, IQ4_XS, MXFP4 as
    4-bit table indices; the other IQ, TQ1_0 and TQ2_0 as int8 groups of 32 or 16) are
    repacked exactly; F32, F16 and BF16 are converted once to ``float_format`` (int8 in
    groups of 32 by default; int4 or bf16). Returns the weight's handle.
    """
    n, k = (int(s) for s in shape)
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    return native_call(_native.pack_gguf_weight, data, int(ggml_type), n, k, float_format)


def pack_float_weight(w: np.ndarray, fmt: str = "int8") -> int:
    """Quantizes a float weight [N, K] to ``fmt`` (int8: groups of 32, symmetric; int8_row:
    one scale per row, activations then quantized with one scale per token, which lets the
    AMX kernel sum all of K in int32; int4: groups of 32 with scale and min; bf16) into the
    store. Returns the handle."""
    if fmt not in FLOAT_FORMATS:
        raise KernelError(f"unknown weight format {fmt!r}; expected one of {FLOAT_FORMATS}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise KernelError(f"weight must be 2-D [N, K], got shape {w.shape}")
    return native_call(_native.pack_float_weight, np.ascontiguousarray(w, dtype=np.float32), fmt)


def release(handle: int) -> None:
    """Frees a stored weight; using its handle afterwards is an error."""
    native_call(_native.release_weight, int(handle))


def weight_info(handle: int) -> dict[str, Any]:
    """Shape (n, k), format string, byte size and source GGUF type of a stored weight."""
    return native_call(_native.weight_info, int(handle))


def unpack_weight(handle: int) -> np.ndarray:
    """The stored weight decoded to float32 [N, K] (exactly what the kernels multiply by)."""
    return native_call(_native.unpack_weight, int(handle), 0)


def linear_layered(x: jax.Array, layer: jax.Array, handles: tuple[int, ...],
                   out_features: int) -> jax.Array:
    """``x[..., K] @ W.T -> [..., N]`` in float32 through the ``ktjax_linear_layered`` FFI
    target, W = ``handles[layer]``, the layer a traced s32 scalar (the index of a lax.scan over
    layers). A wrong dtype or K, a layer outside ``handles``, an unknown handle or NaN/Inf in
    ``x`` raise an XLA runtime error naming the problem."""
    register_targets()
    out = jax.ShapeDtypeStruct(tuple(x.shape[:-1]) + (int(out_features),), np.float32)
    return jax.ffi.ffi_call("ktjax_linear_layered", out)(
        x, layer.astype(np.int32), handles=np.asarray(handles, np.int64))


def linear_forward(x: np.ndarray, handle: int, isa: str = "", reference: bool = False) -> np.ndarray:
    """Direct (non-XLA) call on numpy ``x[T, K]`` with a given ISA level ('' = active);
    ``reference``: the scalar kernel computing that level's formula."""
    return native_call(_native.linear_forward, np.ascontiguousarray(x, dtype=np.float32),
                        int(handle), isa, reference)


def linear_reference(x: np.ndarray, handle: int, like: str = "generic") -> np.ndarray:
    """The scalar reference kernel on numpy ``x[T, K]``, computing the formula of ISA level
    ``like`` (AMX multiplies group-scaled weights at >= 16 tokens in bf16)."""
    return linear_forward(x, handle, like, reference=True)
