"""The XLA flags that keep a GPU step in one CUDA graph, set in one place before jax starts its
backend (XLA reads XLA_FLAGS once, when the first backend initializes).

XLA GPU records a program's kernels into command buffers (CUDA graphs) by op kind; its
defaults (FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN, DYNAMIC_SLICE_FUSION) leave out
`while` and `conditional`, so the scan over layers splits a decode step into one host-driven
loop with a graph per layer body and a device-to-host read of the loop predicate per layer.
Adding WHILE and CONDITIONAL records the loop as CUDA conditional nodes, so a decode bucket
runs as one graph launch; min_graph_size 1 records even short stretches between commands.

Kinds still left out and why: a custom call whose FFI handler is not marked command-buffer
compatible (the host kernels' CPU bridge) runs between graphs; collectives do not occur in a
one-GPU step. Pallas kernels lower to custom calls (Triton / Mosaic GPU), which CUSTOM_CALL
captures.

KTJAX_COMMAND_BUFFERS=0 leaves XLA's defaults; =unroll also unrolls known-trip-count loops
inside the graph (no conditional nodes; more nodes); =layers has the decoder unroll its scan
over layers instead (unrolled_layers), so no `while` is left for XLA to keep out of the
graph (7 Dec, H100: the layer loop still ran as a graph launch per layer; compiles take
longer). Flags the user already put in XLA_FLAGS
win. The same flags parse on CPU-only installs (XLA registers every flag), so this is safe
to apply anywhere.
"""
from __future__ import annotations

import os
import warnings

GRAPH_FLAGS = {
    "xla_gpu_enable_command_buffer": "+WHILE,+CONDITIONAL",
    "xla_gpu_graph_min_graph_size": "1",
}
UNROLL_FLAGS = {"xla_gpu_command_buffer_unroll_loops": "true"}


MODES = ("0", "1", "unroll", "layers")


def _checked(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"KTJAX_COMMAND_BUFFERS must be one of {', '.join(MODES)}, "
                         f"got {value!r}")
    return value


def current_mode() -> str:
    """KTJAX_COMMAND_BUFFERS, checked (default '1')."""
    return _checked(os.environ.get("KTJAX_COMMAND_BUFFERS", "1"))


def wanted_flags(mode: str | None = None) -> dict[str, str]:
    """The flags for a KTJAX_COMMAND_BUFFERS mode (default: the environment's)."""
    mode = current_mode() if mode is None else _checked(mode)
    if mode == "0":
        return {}
    return {**GRAPH_FLAGS, **(UNROLL_FLAGS if mode == "unroll" else {})}


def unrolled_layers() -> bool:
    """Whether the decoder unrolls its scan over layers (KTJAX_COMMAND_BUFFERS=layers)."""
    return current_mode() == "layers"


def merged(existing: str, flags: dict[str, str]) -> str:
    """`existing` XLA_FLAGS with `flags` appended, except those it already sets."""
    present = {tok.lstrip("-").split("=", 1)[0] for tok in existing.split()}
    extra = [f"--{k}={v}" for k, v in flags.items() if k not in present]
    return " ".join([existing.strip(), *extra]).strip()


def _gpu_backend_started() -> bool:
    """Whether jax has already started a GPU backend (a CPU one ignores the flags)."""
    import sys
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return any(name in ("cuda", "gpu", "rocm") for name in xla_bridge._backends)
    except (ImportError, AttributeError):
        return False


def apply() -> None:
    """Put the graph flags into XLA_FLAGS; warns if a GPU backend has already started, when
    XLA no longer reads them."""
    flags = wanted_flags()
    new = merged(os.environ.get("XLA_FLAGS", ""), flags)
    if new == os.environ.get("XLA_FLAGS", "").strip():
        return
    if _gpu_backend_started():
        warnings.warn("ktjax imported after jax started its backend: the CUDA graph flags "
                      f"({' '.join(f'--{k}={v}' for k, v in flags.items())}) are not in "
                      "effect; import ktjax first or set them in XLA_FLAGS", stacklevel=3)
    os.environ["XLA_FLAGS"] = new
