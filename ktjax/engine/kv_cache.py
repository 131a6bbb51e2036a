"""KV page pool and per-sequence block tables. Paging lives here, outside the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.engine.prefix_cache import PrefixCache
from ktjax.errors import OutOfMemoryError
from ktjax.kernels import kv_quant
from ktjax.models.base import KVCache, KVCacheSpec

SCRATCH_PAGE = 0  # padding tokens write here; never part of a sequence's context


class PagePool:
    """KV pages, reference-counted. Page 0 is reserved as scratch for padding writes.

    A page is free, held by one or more block tables (shared prefix pages), or idle: full,
    registered in the prefix cache and held by no table, reused only when no free page is
    left (least recently used first). Idle pages count as free for the scheduler.
    """

    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 2:
            raise OutOfMemoryError(f"a KV pool needs at least 2 pages, got {n_pages}")
        self.n_pages = n_pages
        self.page_size = page_size
        self._free = list(range(n_pages - 1, SCRATCH_PAGE, -1))
        self._refs = [0] * n_pages
        self.prefix = PrefixCache()

    @property
    def capacity_tokens(self) -> int:
        return (self.n_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages a table can take now: free ones and idle prefix pages."""
        return len(self._free) + self.prefix.idle_pages

    @property
    def used_pages(self) -> int:
        """Pages held by at least one block table."""
        return self.n_pages - 1 - self.free_pages

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def is_idle(self, page: int) -> bool:
        """Held by no table (a prefix-cache page waiting in the LRU, when registered)."""
        return self._refs[page] == 0

    def check_fits(self, n_tokens: int) -> None:
        """A sequence that could never fit, even alone, is an error rather than a wait."""
        need = self.pages_for(n_tokens)
        if need > self.n_pages - 1:
            raise OutOfMemoryError(
                f"a sequence of {n_tokens} tokens needs {need} KV pages but the pool has "
                f"{self.n_pages - 1} ({self.capacity_tokens} tokens); raise kv_cache_tokens")

    def allocate(self, n: int) -> list[int]:
        """n private pages: free ones first, then the least recently used idle ones."""
        if n > self.free_pages:
            raise OutOfMemoryError(f"KV pool exhausted: {n} pages wanted, "
                                   f"{self.free_pages} free")
        take = min(n, len(self._free))
        pages = self._free[len(self._free) - take:][::-1]
        del self._free[len(self._free) - take:]
        pages += [self.prefix.evict() for _ in range(n - take)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Hold prefix-cache pages found by lookup (reviving idle ones)."""
        for p in pages:
            if self._refs[p] == 0:
                self.prefix.revive(p)
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one hold of each page: unheld registered pages go idle, others free."""
        for p in reversed(pages):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if self.prefix.holds(p):
                    self.prefix.park(p)
                else:
                    self._free.append(p)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (the KV contents were lost)."""
        self._free.extend(self.prefix.reset())


class BlockTable:
    """The pages of one sequence, grown on demand as tokens are written; its first pages may
    be shared with other sequences (prefix cache hits)."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []

    def missing(self, n_tokens: int) -> int:
        """Pages to allocate before `n_tokens` tokens fit."""
        return max(0, self.pool.pages_for(n_tokens) - len(self.pages))

    def ensure(self, n_tokens: int) -> None:
        missing = self.missing(n_tokens)
        if missing:
            self.pages += self.pool.allocate(missing)

    def share(self, pages: list[int]) -> None:
        """Start the (empty) table with cached pages."""
        assert not self.pages
        self.pool.share(pages)
        self.pages = list(pages)

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
    return KVCache(k=kv_quant.zeros((*shape, spec.head_dim), kv_dtype, device),
                   v=kv_quant.zeros((*shape, spec.value_dim), kv_dtype, device))
