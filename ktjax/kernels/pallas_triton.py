"""The one place that knows how a Pallas kernel is lowered with Triton on a GPU.

jax 0.11 deprecates Pallas' Triton lowering in favour of Mosaic GPU and says so with a
DeprecationWarning each time a Triton kernel is lowered (inside jit, so once per compile).
Our decode/prefill attention uses it on purpose (ARCHITECTURE.md says why); the warning is
filtered here, by its text, and nothing else is.
"""
from __future__ import annotations

import functools
import warnings

import jax
from jax.experimental.pallas import triton as pl_triton

warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


dot = pl_triton.dot   # 2-D matmul with float32 results (jax.experimental.pallas.dot moved here)
store = pl_triton.store   # a store with a mask (the same signature on jax 0.10 and 0.11)


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters (the same class name on jax 0.10 and 0.11)."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def interpret_default() -> bool:
    """Interpret (run the kernel's jaxpr with XLA) unless the default device is a CUDA GPU."""
    return jax.default_backend() != "gpu"


# Shared memory a block may opt into, by compute capability (CUDA programming guide, table of
# technical specifications): what a Triton kernel's pipeline buffers must fit in.
SHARED_MEMORY_OPTIN = {
    (7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
    (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
    (10, 3): 227 * 1024, (12, 0): 99 * 1024, (12, 1): 99 * 1024,
}
UNKNOWN_GPU_SHARED_MEMORY = 99 * 1024   # the smallest of any GPU with bf16 tensor cores
NO_GPU_CAPABILITY = (9, 0)              # jax's Triton lowering assumes sm_90 without a GPU


def shared_memory_limit() -> int:
    """Bytes of shared memory one Triton program may use on the first CUDA device: what the
    device reports (jax >= 0.11: shared_memory_per_block_optin), else the table's figure for
    its compute capability, else a conservative default. Without a GPU (interpreted runs,
    lowering in CI) the H100's, as jax lowers for sm_90 then."""
    return _shared_memory_limit()


@functools.lru_cache(maxsize=1)
def _shared_memory_limit() -> int:
    try:
        device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        return SHARED_MEMORY_OPTIN[NO_GPU_CAPABILITY]
    reported = getattr(device, "shared_memory_per_block_optin", None)
    if isinstance(reported, int) and reported > 0:
        return reported
    return limit_for_capability(getattr(device, "compute_capability", None))


def limit_for_capability(capability: str | None) -> int:
    """The table's shared memory for a compute capability "major.minor" (or the default)."""
    try:
        major, minor = (int(x) for x in str(capability).split(".")[:2])
    except ValueError:
        return UNKNOWN_GPU_SHARED_MEMORY
    return SHARED_MEMORY_OPTIN.get((major, minor), UNKNOWN_GPU_SHARED_MEMORY)
