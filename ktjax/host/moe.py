"""Fused mixture-of-experts on the host CPU, with expert weights in the native store.

``moe_layered`` is the ``ktjax_moe_layered`` XLA FFI call (CPU backend, or CUDA programs
through the bridge; usable under ``jax.jit``):
``out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` with ``e = ids[t, j]``.
Shared experts run in XLA. Matrices use the host linear kernels' formats (see
``ktjax.host.linear``). An expert set may be packed with another activation (gpt-oss's clamped
SwiGLU, ``ktjax.expert_activation``) and per-expert biases of gate, up and down (float32
[E, I], [E, I], [E, H]): they are stored with the set, so every call of it uses them.
"""

from __future__ import annotations

import jax
import numpy as np

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.expert_activation import SILU, ExpertActivation
from ktjax.host.ffi import register_targets
from ktjax.host.linear import FLOAT_FORMATS
from ktjax.host.native import native_call


def _raw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


Biases = tuple  # (gate [E, I], up [E, I], down [E, H]): float32 arrays or None each


def epilogue(activation: ExpertActivation = SILU, biases: Biases = (None, None, None)
             ) -> dict | None:
    """The native description of an expert set's activation and biases (None: plain SiLU).
    Biases are passed as given: one not float32 [E, rows] is refused by the packer."""
    if len(biases) != 3:
        raise KernelError(f"expert biases are (gate, up, down), got {len(biases)} entries")
    if activation == SILU and all(b is None for b in biases):
        return None
    return {"activation": activation.kind, "alpha": float(activation.alpha),
            "limit": float(activation.limit),
            **{k: b for k, b in zip(("gate_bias", "up_bias", "down_bias"), biases)}}


def pack_experts_gguf(gate: tuple[np.ndarray, int], up: tuple[np.ndarray, int],
                      down: tuple[np.ndarray, int], experts: int, hidden: int, inter: int,
                      float_format: str = "int8", activation: ExpertActivation = SILU,
                      biases: Biases = (None, None, None)) -> int:
    """Repacks GGUF expert tensors, each given as (raw bytes, ggml type): gate and up of
    numpy shape [E, I, H], down [E, H, I] (``ffn_*_exps``); F32/F16/BF16 tensors become
    ``float_format``; with ``activation`` and ``biases`` (see ``epilogue``). Returns the
    handle."""
    return native_call(_native.pack_experts_gguf, _raw(gate[0]), int(gate[1]), _raw(up[0]), int(up[1]),
                        _raw(down[0]), int(down[1]), int(experts), int(hidden), int(inter), float_format,
                        epilogue(activation, biases))


def pack_experts_float(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: str = "int8",
                       activation: ExpertActivation = SILU,
                       biases: Biases = (None, None, None)) -> int:
    """Quantizes float experts (gate/up [E, I, H], down [E, H, I]) to ``fmt``, with
    ``activation`` and ``biases`` (see ``epilogue``)."""
    if fmt not in FLOAT_FORMATS:
        raise KernelError(f"unknown weight format {fmt!r}; expected one of {FLOAT_FORMATS}")
    f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (gate, up, down)]
    return native_call(_native.pack_experts_float, *f32, fmt, epilogue(activation, biases))


def stored_epilogue(handle: int) -> dict | None:
    """The activation and biases stored with an expert set (``epilogue``'s form), or None."""
    return native_call(_native.expert_epilogue, int(handle))


def moe_forward(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, handle: int, *,
                isa: str = "", reference: bool = False) -> np.ndarray:
    """Direct (non-XLA) call on numpy arrays with a given ISA level ('' = active);
    ``reference``: the scalar kernels computing that level's formula."""
    return native_call(_native.moe_forward, np.ascontiguousarray(x, dtype=np.float32),
                        np.ascontiguousarray(expert_ids, dtype=np.int32),
                        np.ascontiguousarray(expert_weights, dtype=np.float32),
                        int(handle), isa, reference)


def moe_reference(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, handle: int, *,
                  like: str = "generic") -> np.ndarray:
    """The scalar reference kernels, computing the formula of ISA level ``like`` (AMX
    multiplies group-scaled weights in bf16 for experts with >= 16 tokens)."""
    return moe_forward(x, expert_ids, expert_weights, handle, isa=like, reference=True)


def moe_layered(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, layer: jax.Array,
                handles: tuple[int, ...]) -> jax.Array:
    """Fused MoE through ``ktjax_moe_layered``: x f32[T, H], expert_ids int32[T, k],
    expert_weights f32[T, k] -> f32[T, H], with the expert set ``handles[layer]`` (its stored
    activation and biases), the layer a
    traced s32 scalar (the index of a lax.scan over layers). An expert id out of range, a layer
    outside ``handles``, NaN/Inf or a shape mismatch raise an XLA runtime error naming the
    problem."""
    register_targets()
    call = jax.ffi.ffi_call("ktjax_moe_layered", jax.ShapeDtypeStruct(x.shape, np.float32))
    return call(x, expert_ids, expert_weights, layer.astype(np.int32),
                handles=np.asarray(handles, np.int64))
