"""The engine: admits requests, builds bucketed prefill/decode steps, runs the compiled
programs and samples. Prefill goes first (in chunks for long prompts); otherwise every running
sequence decodes one token per step."""
from __future__ import annotations

import os
from collections import deque
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.engine import buckets as bk
from ktjax.engine.config import EngineConfig
from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.kv_cache import (SCRATCH_PAGE, BlockTable, PagePool, cache_bytes,
                                   make_kv_cache)
from ktjax.engine.programs import Full, Greedy, ProgramCache, Sampler
from ktjax.engine.sampler import SamplingBatch, split_seed
from ktjax.engine.sequence import Sequence
from ktjax.errors import RequestError
from ktjax.host.moe_async import raise_host_errors
from ktjax.models.base import Batch, KVCacheSpec
from ktjax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

PENALTY_WINDOW = 64


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def _penalty_window(seqs: list[Sequence]) -> int:
    """Penalty window of a step: PENALTY_WINDOW, or a power of two holding a longer one."""
    window = PENALTY_WINDOW
    for s in seqs:
        if s.params.penalty_last_n == -1 or s.params.penalty_last_n > window:
            # a sequence holds at most max_len tokens: a larger window would only pad
            n = len(s.all_ids) if s.params.penalty_last_n == -1 else \
                min(s.params.penalty_last_n, s.max_len)
            window = max(window, 1 << (n - 1).bit_length())
    return window


def _sampler(seqs: list[Sequence]) -> Sampler:
    """The sampler fused into a step that samples `seqs`: argmax-only when all are greedy."""
    # one top-k size for every request that asks for alternatives: one program variant
    top = MAX_TOP_LOGPROBS if any(s.params.top_logprobs for s in seqs) else 0
    if all(s.params.temperature == 0 and not _has_penalty(s.params) for s in seqs):
        return Greedy(any(s.params.logprobs for s in seqs), top)
    return Full(_penalty_window(seqs), top)


class Engine:
    """Owns the KV cache, the page pool, the compiled programs and the request queues."""

    def __init__(self, forward, params: dict, *, cache: KVCacheSpec, vocab_size: int, tokenizer,
                 config: EngineConfig):
        """`config` resolved (EngineConfig.resolve): every size, the dtype and device set."""
        self.params = params
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.page_size = config.page_size
        self.max_pages = -(-self.max_model_len // self.page_size)
        n_pages = -(-config.kv_cache_tokens // self.page_size) + 1  # + the scratch page
        self.pool = PagePool(n_pages, self.page_size)
        self.kv = make_kv_cache(cache, n_pages, self.page_size, config.kv_cache_dtype,
                                config.device)
        self.kv_cache_bytes = cache_bytes(cache, n_pages, self.page_size, config.kv_cache_dtype)
        self.programs = ProgramCache(forward, params, self.kv, vocab_size)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._next_id = 0
        self._abort_requests: deque[Sequence] = deque()  # from any thread, see request_abort

    # ---- requests -------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError/OutOfMemoryError for a request that can never run."""
        if not prompt_ids:
            raise RequestError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                               f"{self.max_model_len} (max_model_len), leaving no room to generate")
        bad = [t for t in prompt_ids if not 0 <= t < self.programs.vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"(0..{self.programs.vocab - 1})")
        self.pool.check_fits(min(len(prompt_ids) + params.max_tokens, self.max_model_len))

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Sequence:
        self.validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        seq = Sequence(self._next_id, prompt, prompt_ids, params, self.pool,
                       self.tokenizer.incremental_decoder(), self.tokenizer.stop_ids,
                       self.max_model_len, seed)
        with deferred_interrupts():
            self._next_id += 1
            self.waiting.append(seq)
        return seq

    def abort(self, seqs: list[Sequence]) -> None:
        """End `seqs` now (finish_reason 'abort' unless finished already), giving back their
        KV pages and reservations. The caller owns the engine (no step is running)."""
        with deferred_interrupts():
            gone = set(map(id, seqs))
            for s in seqs:
                if not s.finished:
                    s.finish_reason = "abort"
                self._release(s)
            self.waiting = [s for s in self.waiting if id(s) not in gone]
            self.running = [s for s in self.running if id(s) not in gone]

    def request_abort(self, seq: Sequence) -> None:
        """Abort `seq` at the start of the next step; safe from any thread and while a step
        runs (a stream closed by the garbage collector in the middle of one)."""
        self._abort_requests.append(seq)

    def apply_abort_requests(self) -> None:
        seqs = []
        while self._abort_requests:
            seqs.append(self._abort_requests.popleft())
        if seqs:
            self.abort(seqs)

    def _release(self, s: Sequence) -> None:
        """Give back a sequence's pages and its admission reservation, once."""
        if s.reserved:
            s.table.release()
            self.pool.release_reservation(s.max_len)
            s.reserved = False

    def precompile(self) -> None:
        """Compile, under one progress bar, the step programs the queued requests will start
        with: their first prefill chunk (with their sampler if it completes a prompt) and the
        first decode step (with their sampler)."""
        seqs = self.waiting + self.running
        if not seqs:
            return
        sampler = _sampler(seqs)
        chunk = min(max(len(s.prompt_ids) for s in seqs), bk.PREFILL_TOKENS[-1])
        tokens = bk.round_up(bk.PREFILL_TOKENS, chunk)
        prefill_rows = min(len(seqs), bk.PREFILL_ROWS[-1], bk.MAX_PREFILL_BATCH_TOKENS // tokens)
        completes = any(len(s.prompt_ids) <= bk.PREFILL_TOKENS[-1] for s in seqs[:prefill_rows])
        decode_pages = self._context_pages(max(len(s.prompt_ids) for s in seqs))
        self.programs.compile([
            (bk.Bucket(bk.round_up(bk.PREFILL_ROWS, prefill_rows), tokens, self._context_pages(0)),
             sampler if completes else None),
            (bk.Bucket(bk.round_up(bk.DECODE_ROWS, min(len(seqs), bk.DECODE_ROWS[-1])), 1,
                       decode_pages), sampler),
        ])

    def _context_pages(self, cached: int) -> int:
        """The page bucket of a step whose rows hold up to `cached` tokens before it: attention
        reads only those pages (the step's own tokens come from registers and are written
        through `slots`), so a first prefill chunk attends over no cached pages at all."""
        return bk.page_bucket(self.pool.pages_for(cached), self.max_pages)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that received a token.

        Any exception escaping the step (a failing program, a KeyboardInterrupt) aborts the
        requests of the step, frees their pages and leaves the engine usable; when the KV
        cache itself was lost with it, every running request is aborted and the cache is
        made anew."""
        self.apply_abort_requests()
        self._admit()
        prefill = [s for s in self.running if s.in_prefill]
        if prefill:
            new, tokens, rows = self._prefill_rows(prefill)
        elif self.running:
            new, tokens, rows = self._decode_rows(self.running[: bk.DECODE_ROWS[-1]])
        else:
            return []
        try:
            return self._run(new, tokens, rows)
        except BaseException:
            self._recover([s for s, _ in new])
            raise

    def _recover(self, seqs: list[Sequence]) -> None:
        with deferred_interrupts():
            if not self._kv_intact():
                seqs = seqs + self.running
                self.kv = jax.tree.map(
                    lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), self.kv)
            self.abort(seqs)

    def _kv_intact(self) -> bool:
        """False when the cache was donated to a program whose result never came back, or
        holds the error of a failed one."""
        try:
            if any(a.is_deleted() for a in jax.tree.leaves(self.kv)):
                return False
            jax.block_until_ready(self.kv)
            return True
        except Exception:
            return False

    def _admit(self) -> None:
        if self.waiting:  # (a decode step skips the signal handler swaps)
            with deferred_interrupts():
                while self.waiting and self.pool.try_reserve(self.waiting[0].max_len):
                    seq = self.waiting.pop(0)
                    seq.reserved = True
                    self.running.append(seq)
        if not self.running and self.waiting:  # cannot happen unless the pool is too small
            raise RuntimeError("no sequence could be admitted")

    def _prefill_rows(self, seqs: list[Sequence]
                      ) -> tuple[list[tuple[Sequence, list[int]]], int, int]:
        chunks = []
        for s in seqs[: bk.PREFILL_ROWS[-1]]:
            n = min(len(s.prompt_ids) - s.n_cached, bk.PREFILL_TOKENS[-1])
            chunks.append((s, n))
        tokens = bk.round_up(bk.PREFILL_TOKENS, max(n for _, n in chunks))
        rows = max(1, min(len(chunks), bk.MAX_PREFILL_BATCH_TOKENS // tokens))
        chunks = chunks[:rows]
        new = [(s, s.prompt_ids[s.n_cached:s.n_cached + n]) for s, n in chunks]
        return new, tokens, bk.round_up(bk.PREFILL_ROWS, len(new))

    @staticmethod
    def _decode_rows(seqs: list[Sequence]
                     ) -> tuple[list[tuple[Sequence, list[int]]], int, int]:
        new = [(s, [s.output_ids[-1]]) for s in seqs]
        return new, 1, bk.round_up(bk.DECODE_ROWS, len(new))

    def _run(self, new: list[tuple[Sequence, list[int]]], tokens: int, rows: int
             ) -> list[Sequence]:
        """Write `new` tokens of each sequence and sample rows whose prompt is complete, in
        one program (forward alone when no row samples)."""
        with deferred_interrupts():
            for s, toks in new:
                s.table.ensure(s.n_cached + len(toks))
        pages = self._context_pages(max(s.n_cached for s, _ in new))
        bucket = bk.Bucket(rows, tokens, pages)
        batch = self._batch([(s.table, s.n_cached, toks) for s, toks in new], rows, tokens,
                            pages)
        # rows whose prompt this step completes sample; the others' tokens are ignored
        seqs = [s if s.n_cached + len(toks) >= len(s.prompt_ids) else None for s, toks in new]
        to_sample = [s for s in seqs if s is not None]
        if not to_sample:
            program = self.programs.step(bucket)  # compiles here, interruptibly
            with deferred_interrupts():
                _, self.kv = program(self.params, self.kv, batch)
                for s, toks in new:
                    s.n_cached += len(toks)
            return []
        sampler = _sampler(to_sample)
        operands = () if isinstance(sampler, Greedy) else \
            (self._sampling_batch(seqs, bucket.rows, sampler.window, self.programs.vocab),)
        program = self.programs.step(bucket, sampler)
        with deferred_interrupts():  # the cache is donated: take the new one back at once
            tokens_, logprobs, *top, self.kv = program(self.params, self.kv, batch, *operands)
        # Waiting for the results may be interrupted: nothing has changed yet but the cache
        # contents past each row's n_cached, which the next step would write again.
        tokens_, logprobs = np.asarray(tokens_), np.asarray(logprobs)
        raise_host_errors()  # a host MoE job of this step (or an earlier chunk) failed
        top_ids, top_lps = (np.asarray(top[0]), np.asarray(top[1])) if top else (None, None)
        with deferred_interrupts():
            for s, toks in new:
                s.n_cached += len(toks)
            for r, s in enumerate(seqs):
                if s is None:
                    continue
                k = s.params.top_logprobs
                s.append(int(tokens_[r]), float(logprobs[r]),
                         list(zip(top_ids[r, :k].tolist(), top_lps[r, :k].tolist()))
                         if k else None)
                if s.finished:
                    self._release(s)
            self.running = [s for s in self.running if not s.finished]
        return to_sample

    @staticmethod
    def _batch(new: list[tuple[BlockTable, int, list[int]]], rows: int, tokens: int,
               pages: int, all_logits: bool = False) -> Batch:
        """Pad (block table, tokens already cached, new tokens) rows to the bucket's arrays."""
        tok = np.zeros((rows, tokens), np.int32)
        pos = np.full((rows, tokens), -1, np.int32)
        slots = np.full((rows, tokens), SCRATCH_PAGE, np.int32)
        tables = np.full((rows, pages), SCRATCH_PAGE, np.int32)
        lens = np.zeros(rows, np.int32)
        last = np.zeros((rows, 1), np.int32)
        for r, (table, start, toks) in enumerate(new):
            n = len(toks)
            tok[r, :n] = toks
            pos[r, :n] = np.arange(start, start + n)
            slots[r, :n] = [table.slot(p) for p in range(start, start + n)]
            context = table.pages[:pages]  # pages past the bucket hold only new tokens
            tables[r, :len(context)] = context
            lens[r] = start
            last[r, 0] = n - 1
        if all_logits:
            last = np.broadcast_to(np.arange(tokens, dtype=np.int32), (rows, tokens))
        # numpy leaves: the compiled program takes them in one call, where a jnp.asarray
        # per array was a dispatch each (docs/kernel-notes.md#step-inputs)
        return Batch(tokens=tok, positions=pos, slots=slots, block_tables=tables,
                     cache_lens=lens, logits_index=last)

    @staticmethod
    def _sampling_batch(seqs: list[Sequence | None], rows: int, window: int,
                        vocab: int) -> SamplingBatch:
        """Each row's parameters, seed, step and last `window` tokens, padded to `rows`. A
        top_k of the vocabulary's size or more keeps every token: it is sent as 0 (off)."""
        cols = {k: np.zeros(rows, np.float32) for k in
                ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")}
        cols["repetition_penalty"] = np.ones(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        step = np.zeros(rows, np.int32)
        seed = np.zeros((rows, 2), np.uint32)
        recent = np.full((rows, window), -1, np.int32)
        for r, s in enumerate(seqs):
            if s is None:
                continue
            p = s.params
            for k in cols:
                cols[k][r] = getattr(p, k)
            top_k[r] = p.top_k if p.top_k < vocab else 0
            step[r], seed[r] = len(s.output_ids), split_seed(s.seed)
            n = len(s.all_ids) if p.penalty_last_n == -1 else min(p.penalty_last_n,
                                                                   len(s.all_ids))
            if n:
                recent[r, :n] = s.all_ids[-n:]
        return SamplingBatch(top_k=top_k, seed=seed, step=step, recent=recent, **cols)

    # ---- scoring --------------------------------------------------------------------------
    def score(self, ids: list[int]) -> np.ndarray:
        """log p(ids[i + 1] | ids[:i + 1]) for every i, in prefill chunks (for perplexity)."""
        self.validate(ids, SamplingParams(max_tokens=1))
        if self.running or self.waiting:
            raise RequestError("score() needs an idle engine")
        table = BlockTable(self.pool)
        out = []
        try:
            for start in range(0, len(ids), bk.PREFILL_TOKENS[-1]):
                chunk = ids[start:start + bk.PREFILL_TOKENS[-1]]
                tokens = bk.round_up(bk.PREFILL_TOKENS, len(chunk))
                table.ensure(start + len(chunk))
                pages = self._context_pages(start)
                batch = self._batch([(table, start, chunk)], 1, tokens, pages, all_logits=True)
                targets = np.zeros((1, tokens), np.int32)
                nxt = ids[start + 1:start + len(chunk) + 1]
                targets[0, :len(nxt)] = nxt
                program = self.programs.scorer(bk.Bucket(1, tokens, pages, tokens))
                with deferred_interrupts():
                    logprobs, self.kv = program(self.params, self.kv, batch, targets)
                out.append(np.asarray(logprobs[0, :len(nxt)]))
                raise_host_errors()
        except BaseException:
            self._recover([])
            raise
        finally:
            table.release()
        return np.concatenate(out)

    # ---- driving --------------------------------------------------------------------------
    def run_until_done(self) -> Iterator[list[Sequence]]:
        while self.has_work():
            yield self.step()
