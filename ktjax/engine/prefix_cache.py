"""Content-addressed full KV pages: a page's key hashes its tokens chained with the previous
page's key and the identity of everything that shapes the KV (model, rules, KV dtype, page
size), so equal keys mean equal cache contents. Pages nobody references stay addressable in
an LRU until the pool needs them back."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def chain_hashes(tokens: list[int], page_size: int, identity: bytes,
                 known: list[bytes]) -> list[bytes]:
    """Keys of every full page of `tokens`, extending `known` (the keys of its first pages,
    computed before: a sequence's tokens only grow)."""
    keys = list(known)
    for start in range(len(keys) * page_size, len(tokens) - page_size + 1, page_size):
        h = hashlib.blake2b(keys[-1] if keys else identity, digest_size=16)
        h.update(np.asarray(tokens[start:start + page_size], np.int64).tobytes())
        keys.append(h.digest())
    return keys


class PrefixCache:
    """key <-> page of the full pages registered, and the LRU of those no table holds."""

    def __init__(self):
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()   # oldest first
        self.queried_pages = 0
        self.hit_pages = 0

    @property
    def idle_pages(self) -> int:
        return len(self._idle)

    def lookup(self, keys: list[bytes], align: int = 1) -> list[int]:
        """The pages of the longest registered prefix of `keys` whose length is a multiple of
        `align` pages (counted for the hit rate)."""
        pages = []
        for k in keys:
            page = self._page_of.get(k)
            if page is None:
                break
            pages.append(page)
        del pages[len(pages) // align * align:]
        self.queried_pages += len(keys)
        self.hit_pages += len(pages)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Make a newly filled page addressable; a key registered already keeps its page
        (the new one stays private to its sequence)."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def holds(self, page: int) -> bool:
        return page in self._key_of

    def park(self, page: int) -> None:
        """An addressable page no table holds any more: newest in the LRU."""
        self._idle[page] = None

    def revive(self, page: int) -> None:
        """A hit on an idle page: out of the LRU, held again."""
        self._idle.pop(page, None)

    def evict(self) -> int:
        """The least recently used idle page, forgotten, for reuse."""
        page, _ = self._idle.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        return page

    def reset(self) -> list[int]:
        """Forget every key (the KV cache was made anew): returns the idle pages, now free;
        held pages stay with their tables, private."""
        pages = list(self._idle)
        self._page_of.clear()
        self._key_of.clear()
        self._idle.clear()
        return pages
