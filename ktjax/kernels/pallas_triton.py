"""The one place that knows how a Pallas kernel is lowered with Triton on a GPU.

jax 0.11 deprecates Pallas' Triton lowering in favour of Mosaic GPU and says so with a
DeprecationWarning each time a Triton kernel is lowered (inside jit, so once per compile).
Our decode/prefill attention uses it on purpose (ARCHITECTURE.md says why); the warning is
filtered here, by its text, and nothing else is.
"""
from __future__ import annotations

import warnings

import jax
from jax.experimental.pallas import triton as pl_triton

warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


dot = pl_triton.dot   # 2-D matmul with float32 results (jax.experimental.pallas.dot moved here)


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters (the same class name on jax 0.10 and 0.11)."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def interpret_default() -> bool:
    """Interpret (run the kernel's jaxpr with XLA) unless the default device is a CUDA GPU."""
    return jax.default_backend() != "gpu"
