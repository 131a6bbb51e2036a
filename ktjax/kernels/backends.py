"""Attention backends: one interface, chosen per run: `reference` (jnp, any device), `cpu`
(the native host kernel, every step), `pallas` (the Pallas kernel; compiled on a CUDA GPU,
interpreted elsewhere); `auto` picks by platform."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

from ktjax.errors import KernelError, KtjaxError
from ktjax.kernels import paged_attention_cpu, paged_attention_ref


@dataclass(frozen=True)
class AttentionBackend:
    """`write(k_cache, v_cache, slots, k, v)` stores all layers' new keys/values after the
    layer loop; `attend(q, k_new, v_new, k_cache, v_cache, layer, block_tables, cache_lens,
    q_positions, *, scale, sliding_window[, values_in_keys])` attends over cache + new keys;
    `values_in_keys` (MLA) is passed only by families with a latent cache. See
    paged_attention_ref for the contract. A cache leaf is an array or kv_quant.Int8Pages."""

    name: str
    write: Callable
    attend: Callable


def _pallas_attend(q, k_new, v_new, k_cache, v_cache, *args, values_in_keys=None, **kw):
    """The Pallas kernel; a shape it cannot block (kernel's unsupported_reason) runs the
    reference instead, with a RuntimeWarning naming the shape (once per shape)."""
    from ktjax.kernels import paged_attention_gpu as gpu
    value_dim = values_in_keys or v_cache.shape[-1]
    reason = gpu.unsupported_reason(q.shape[-1], value_dim, k_cache.shape[2], values_in_keys,
                                    kv_itemsize=k_cache.dtype.itemsize,
                                    q_itemsize=max(q.dtype.itemsize,
                                                   k_cache.dtype.itemsize))
    extra = {} if values_in_keys is None else {"values_in_keys": values_in_keys}
    if reason:
        _warn_once(f"pallas attention: {reason}; this layer runs the jnp reference")
        return paged_attention_ref.paged_attention(q, k_new, v_new, k_cache, v_cache, *args,
                                                   **extra, **kw)
    return gpu.paged_attention(q, k_new, v_new, k_cache, v_cache, *args, **extra, **kw)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


REFERENCE = AttentionBackend("reference", paged_attention_ref.write_kv,
                             paged_attention_ref.paged_attention)
CPU = AttentionBackend("cpu", paged_attention_ref.write_kv, paged_attention_cpu.paged_attention)
PALLAS = AttentionBackend("pallas", paged_attention_ref.write_kv, _pallas_attend)
_BACKENDS = {b.name: b for b in (REFERENCE, CPU, PALLAS)}


def pallas_probe_failure(kv_cache_dtype: str = "float32") -> str | None:
    """Compile and run the Pallas kernel on a tiny decode + prefill step of the default
    device, with pages of kv_cache_dtype (and bfloat16 queries unless float32), in one split
    and in two (the combine kernel, with sinks), and compare with the reference; the failure
    as text, or None when it works."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    try:
        from ktjax.kernels import kv_quant, paged_attention_gpu as gpu
        rng = np.random.default_rng(0)
        f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
        dtype = jnp.float32 if kv_cache_dtype == "float32" else jnp.bfloat16
        cache = [f(1, 5, 16, 2, 64) for _ in range(2)]
        if kv_cache_dtype == "int8":
            cache = [kv_quant.Int8Pages(*kv_quant.quantize(c)) for c in cache]
        else:
            cache = [c.astype(kv_cache_dtype) for c in cache]
        args = (f(2, 2, 4, 64).astype(dtype), f(2, 2, 2, 64).astype(dtype),
                f(2, 2, 2, 64).astype(dtype), *cache, np.int32(0),
                np.array([[1, 2], [3, 4]], np.int32), np.array([20, 0], np.int32),
                np.array([[20, -1], [0, 1]], np.int32))
        # one split (the output written by the kernel) and two (the combine kernel's too,
        # with gpt-oss's sinks)
        for n_splits, extra in ((None, {}), (2, {"sinks": f(4)})):
            want = paged_attention_ref.paged_attention(*args, scale=0.125, **extra)
            got = jax.jit(functools.partial(gpu.paged_attention, scale=0.125,
                                            n_splits=n_splits, **extra))(*args)
            err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
            if not err < 5e-2:
                return (f"the probe ({n_splits or 1} split) differs from the reference by "
                        f"{err:.3g}")
        return None
    except Exception as e:  # noqa: BLE001 -- any failure means: do not use the kernel
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.lru_cache(maxsize=None)
def _auto_gpu_backend(kv_cache_dtype: str) -> AttentionBackend:
    failure = pallas_probe_failure(kv_cache_dtype)
    if failure is None:
        return PALLAS
    warnings.warn(f"the Pallas attention kernel does not work on this GPU ({failure}); "
                  "using the jnp reference attention", RuntimeWarning, stacklevel=3)
    return REFERENCE


def get_backend(name: str, platform: str = "cpu",
                kv_cache_dtype: str = "float32") -> AttentionBackend:
    """The backend called `name`. "auto": on CPU the host kernel (the reference for int8
    pages, which the host kernel does not read), on a CUDA GPU the Pallas kernel once a
    compile probe passes (else the reference, with a RuntimeWarning naming the failure),
    the reference elsewhere."""
    if name == "auto":
        if platform == "cpu":
            name = "reference" if kv_cache_dtype == "int8" else "cpu"
        elif platform == "gpu":
            return _auto_gpu_backend(kv_cache_dtype)
        else:
            name = "reference"
    if name not in _BACKENDS:
        raise KtjaxError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    if name == "cpu" and platform != "cpu":
        raise KernelError(f"the cpu attention backend is a host kernel with no handler in "
                          f"{platform} programs: use attention 'auto', 'pallas' or 'reference'")
    if name == "cpu" and kv_cache_dtype == "int8":
        raise KernelError("the cpu attention backend reads float32 or bfloat16 KV pages, not "
                          "int8: use kv_cache_dtype float32/bfloat16 or attention "
                          "'reference'/'pallas'")
    return _BACKENDS[name]
