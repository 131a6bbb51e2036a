"""Which tokens each engine step runs (vLLM v1's policy): every step has a token budget;
running decodes go first (one token each, or 1 + their draft tokens), prefill chunks fill the
rest, so a long prompt never stalls the running streams. KV pages are taken as tokens are
written; when the pool runs dry the newest running request is preempted (its pages given
back, its tokens recomputed when it is admitted again). Full pages are offered to the prefix
cache, and a request's prompt starts from the longest cached prefix."""
from __future__ import annotations

from dataclasses import dataclass, field

from ktjax.engine import buckets as bk
from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.kv_cache import PagePool
from ktjax.engine.prefix_cache import chain_hashes
from ktjax.engine.sequence import Sequence
from ktjax.errors import KtjaxError

MAX_RUNNING = bk.DECODE_ROWS[-1]   # every running request decodes in each step


@dataclass
class StepPlan:
    """One step: decode rows (the last token, then any draft tokens) and prefill chunks,
    with their pages already in the tables. `verify`: tokens per decode row in the bucket."""

    decode: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    chunks: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    verify: int = 1

    @property
    def seqs(self) -> list[Sequence]:
        return [s for s, _ in self.decode + self.chunks]


class Scheduler:
    """The request queues and the per-step choice of rows; owns the pages of its requests.

    max_step_tokens: the budget of new tokens per step. spec_tokens: the draft tokens a
    decode row may verify (its bucket width is 1 + spec_tokens when any row has drafts).
    identity: what the prefix cache keys are chained from (None: no prefix caching).
    """

    def __init__(self, pool: PagePool, *, max_step_tokens: int, spec_tokens: int = 0,
                 identity: bytes | None = None):
        if max_step_tokens < bk.PREFILL_TOKENS[0] + (1 + spec_tokens):
            raise KtjaxError(f"max_step_tokens {max_step_tokens} leaves no room for a prefill "
                             f"chunk of {bk.PREFILL_TOKENS[0]} tokens beside a decode row")
        self.pool = pool
        self.max_step_tokens = max_step_tokens
        self.spec_tokens = spec_tokens
        self.identity = identity
        # Chunks end at multiples of chunk_unit, whatever else the step holds (a quarter of
        # the budget leaves room for decode rows). Where a prompt is cut does not change its
        # bits on CPU (the host attention kernel folds keys by position, wherever they come
        # from), but elsewhere it may: fixed cuts keep a prompt's output independent of its
        # neighbours there too (docs/kernel-notes.md#scheduler).
        self.chunk_unit = max([t for t in bk.PREFILL_TOKENS if t <= max_step_tokens // 4] or
                              [bk.PREFILL_TOKENS[0]])
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ---- queues ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seqs: list[Sequence]) -> None:
        """Take `seqs` out of the queues, their pages back at once."""
        gone = set(map(id, seqs))
        for s in seqs:
            s.table.release()
        self.waiting = [s for s in self.waiting if id(s) not in gone]
        self.running = [s for s in self.running if id(s) not in gone]

    def decode_ready(self) -> list[Sequence]:
        """The running requests the next step decodes (before any preemption)."""
        return [s for s in self.running if not s.in_prefill][:MAX_RUNNING]

    # ---- planning -------------------------------------------------------------------------
    def schedule(self, drafts: dict[int, list[int]] | None = None) -> StepPlan | None:
        """The next step's rows (None: nothing to run); `drafts`: draft tokens by request
        id for decode rows."""
        with deferred_interrupts():  # tables, queues and the pool change together
            while True:
                plan = self._plan(drafts or {})
                if plan.decode or plan.chunks or not self.running:
                    return plan if plan.decode or plan.chunks else None
                # every running request is mid-prefill and the pool is full: free the newest
                self._preempt(self.running[-1])

    def _plan(self, drafts: dict[int, list[int]]) -> StepPlan:
        plan = StepPlan()
        ready = self.decode_ready()
        if any(drafts.get(s.request_id) for s in ready):
            plan.verify = 1 + self.spec_tokens
        ready = ready[: self.max_step_tokens // plan.verify]
        for s in ready:
            if s not in self.running:  # preempted for an older one
                continue
            toks = [s.output_ids[-1]] + drafts.get(s.request_id, [])[: plan.verify - 1]
            if self._make_room(s, s.n_cached + len(toks)):
                plan.decode.append((s, toks))
        if not any(len(t) > 1 for _, t in plan.decode):
            plan.verify = 1
        room = self.max_step_tokens - len(plan.decode) * plan.verify
        self._plan_chunks(plan, room)
        return plan

    def _plan_chunks(self, plan: StepPlan, room: int) -> None:
        """Prefill chunks within `room` tokens: requests mid-prefill first, then new ones
        (first come, first served), as many as fit padded to one chunk length. Beside decode
        rows, one chunk (the bucket set stays small)."""
        fitting = [t for t in bk.PREFILL_TOKENS if t <= room]
        if not fitting:
            return
        max_rows = 1 if plan.decode else bk.PREFILL_ROWS[-1]
        cap, tokens = fitting[-1], 0
        for s in [s for s in self.running if s.in_prefill] + [None] * len(self.waiting):
            if len(plan.chunks) == max_rows:
                break
            if s is None:  # the next waiting request, if it can start
                s = self._admit()
                if s is None:
                    break
            elif s not in self.running:
                continue
            room_pages = len(s.table.pages) + self.pool.free_pages
            n = min(s.prefill_target - s.n_cached, cap,
                    self.chunk_unit - s.n_cached % self.chunk_unit,
                    room_pages * self.pool.page_size - s.n_cached)
            if n <= 0:
                continue
            padded = bk.round_up(bk.PREFILL_TOKENS, max(tokens, n))
            if plan.chunks and bk.round_up(bk.PREFILL_ROWS, len(plan.chunks) + 1) * padded > \
                    room:
                break
            tokens = padded
            s.table.ensure(s.n_cached + n)
            plan.chunks.append((s, s.all_ids[s.n_cached:s.n_cached + n]))

    def _admit(self) -> Sequence | None:
        """Move the first waiting request to running, starting from its cached prefix, when
        it can take at least the pages of that prefix and one more."""
        if not self.waiting or len(self.running) >= MAX_RUNNING:
            return None
        s = self.waiting[0]
        hits = self._cached_prefix(s)
        idle = sum(1 for p in hits if self.pool.is_idle(p))
        if idle + 1 > self.pool.free_pages:
            return None
        s.table.share(hits)
        s.n_cached = s.n_registered = len(hits)
        s.n_cached *= self.pool.page_size
        self.waiting.pop(0)
        self.running.append(s)
        return s

    def _cached_prefix(self, s: Sequence) -> list[int]:
        """Pages of the longest cached prefix of the tokens `s` must write, leaving at least
        one to run (its logits start the generation)."""
        if self.identity is None:
            return []
        ps = self.pool.page_size
        s.page_keys = chain_hashes(s.all_ids[: s.prefill_target], ps, self.identity,
                                   s.page_keys)
        return self.pool.prefix.lookup(s.page_keys[: (s.prefill_target - 1) // ps])

    def _make_room(self, s: Sequence, n_tokens: int) -> bool:
        """Pages for `s` up to n_tokens, preempting the newest requests while the pool is
        short; False when `s` itself was the newest and is preempted."""
        while s.table.missing(n_tokens) > self.pool.free_pages:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is s:
                return False
        s.table.ensure(n_tokens)
        return True

    def _preempt(self, s: Sequence) -> None:
        """Recompute later: pages back (full ones stay cached), first in the waiting line."""
        s.table.release()
        s.n_cached = s.n_registered = 0
        s.preempted += 1
        self.preemptions += 1
        self.running.remove(s)
        self.waiting.insert(0, s)

    # ---- after a step ---------------------------------------------------------------------
    def register_full_pages(self, s: Sequence) -> None:
        """Offer the pages `s` filled to the prefix cache."""
        ps = self.pool.page_size
        full = s.n_cached // ps
        if self.identity is None or full <= s.n_registered:
            return
        s.page_keys = chain_hashes(s.all_ids[: full * ps], ps, self.identity, s.page_keys)
        for i in range(s.n_registered, full):
            self.pool.prefix.register(s.table.pages[i], s.page_keys[i])
        s.n_registered = full

    def retire(self, seqs: list[Sequence]) -> None:
        """Finished requests leave the running set, their pages back."""
        self.remove(seqs)
