"""The engine: runs the steps the scheduler plans (decode rows, draft verification and prefill
chunks packed into one compiled program per bucket), samples, and applies the results."""
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
from ktjax.engine.programs import Full, Greedy, ProgramCache, Sampler, Verify
from ktjax.engine.sampler import SamplingBatch, split_seed
from ktjax.engine.scheduler import Scheduler, StepPlan
from ktjax.engine.sequence import Sequence
from ktjax.engine.spec_decode import accept_greedy, accept_sampled
from ktjax.errors import RequestError
from ktjax.host.moe_async import raise_host_errors
from ktjax.models.base import Batch, KVCacheSpec
from ktjax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

PENALTY_WINDOW = 64


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def penalty_window(seqs: list[Sequence]) -> int:
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
    return Full(penalty_window(seqs), top)


def _alternatives(s: Sequence, top, row: int) -> list[tuple[int, float]] | None:
    """The k most likely tokens of logit row `row` when `s` asked for k alternatives."""
    k = s.params.top_logprobs
    if not k or top is None:
        return None
    return list(zip(top[0][row, :k].tolist(), top[1][row, :k].tolist()))


class Engine:
    """Owns the KV cache, the page pool, the compiled programs and the scheduler (which holds
    the request queues); `drafter` proposes draft tokens for speculative decoding."""

    def __init__(self, forward, params: dict, *, cache: KVCacheSpec, vocab_size: int, tokenizer,
                 config: EngineConfig, identity: bytes = b"", drafter=None):
        """`config` resolved (EngineConfig.resolve): every size, the dtype and device set.
        `identity`: what shapes the model's KV besides the config (the model file), for the
        prefix cache's keys."""
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
        self.drafter = drafter
        spec_tokens = config.spec_tokens if drafter is not None else 0
        prefix_identity = identity + repr(config).encode() if config.prefix_caching else None
        self.scheduler = Scheduler(self.pool, max_step_tokens=config.max_step_tokens,
                                   spec_tokens=spec_tokens, identity=prefix_identity)
        self._next_id = 0
        self._abort_requests: deque[Sequence] = deque()  # from any thread, see request_abort

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

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
            self.scheduler.add(seq)
        return seq

    def abort(self, seqs: list[Sequence]) -> None:
        """End `seqs` now (finish_reason 'abort' unless finished already), giving back their
        KV pages. The caller owns the engine (no step is running)."""
        with deferred_interrupts():
            for s in seqs:
                if not s.finished:
                    s.finish_reason = "abort"
            self.scheduler.remove(seqs)
            if self.drafter is not None:
                self.drafter.forget(seqs)

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

    def precompile(self) -> None:
        """Compile, under one progress bar, the step programs the queued requests will start
        with: their first prefill chunks (with their sampler if they complete a prompt) and
        the first decode step (with their sampler)."""
        seqs = self.waiting + self.running
        if not seqs:
            return
        sampler = _sampler(seqs)
        # the scheduler's first step: chunks of the first requests, padded to one length
        unit, budget = self.scheduler.chunk_unit, self.scheduler.max_step_tokens
        lens = [len(s.prompt_ids) for s in seqs]
        tokens, rows = bk.round_up(bk.PREFILL_TOKENS, min(lens[0], unit)), 1
        for n in lens[1:bk.PREFILL_ROWS[-1]]:
            padded = bk.round_up(bk.PREFILL_TOKENS, max(tokens, min(n, unit)))
            if bk.round_up(bk.PREFILL_ROWS, rows + 1) * padded > budget:
                break
            tokens, rows = padded, rows + 1
        completes = any(n <= unit for n in lens[:rows])
        decode_pages = self._context_pages(max(lens))
        first = [(bk.StepBucket(0, bk.round_up(bk.PREFILL_ROWS, rows), tokens,
                                self._context_pages(0)), sampler if completes else None),
                 (bk.StepBucket(bk.round_up(bk.DECODE_ROWS, min(len(seqs), bk.DECODE_ROWS[-1])),
                                0, 0, decode_pages), sampler)]
        # Programs exported artifacts hold are loaded when first stepped instead: a load
        # takes milliseconds, and the first token waits only for the prefill's.
        self.programs.compile([k for k in first if not self.programs.sourced(("step", *k))])

    def _context_pages(self, cached: int) -> int:
        """The page bucket of a step whose rows hold up to `cached` tokens before it: attention
        reads only those pages (the step's own tokens come from registers and are written
        through `slots`), so a first prefill chunk attends over no cached pages at all."""
        return bk.page_bucket(self.pool.pages_for(cached), self.max_pages)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict[str, float]:
        """Gauges and counters for monitoring: queue lengths, KV pages in use, prefix-cache
        hits (pages looked up / found), preemptions, compiled step programs."""
        prefix = self.pool.prefix
        return {"waiting": len(self.waiting), "running": len(self.running),
                "kv_pages_used": self.pool.used_pages, "kv_pages_total": self.pool.n_pages - 1,
                "prefix_queried_pages": prefix.queried_pages, "prefix_hit_pages": prefix.hit_pages,
                "preemptions": self.scheduler.preemptions,
                "step_programs": self.programs.n_step_programs}

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the full prompt pages looked up in the prefix cache that were found."""
        prefix = self.pool.prefix
        return prefix.hit_pages / prefix.queried_pages if prefix.queried_pages else 0.0

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that received tokens.

        Any exception escaping the step (a failing program, a KeyboardInterrupt) aborts the
        requests of the step, frees their pages and leaves the engine usable; when the KV
        cache itself was lost with it, every running request is aborted and the cache is
        made anew."""
        self.apply_abort_requests()
        drafts = self._propose()
        plan = self.scheduler.schedule({r: d.tokens for r, d in drafts.items()})
        if plan is None:
            return []
        try:
            return self._run(plan, drafts)
        except BaseException:
            self._recover(plan.seqs)
            raise

    def _propose(self) -> dict:
        """Draft tokens by request id for the rows about to decode (none without a drafter,
        or for a request with penalties: the rejection rule assumes the plain distribution;
        nor in a step where a request asks for alternatives, which verification steps do
        not compute)."""
        if self.drafter is None:
            return {}
        ready = self.scheduler.decode_ready()
        if any(s.params.top_logprobs for s in ready):
            return {}  # a verification step computes no alternatives for anyone
        seqs = [s for s in ready if not _has_penalty(s.params)]
        room = {s.request_id: min(self.scheduler.spec_tokens,
                                  s.max_len - len(s.all_ids) - 1) for s in seqs}
        seqs = [s for s in seqs if room[s.request_id] > 0]
        if not seqs:
            return {}
        return self.drafter.propose(seqs, room)

    def _recover(self, seqs: list[Sequence]) -> None:
        with deferred_interrupts():
            if not self._kv_intact():
                seqs = seqs + self.running
                self.kv = jax.tree.map(
                    lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), self.kv)
                self.pool.reset_prefix_cache()
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

    def _bucket(self, plan: StepPlan) -> bk.StepBucket:
        chunk_tokens = bk.round_up(bk.PREFILL_TOKENS, max(len(t) for _, t in plan.chunks)) \
            if plan.chunks else 0
        return bk.StepBucket(
            decode=bk.round_up(bk.DECODE_ROWS, len(plan.decode)) if plan.decode else 0,
            chunk_rows=bk.round_up(bk.PREFILL_ROWS, len(plan.chunks)) if plan.chunks else 0,
            chunk_tokens=chunk_tokens,
            pages=self._context_pages(max(s.n_cached for s in plan.seqs)),
            verify=plan.verify)

    def _run(self, plan: StepPlan, drafts: dict) -> list[Sequence]:
        """Run the plan's rows in one program: write their tokens, sample the decode rows and
        the chunks that complete a prompt (forward alone when no row samples), verify drafts."""
        bucket = self._bucket(plan)
        batch = self._packed_batch(plan, bucket)
        # logit row -> (sequence, index of its token in the row) of rows that sample
        row_seqs: list[Sequence | None] = [None] * bucket.logit_rows
        offsets = np.zeros(bucket.logit_rows, np.int32)
        draft = np.full(bucket.logit_rows, -1, np.int32)
        for r, (s, toks) in enumerate(plan.decode):
            for j in range(len(toks)):
                row_seqs[r * bucket.verify + j] = s
                offsets[r * bucket.verify + j] = j
                if j + 1 < len(toks):
                    draft[r * bucket.verify + j] = toks[j + 1]
        first_chunk_row = bucket.decode * bucket.verify
        for i, (s, toks) in enumerate(plan.chunks):
            if s.n_cached + len(toks) == s.prefill_target and not s.output_ids:
                row_seqs[first_chunk_row + i] = s
        to_sample = [s for s in row_seqs if s is not None]
        if not to_sample:
            program = self.programs.step(bucket)  # compiles here, interruptibly
            with deferred_interrupts():
                _, self.kv = program(self.params, self.kv, batch)
                for s, toks in plan.chunks:
                    s.n_cached += len(toks)
                    self.scheduler.register_full_pages(s)
            return []
        sampler = _sampler(to_sample)
        operands = ()
        if not isinstance(sampler, Greedy):
            sb = self._sampling_batch(row_seqs, bucket.logit_rows, sampler.window,
                                      self.programs.vocab)
            sb = sb.replace(step=sb.step + offsets)
            operands = (sb,)
            if bucket.verify > 1:
                probs = getattr(self.drafter, "draft_probs", False)
                sampler = Verify(sampler.window, probs)
                operands += (draft,)
                if probs:
                    operands += (self._draft_probs(plan, bucket, drafts),)
        program = self.programs.step(bucket, sampler)
        with deferred_interrupts():  # the cache is donated: take the new one back at once
            tokens, logprobs, *extra, self.kv = program(self.params, self.kv, batch,
                                                        *operands)
        # Waiting for the results may be interrupted: nothing has changed yet but the cache
        # contents past each row's n_cached, which the next step would write again.
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        raise_host_errors()  # a host MoE job of this step (or an earlier chunk) failed
        verdict = jax.tree.map(np.asarray, extra[0]) if isinstance(sampler, Verify) else None
        top = (np.asarray(extra[0]), np.asarray(extra[1])) \
            if not isinstance(sampler, Verify) and sampler.top else None
        with deferred_interrupts():
            for r, (s, toks) in enumerate(plan.decode):
                self._apply_decode(s, toks, r * bucket.verify, tokens, logprobs, verdict, top)
            for i, (s, toks) in enumerate(plan.chunks):
                s.n_cached += len(toks)
                if row_seqs[first_chunk_row + i] is not None:
                    row = first_chunk_row + i
                    s.append(int(tokens[row]), float(logprobs[row]), _alternatives(s, top, row))
            for s in plan.seqs:  # finished ones too: their pages hold valid KV
                self.scheduler.register_full_pages(s)
            done = [s for s in plan.seqs if s.finished]
            if done:
                self.scheduler.retire(done)
                if self.drafter is not None:
                    self.drafter.forget(done)
        return list(dict.fromkeys(to_sample))  # a row of several tokens counts once

    def _apply_decode(self, s: Sequence, toks: list[int], row: int, tokens: np.ndarray,
                      logprobs: np.ndarray, verdict, top) -> None:
        """Append what a decode row emits: its drafts that pass, then the target's token at
        the first rejection (or after the last draft)."""
        drafts = toks[1:]
        if verdict is None:  # greedy: a draft passes iff it is the target's argmax
            n = accept_greedy(drafts, tokens[row:row + len(drafts)].tolist())
            emitted = [(int(tokens[row + j]), float(logprobs[row + j]),
                        _alternatives(s, top, row + j)) for j in range(n + 1)]
        else:  # no alternatives: steps with drafts have none asked (Engine._propose)
            n = accept_sampled(verdict.accept[row:row + len(drafts)].tolist())
            emitted = [(d, float(verdict.draft_logprob[row + j]), None)
                       for j, d in enumerate(drafts[:n])]
            last = row + n
            emitted.append((int(tokens[last]), float(logprobs[last]), None) if n == len(drafts)
                           else (int(verdict.residual[last]),
                                 float(verdict.residual_logprob[last]), None))
        s.drafted += len(drafts)
        s.accepted += n
        s.n_cached += 1 + n
        for token, lp, alternatives in emitted:
            s.append(token, lp, alternatives)
            if s.finished:
                break

    def _draft_probs(self, plan: StepPlan, bucket: bk.StepBucket, drafts: dict) -> np.ndarray:
        """The drafter's distribution of each logit row's draft token [R, V] (zeros where
        none)."""
        q = np.zeros((bucket.logit_rows, self.programs.vocab), np.float32)
        for r, (s, toks) in enumerate(plan.decode):
            d = drafts.get(s.request_id)
            if d is not None and d.probs is not None:
                m = len(toks) - 1
                q[r * bucket.verify:r * bucket.verify + m] = d.probs[:m]
        return q

    def _packed_batch(self, plan: StepPlan, bucket: bk.StepBucket) -> Batch:
        """The plan's rows in the bucket's packed layout (models.base.Batch with segments)."""
        n, rows = bucket.tokens, bucket.rows
        tok = np.zeros((1, n), np.int32)
        pos = np.full((1, n), -1, np.int32)
        slots = np.full((1, n), SCRATCH_PAGE, np.int32)
        tables = np.full((rows, bucket.pages), SCRATCH_PAGE, np.int32)
        lens = np.zeros(rows, np.int32)
        logits = np.zeros((1, bucket.logit_rows), np.int32)
        width = bucket.verify
        placed = [(r, r * width, s, t) for r, (s, t) in enumerate(plan.decode)]
        base = bucket.decode * width
        placed += [(bucket.decode + i, base + i * bucket.chunk_tokens, s, t)
                   for i, (s, t) in enumerate(plan.chunks)]
        for row, at, s, toks in placed:
            k, start = len(toks), s.n_cached
            tok[0, at:at + k] = toks
            pos[0, at:at + k] = np.arange(start, start + k)
            slots[0, at:at + k] = [s.table.slot(p) for p in range(start, start + k)]
            context = s.table.pages[:bucket.pages]  # pages past the bucket hold only new tokens
            tables[row, :len(context)] = context
            lens[row] = start
        logits[0, :base] = np.arange(base)
        for i, (s, toks) in enumerate(plan.chunks):
            logits[0, base + i] = base + i * bucket.chunk_tokens + len(toks) - 1
        return Batch(tokens=tok, positions=pos, slots=slots, block_tables=tables,
                     cache_lens=lens, logits_index=logits, segments=bucket.segments)

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
    def score(self, ids: list[int], with_greedy: bool = False
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """log p(ids[i + 1] | ids[:i + 1]) for every i, in prefill chunks (for perplexity);
        with_greedy: also the most likely token after each ids[:i + 1]."""
        self.validate(ids, SamplingParams(max_tokens=1))
        if self.running or self.waiting:
            raise RequestError("score() needs an idle engine")
        table = BlockTable(self.pool)
        out, greedy = [], []
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
                    logprobs, top, self.kv = program(self.params, self.kv, batch, targets)
                out.append(np.asarray(logprobs[0, :len(nxt)]))
                greedy.append(np.asarray(top[0, :len(nxt)]))
                raise_host_errors()
        except BaseException:
            self._recover([])
            raise
        finally:
            table.release()
        return (np.concatenate(out), np.concatenate(greedy)) if with_greedy else \
            np.concatenate(out)

    # ---- driving --------------------------------------------------------------------------
    def run_until_done(self) -> Iterator[list[Sequence]]:
        while self.has_work():
            yield self.step()
