"""The routed experts on the host as work in the program's order, split in two calls so the
device computes what lies between (the shared experts) while the host runs the routed ones.

``moe_submit`` returns a token; ``moe_wait(token, after)`` returns the routed experts' output
f32[T, H], ordered after ``after``. In CUDA programs the submit enqueues, on the program's
stream, the copies of the routed tokens into pinned host buffers and a host function handing
the job to the host MoE worker; the wait enqueues a host function waiting for it and the copy
back: no stream synchronization and no allocation per call, so XLA captures the step as a CUDA
graph (xla_ffi/moe_async_ffi.cpp). Each traced call reserves its buffers once, at trace time
(one site per call and bucket). In CPU programs the submit runs the job at once.

A failing host job writes zeros and records its error: ``raise_host_errors()`` (called by the
engine after each step) raises it as KernelError.
"""
from __future__ import annotations

import jax
import numpy as np

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.host.ffi import register_targets
from ktjax.host.native import native_call

SKIP = -1  # an expert id the host skips (the slot runs on the device)
# Sites reserved in this process: id -> (tokens, hidden, top_k, handles), what an export
# records so that a process loading its programs reserves the same ids
# (ktjax.export.artifacts).
SITES: dict[int, tuple[int, int, int, tuple[int, ...]]] = {}


def reserve_site(tokens: int, hidden: int, top_k: int, handles: tuple[int, ...],
                 at: int = 0) -> int:
    """The buffers of one call site (pinned where a CUDA driver is usable) under id `at`
    (0: the next free one; a taken id is a KernelError); returns its id."""
    spec = (int(tokens), int(hidden), int(top_k), tuple(int(h) for h in handles))
    site, _pinned = native_call(_native.moe_site_reserve, *spec[:3], list(spec[3]), True,
                                int(at))
    SITES[site] = spec
    return site


def moe_submit(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, layer: jax.Array,
               handles: tuple[int, ...], site: int | None = None,
               after: jax.Array | None = None) -> tuple[jax.Array, int]:
    """Starts the fused MoE of x f32[T, H] routed by expert_ids int32[T, k] (SKIP: not on the
    host) with expert_weights f32[T, k], on expert set ``handles[layer]``. Returns (token,
    site) for ``moe_wait``. ``site``: a site reserved for these shapes and handles, which
    several calls share, each submit ordered ``after`` the previous job's wait (an operand:
    XLA drops optimization barriers before it schedules, so only data orders custom calls);
    default: a new site."""
    register_targets()
    t, h = x.shape
    if expert_ids.shape != expert_weights.shape or expert_ids.ndim != 2 or expert_ids.shape[0] != t:
        raise KernelError(f"expert_ids {expert_ids.shape} and expert_weights "
                          f"{expert_weights.shape} must both be [{t}, k]")
    if site is None:
        site = reserve_site(t, h, expert_ids.shape[1], handles)
    call = jax.ffi.ffi_call("ktjax_moe_submit", jax.ShapeDtypeStruct((1,), np.uint8))
    token = call(x.astype(np.float32), expert_ids.astype(np.int32),
                 expert_weights.astype(np.float32), layer.astype(np.int32),
                 layer if after is None else after, site=np.int64(site))
    return token, site


def moe_wait(token: jax.Array, site: int, after: jax.Array, tokens: int, hidden: int) -> jax.Array:
    """The result f32[tokens, hidden] of the job ``token`` started, once ``after`` (an array
    the device computes meanwhile) is ready."""
    call = jax.ffi.ffi_call("ktjax_moe_wait", jax.ShapeDtypeStruct((tokens, hidden), np.float32))
    return call(token, after, site=np.int64(site))


def moe_after(x: jax.Array, token: jax.Array) -> jax.Array:
    """x, as a value that depends on the submit that returned ``token``: the device work that
    reads it is scheduled after the submit, so the host job starts first. (An optimization
    barrier would not do: XLA removes barriers before it schedules.)"""
    call = jax.ffi.ffi_call("ktjax_moe_after", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0})
    return call(x, token)


def raise_host_errors() -> None:
    """Raises KernelError for the first host MoE job that failed since the last call."""
    err = _native.moe_site_take_error()
    if err:
        raise KernelError(err)
