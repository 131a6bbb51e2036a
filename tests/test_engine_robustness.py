"""The engine survives a failed step, Ctrl-C at any point, threads and abandoned streams: each
leaves the LLM usable, with every KV page and reservation given back."""
import _thread
import os
import random
import signal
import sys
import threading
import time

import jax
import pytest

import ktjax
from ktjax import SamplingParams
from ktjax.errors import KtjaxError

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
PARAMS = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
          SamplingParams(seed=3, max_tokens=5, ignore_eos=True, top_k=5)]


def _tokens(llm, prompts=PROMPTS, params=PARAMS):
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture
def llm(tiny_llm):
    """The shared tiny LLM, checked to be idle with all of its pages free after the test."""
    pool = tiny_llm.engine.pool
    free = pool.free_pages
    yield tiny_llm
    _assert_idle(tiny_llm, free)


def _assert_idle(llm, free_pages):
    engine = llm.engine
    assert not engine.waiting and not engine.running
    assert engine.pool.free_pages == free_pages and engine.pool.used_pages == 0
    assert not any(a.is_deleted() for a in jax.tree.leaves(engine.kv))


class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failing_step_aborts_its_requests(llm, monkeypatch, when):
    """A step program that raises before running, or after running (the donated KV cache
    lost with its result), fails that generate() only: the next one gives the same tokens."""
    want = _tokens(llm)
    real_step = llm.engine.programs.step
    calls = []

    def failing_step(*args, **kwargs):
        program = real_step(*args, **kwargs)

        def run(*operands):
            calls.append(1)
            if len(calls) == 2:  # the second step: sequences hold pages and cached tokens
                if when == "after":
                    program(*operands)
                raise Injected("step failed")
            return program(*operands)
        return run

    monkeypatch.setattr(llm.engine.programs, "step", failing_step)
    with pytest.raises(Injected):
        llm.generate(PROMPTS, PARAMS)
    assert llm.engine.pool.used_pages == 0
    assert _tokens(llm) == want


def test_a_failing_sampling_batch_aborts_its_requests(llm, monkeypatch):
    want = _tokens(llm)

    def fail(*args, **kwargs):
        raise Injected("bad sampling batch")

    monkeypatch.setattr(type(llm.engine), "_sampling_batch", staticmethod(fail))
    with pytest.raises(Injected):
        llm.generate(PROMPTS, PARAMS)
    monkeypatch.undo()
    assert _tokens(llm) == want


def test_extreme_valid_params_run(llm):
    """top_k past the vocabulary keeps every token (sent to the sampler as 'off', not as an
    int32 overflow); a penalty window past the context is capped at the sequence length."""
    base = SamplingParams(seed=11, max_tokens=6, ignore_eos=True)
    off = llm.generate([PROMPTS[0]], base)[0].token_ids
    huge_k = SamplingParams(seed=11, max_tokens=6, ignore_eos=True, top_k=2**31 - 1)
    assert llm.generate([PROMPTS[0]], huge_k)[0].token_ids == off
    window = SamplingParams(seed=11, max_tokens=6, ignore_eos=True, penalty_last_n=10**12,
                            repetition_penalty=1.3)
    assert len(llm.generate([PROMPTS[0]], window)[0].token_ids) == 6


# Lines of the engine package, where the state lives. (Ctrl-C raised by a trace function at
# the line of a `with lock:` can leave the lock held, which a real SIGINT, delivered where
# Python checks for signals, does not: the API's calls are covered by the random SIGINTs.)
_KTJAX = os.path.join(os.path.dirname(ktjax.__file__), "engine")


def _interrupt_at_line(k: int, fn) -> bool:
    """Run fn with Ctrl-C arriving at the k-th line ktjax executes (delivered, as a real
    SIGINT is, wherever Python next checks for signals); True if it was interrupted."""
    seen = 0

    def on_line(frame, event, arg):
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == k:
                _thread.interrupt_main()
        return on_line

    sys.settrace(lambda frame, event, arg:
                 on_line if frame.f_code.co_filename.startswith(_KTJAX) else None)
    try:
        try:
            fn()
        finally:
            sys.settrace(None)
        _land_pending_signal()
    except KeyboardInterrupt:
        return True
    return False


def _land_pending_signal():
    for _ in range(3):
        time.sleep(0)


def _lines_run(fn) -> int:
    seen = 0

    def on_line(frame, event, arg):
        nonlocal seen
        seen += event == "line"
        return on_line

    sys.settrace(lambda frame, event, arg:
                 on_line if frame.f_code.co_filename.startswith(_KTJAX) else None)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_ctrl_c_at_every_line_leaves_the_llm_usable(llm):
    """Ctrl-C at each of the lines a generate() runs in ktjax.engine (prefill, decode,
    sampling, admission, release): the call raises KeyboardInterrupt or finishes, and the next call gives
    the same tokens with every page back."""
    want = _tokens(llm)
    free = llm.engine.pool.free_pages
    n = _lines_run(lambda: _tokens(llm))
    assert n > 500
    interrupted = 0
    for k in range(1, n + 1):
        interrupted += _interrupt_at_line(k, lambda: _tokens(llm))
        _assert_idle(llm, free)
        if k % 16 == 0 or k > n - 8:
            assert _tokens(llm) == want, f"after Ctrl-C at line {k}"
    assert interrupted > n // 2


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_ctrl_c_at_random_times(llm):
    """Real SIGINTs from another thread at random times during generate() (3 of 48 broke the
    engine for good before)."""
    want = _tokens(llm)
    free = llm.engine.pool.free_pages
    t0 = time.perf_counter()
    for _ in range(5):
        _tokens(llm)
    duration = (time.perf_counter() - t0) / 5
    rng = random.Random(0)
    interrupted = 0
    for _ in range(48):
        timer = threading.Timer(rng.uniform(0, duration), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            try:
                _tokens(llm)
            finally:
                timer.join()
            _land_pending_signal()
        except KeyboardInterrupt:
            interrupted += 1
        _assert_idle(llm, free)
        assert _tokens(llm) == want
    assert interrupted > 0


def test_ctrl_c_in_stream(llm):
    want = "".join(llm.stream(PROMPTS[0], PARAMS[0]))
    free = llm.engine.pool.free_pages
    n = _lines_run(lambda: list(llm.stream(PROMPTS[0], PARAMS[0])))
    for k in range(1, n + 1, 3):
        _interrupt_at_line(k, lambda: list(llm.stream(PROMPTS[0], PARAMS[0])))
        _assert_idle(llm, free)
    assert "".join(llm.stream(PROMPTS[0], PARAMS[0])) == want


def test_threads_share_one_llm(llm):
    """Threads calling generate() and stream() on one LLM at once (which corrupted it:
    'Buffer has been deleted or donated') are serialized and get what they get alone."""
    prompts = [[3 + i, 40 + i, 7, 9 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(prompts, params)]
    streamed = "".join(llm.stream(prompts[0], params))
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                out = llm.generate(prompts[i:i + 2], params)
                results.setdefault(i, []).append([o.token_ids for o in out])
                results.setdefault(("stream", i), []).append(
                    "".join(llm.stream(prompts[0], params)))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert results[i] == [alone[i:i + 2]] * 3
        assert results["stream", i] == [streamed] * 3


def test_breaking_out_of_a_stream_aborts_it(llm):
    free = llm.engine.pool.free_pages
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for piece in llm.stream(PROMPTS[0], params):
        break
    _assert_idle(llm, free)
    # two streams interleaved, one abandoned halfway
    a, b = llm.stream(PROMPTS[0], params), llm.stream(PROMPTS[1], params)
    next(a), next(b), next(a)
    a.close()
    assert len("".join(b)) > 0
    _assert_idle(llm, free)


def test_stream_closed_during_another_call_is_aborted_at_the_next_step(llm):
    """A stream closed while another call holds the engine (as the garbage collector may do)
    only requests its abort; the holder's next step applies it."""
    free = llm.engine.pool.free_pages
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    s = llm.stream(PROMPTS[0], params)
    next(s)
    with llm._lock:
        s.close()
        assert len(llm.engine.running) == 1  # not changed under the holder's feet
    llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=2))
    _assert_idle(llm, free)


def test_stream_of_a_request_aborted_by_another_call_raises(llm, monkeypatch):
    """A stream whose request was in another call's failing step ends with an error, not
    with silently truncated text."""
    free = llm.engine.pool.free_pages
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    s = llm.stream(PROMPTS[0], params)
    next(s)
    real_step = llm.engine.programs.step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the new prompt's prefill: a decode step of both
            raise Injected("step failed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(llm.engine.programs, "step", failing_step)
    with pytest.raises(Injected):
        llm.generate([PROMPTS[1]], params)
    monkeypatch.undo()
    with pytest.raises(KtjaxError, match="aborted"):
        list(s)
    _assert_idle(llm, free)
