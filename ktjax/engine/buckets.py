"""Shape buckets: every step is padded up to one of a few shapes, each compiled once."""
from __future__ import annotations

from dataclasses import dataclass

PREFILL_TOKENS = (16, 32, 64, 128, 256, 512)   # new tokens per row in a prefill step
PREFILL_ROWS = (1, 2, 4, 8)
MAX_PREFILL_BATCH_TOKENS = 2048                 # rows * tokens of one prefill step (scoring)
DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64)
MIN_CONTEXT_PAGES = 8                           # smallest context bucket, in pages


@dataclass(frozen=True, order=True)
class Bucket:
    """rows B x tokens T new tokens, P pages of context per row, R logit rows per row."""

    rows: int
    tokens: int
    pages: int
    logit_rows: int = 1

    @property
    def kind(self) -> str:
        return "decode" if self.tokens == 1 else "prefill"

    def __str__(self) -> str:
        return f"{self.kind} B={self.rows} T={self.tokens} P={self.pages} R={self.logit_rows}"


@dataclass(frozen=True, order=True)
class StepBucket:
    """A packed engine step (models.base.Batch with segments): `decode` rows of `verify`
    tokens each (1, or 1 + draft tokens when speculating), then `chunk_rows` prefill chunks
    of `chunk_tokens`; P context pages per row. Every decode token and the last token of
    each chunk gets a logit row."""

    decode: int
    chunk_rows: int
    chunk_tokens: int
    pages: int
    verify: int = 1

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        segs = ((self.decode, self.verify), (self.chunk_rows, self.chunk_tokens))
        return tuple(s for s in segs if s[0])

    @property
    def rows(self) -> int:
        return self.decode + self.chunk_rows

    @property
    def tokens(self) -> int:
        return self.decode * self.verify + self.chunk_rows * self.chunk_tokens

    @property
    def logit_rows(self) -> int:
        return self.decode * self.verify + self.chunk_rows

    @property
    def kind(self) -> str:
        return "mixed" if self.decode and self.chunk_rows else \
            ("decode" if self.decode else "prefill")

    def __str__(self) -> str:
        return (f"{self.kind} D={self.decode}x{self.verify} "
                f"C={self.chunk_rows}x{self.chunk_tokens} P={self.pages}")


def round_up(choices: tuple[int, ...], n: int) -> int:
    """Smallest choice >= n (the largest if none is)."""
    for c in choices:
        if c >= n:
            return c
    return choices[-1]


def page_bucket(n_pages: int, max_pages: int) -> int:
    """Context pages rounded up to a power of two (at least MIN_CONTEXT_PAGES, so short
    generations share one program), capped at the per-sequence maximum."""
    p = MIN_CONTEXT_PAGES
    while p < n_pages:
        p *= 2
    return min(p, max_pages)
