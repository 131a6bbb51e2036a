"""KV page pool and per-sequence block tables. Paging lives here, outside the model."""
from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp

from ktjax.errors import OutOfMemoryError
from ktjax.kernels import kv_quant
from ktjax.models.base import KVCache, KVCacheSpec

SCRATCH_PAGE = 0  # padding tokens write here; never part of a sequence's context


class PagePool:
    """Free list of KV pages. Page 0 is reserved as scratch for padding writes.

    Capacity is also *reserved* per request at admission (prompt + max new tokens), so a
    running sequence never runs out of pages halfway through generating.
    """

    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 2:
            raise OutOfMemoryError(f"a KV pool needs at least 2 pages, got {n_pages}")
        self.n_pages = n_pages
        self.page_size = page_size
        self._free = list(range(n_pages - 1, SCRATCH_PAGE, -1))
        self._reserved = 0

    @property
    def capacity_tokens(self) -> int:
        return (self.n_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def reserved_pages(self) -> int:
        return self._reserved

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def check_fits(self, n_tokens: int) -> None:
        """A sequence that could never fit, even alone, is an error rather than a wait."""
        need = self.pages_for(n_tokens)
        if need > self.n_pages - 1:
            raise OutOfMemoryError(
                f"a sequence of {n_tokens} tokens needs {need} KV pages but the pool has "
                f"{self.n_pages - 1} ({self.capacity_tokens} tokens); raise kv_cache_tokens")

    def try_reserve(self, n_tokens: int) -> bool:
        """Reserve room for a sequence of up to n_tokens; False if it must wait."""
        self.check_fits(n_tokens)
        need = self.pages_for(n_tokens)
        if self._reserved + need > self.n_pages - 1:
            return False
        self._reserved += need
        return True

    def release_reservation(self, n_tokens: int) -> None:
        self._reserved -= self.pages_for(n_tokens)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfMemoryError(f"KV pool exhausted: {n} pages wanted, {len(self._free)} free")
        pages, self._free = self._free[-n:], self._free[:-n]
        return pages[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class BlockTable:
    """The pages of one sequence, grown on demand as tokens are written."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []

    def ensure(self, n_tokens: int) -> None:
        missing = self.pool.pages_for(n_tokens) - len(self.pages)
        if missing > 0:
            self.pages += self.pool.allocate(missing)

    def slot(self, position: int) -> int:
        page, offset = divmod(position, self.pool.page_size)
        return self.pages[page] * self.pool.page_size + offset

    def release(self) -> None:
        self.pool.free(self.pages)
        self.pages = []


def bytes_per_token(spec: KVCacheSpec, kv_dtype: str) -> int:
    """KV bytes one token takes over all layers (int8: its float32 scales included)."""
    per_head = kv_quant.bytes_per_token_head(spec.head_dim, kv_dtype) + \
        kv_quant.bytes_per_token_head(spec.value_dim, kv_dtype)
    return spec.n_layers * spec.n_kv_heads * per_head


def cache_bytes(spec: KVCacheSpec, n_pages: int, page_size: int, kv_dtype: str) -> int:
    """Device bytes of a pool of n_pages pages (the scratch page included)."""
    return n_pages * page_size * bytes_per_token(spec, kv_dtype)


def pages_within(spec: KVCacheSpec, budget_bytes: int, page_size: int, kv_dtype: str) -> int:
    """How many pages of kv_dtype a byte budget holds: int8 pages are ~half of bfloat16's."""
    return budget_bytes // (page_size * bytes_per_token(spec, kv_dtype))


def make_kv_cache(spec: KVCacheSpec, n_pages: int, page_size: int, kv_dtype,
                  device: jax.Device | None = None) -> KVCache:
    """Zeroed keys [L, n_pages, page_size, n_kv, head_dim] and values [..., value_dim], stored
    as kv_dtype ('float32', 'bfloat16', or 'int8' = kv_quant.Int8Pages with scales)."""
    if not isinstance(kv_dtype, str):          # a numpy/jax dtype, as older callers pass
        kv_dtype = jnp.dtype(kv_dtype).name
    kv_dtype = kv_quant.check_dtype(kv_dtype)
    shape = (spec.n_layers, n_pages, page_size, spec.n_kv_heads)
    with jax.default_device(device) if device is not None else nullcontext():
        return KVCache(k=kv_quant.zeros((*shape, spec.head_dim), kv_dtype),
                       v=kv_quant.zeros((*shape, spec.value_dim), kv_dtype))
