"""One thread owns the engine: requests from any thread are queued, admitted between steps and
streamed back through per-request handles.

Only the Engine's public methods are used (validate, add_request, abort, step, has_work), so the
loop keeps working whatever the scheduler inside `step` does: after each step every live
request's new tokens are read off its Sequence (one token per step or several)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from ktjax.errors import KtjaxError
from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams

log = logging.getLogger("ktjax.serving")

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds of steps


@dataclass
class Delta:
    """What one request gained in one step. `finish_reason` is set on its last delta;
    `error` names the failure of a request that ended with 'abort' because a step failed."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """A submitted request. Iterate it (from any one thread) for its Deltas; `abort()` from any
    thread ends it and frees its pages at the next step."""

    def __init__(self, loop: "EngineLoop", prompt_ids: list[int], params: SamplingParams,
                 prompt: str | None, sink: Callable[[Delta], None] | None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt = prompt
        self.seq = None                     # the engine's Sequence, once admitted by the loop
        self.finished = False
        self._loop = loop
        self._sent = 0                      # output tokens already delivered
        self._queue: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._sink = sink or self._queue.put

    def abort(self) -> None:
        if not self.finished:
            self._loop.abort(self)

    def __iter__(self) -> Iterator[Delta]:
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finished:
                return

    def result(self) -> RequestOutput:
        """Wait for the end (iterating the deltas) and return the whole output."""
        for _ in self:
            pass
        return self.output()

    def output(self) -> RequestOutput:
        return self.seq.output()

    # ---- called on the loop thread --------------------------------------------------------
    def _deliver(self, delta: Delta) -> None:
        if delta.finished:
            self.finished = True
        self._sink(delta)

    def _take_delta(self) -> Delta | None:
        """The tokens and text the Sequence gained since the last delivery, if any."""
        s = self.seq
        n = len(s.output_ids)
        text = s.take_new_text()
        if n == self._sent and not text and not s.finished:
            return None
        top = getattr(s, "top_logprobs", None)
        delta = Delta(token_ids=s.output_ids[self._sent:n], logprobs=s.logprobs[self._sent:n],
                      top_logprobs=top[self._sent:n] if top else [], text=text,
                      finish_reason=s.finish_reason)
        self._sent = n
        return delta


class EngineLoop:
    """Runs `engine.step()` on its own thread while any request is live.

    `lock` is held around every use of the engine, so callers that drive the same engine
    directly (LLM.generate) take turns with the loop instead of racing it."""

    def __init__(self, engine, lock: threading.Lock | None = None):
        self.engine = engine
        self._lock = lock or threading.Lock()
        self._pending: deque[RequestHandle] = deque()   # submitted, not yet added
        self._aborts: deque[RequestHandle] = deque()
        self._live: list[RequestHandle] = []
        self._wake = threading.Event()
        self._stopped = False
        # counters read by /metrics
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished_requests = 0
        self.failed_steps = 0
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._rate_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ktjax-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
               sink: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Queue a request; raises RequestError / OutOfMemoryError at once for one that can
        never run. `sink`, when given, receives each Delta on the loop thread (it must not
        block) instead of the handle's own queue."""
        if self._stopped:
            raise KtjaxError("the engine loop is stopped")
        self.engine.validate(prompt_ids, params)  # reads only fixed sizes: safe off the loop
        handle = RequestHandle(self, list(prompt_ids), params, prompt, sink)
        self._pending.append(handle)
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        self._aborts.append(handle)
        self._wake.set()

    @property
    def queue_length(self) -> int:
        """Requests submitted but not yet running."""
        return len(self._pending) + len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._rate_lock:
            return sum(n for t, n in self._rate if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S

    def stop(self) -> None:
        """Abort every live request and end the thread."""
        self._stopped = True
        self._wake.set()
        self._thread.join()

    # ---- the loop thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                self._shutdown()
                return
            with self._lock:
                self._admit()
                self._apply_aborts()
                busy = self._step_once()
            if busy or self._pending or self._aborts:
                self._wake.set()

    def _admit(self) -> None:
        while self._pending:
            h = self._pending.popleft()
            try:
                h.seq = self.engine.add_request(h.prompt_ids, h.params, h.prompt)
            except KtjaxError as e:  # validated on submit; a changed engine may still refuse
                h._deliver(Delta([], [], [], "", "abort", str(e)))
                continue
            self.prompt_tokens += len(h.prompt_ids)
            self._live.append(h)

    def _apply_aborts(self) -> None:
        seqs = []
        while self._aborts:
            h = self._aborts.popleft()
            if h.seq is not None and not h.finished:
                seqs.append(h.seq)
        if seqs:
            self.engine.abort(seqs)
            self._emit()

    def _step_once(self) -> bool:
        error = None
        if self.engine.has_work():
            try:
                self.engine.step()
            except Exception as e:  # the engine aborted the step's requests, stays usable
                log.exception("engine step failed")
                self.failed_steps += 1
                error = f"{type(e).__name__}: {e}"
        if self._live:  # also what another caller's steps (LLM.stream) produced
            self._emit(error)
        return self.engine.has_work()

    def _emit(self, error: str | None = None) -> None:
        live, tokens = [], 0
        for h in self._live:
            delta = h._take_delta()
            if delta is None:
                live.append(h)
                continue
            tokens += len(delta.token_ids)
            if delta.finished:
                self.finished_requests += 1
                if delta.finish_reason == "abort":
                    delta.error = error
            else:
                live.append(h)
            h._deliver(delta)
        self._live = live
        self.generated_tokens += tokens
        now = time.monotonic()
        with self._rate_lock:
            self._rate.append((now, tokens))
            while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()

    def _shutdown(self) -> None:
        with self._lock:
            self._admit()
            seqs = [h.seq for h in self._live if h.seq is not None]
            if seqs:
                self.engine.abort(seqs)
            self._emit("the engine loop stopped")
