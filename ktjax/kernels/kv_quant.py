"""int8 KV pages: per-token-per-head symmetric quantization of the paged cache.

A cache leaf is either a plain array [L, n_pages, page_size, n_kv, d] (float32/bfloat16) or
`Int8Pages`: int8 values of that shape beside float32 scales [L, n_pages, page_size, n_kv]
(value = q * scale, scale = max|x| / 127 over the head's d dims). One scale per token and head
keeps a token's error independent of its neighbours', and the scale costs 4 bytes per
128-byte head row (3%). The kernels apply the key scale to the score column and the value
scale to the probability column, so the int8 rows are read as they lie.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import pytree
from ktjax.errors import KtjaxError

KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


def check_dtype(kv_dtype: str) -> str:
    """kv_dtype if it names a KV cache dtype, else a KtjaxError listing them."""
    if kv_dtype not in KV_CACHE_DTYPES:
        raise KtjaxError(f"kv_cache_dtype {kv_dtype!r} is not one of "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    return kv_dtype


@pytree.dataclass
class Int8Pages:
    """int8 KV pages and their float32 per-token-per-head scales."""

    values: jax.Array   # int8 [L, n_pages, page_size, n_kv, d]
    scales: jax.Array   # float32 [L, n_pages, page_size, n_kv]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype


KVPages = jax.Array | Int8Pages   # one cache leaf: plain pages or int8 pages with scales


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., d] -> (int8 [..., d], float32 scales [...]) with x ~ q * scale."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(values: jax.Array, scales: jax.Array) -> jax.Array:
    return values.astype(jnp.float32) * scales[..., None]


def is_int8(cache) -> bool:
    return isinstance(cache, Int8Pages)


def zeros(shape: tuple[int, ...], kv_dtype: str, device: jax.Device | None = None):
    """A zeroed cache leaf of `shape` stored as kv_dtype (a width-0 leaf stays a plain array:
    MLA's value cache holds nothing to scale), on `device` (None: the default device)."""
    if kv_dtype == "int8" and shape[-1] > 0:
        return Int8Pages(_full(shape, jnp.int8, 0, device),
                         _full(shape[:-1], jnp.float32, 1, device))
    return _full(shape, jnp.int8 if kv_dtype == "int8" else jnp.dtype(kv_dtype), 0, device)


def _full(shape: tuple[int, ...], dtype, value: int, device: jax.Device | None) -> jax.Array:
    """On a CPU device a numpy array handed to XLA: jnp.full compiles a program per shape,
    0.1 s of a start from artifacts. Elsewhere jnp.full, which fills device memory in place
    (a host array would cross the bus)."""
    if device is not None and device.platform == "cpu":
        host = np.zeros(shape, dtype) if value == 0 else np.full(shape, value, dtype)
        return jax.device_put(host, device)
    return jnp.full(shape, value, dtype, device=device)


def bytes_per_token_head(d: int, kv_dtype: str) -> int:
    """Bytes one token's row of d dims takes for one KV head (scale included)."""
    if d == 0:
        return 0
    return d + 4 if kv_dtype == "int8" else d * jnp.dtype(kv_dtype).itemsize
