"""The engine loop behind LLM.submit and AsyncLLM: concurrent requests from threads and tasks,
aborts that free pages, failures that leave the loop usable, top log-probabilities."""
import asyncio
import threading
import time

import numpy as np
import pytest

from ktjax import SamplingParams
from ktjax.errors import RequestError
from ktjax.serving.async_llm import AsyncLLM
from reference import ktjax_logits

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, int(k)).tolist() for k in rng.integers(3, 30, n)]


def _assert_pages_free(engine, timeout=10.0):
    """Every page back in the pool (aborts land at the loop's next step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.pool.used_pages == 0 and not engine.has_work():
            return
        time.sleep(0.02)
    raise AssertionError(f"{engine.pool.used_pages} pages still held")


def test_submits_from_threads_match_requests_run_alone(tiny_llm):
    prompts = _prompts(8)
    alone = [tiny_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    results = [None] * len(prompts)

    def client(i):
        handle = tiny_llm.submit(prompts[i], GREEDY)
        streamed = [t for d in handle for t in d.token_ids]
        results[i] = (streamed, handle.output().token_ids, handle.output().finish_reason)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (streamed, final, reason), expected in zip(results, alone):
        assert streamed == final == expected and reason == "length"
    _assert_pages_free(tiny_llm.engine)


def test_abort_mid_stream_frees_pages_and_others_finish(tiny_llm):
    victim = tiny_llm.submit(_prompts(1, 1)[0], LONG)
    other = tiny_llm.submit(_prompts(1, 2)[0], GREEDY)
    deltas = iter(victim)
    next(deltas)
    victim.abort()
    rest = list(deltas)
    assert rest[-1].finish_reason == "abort" and victim.output().finish_reason == "abort"
    assert len(victim.output().token_ids) < LONG.max_tokens
    assert other.result().token_ids == tiny_llm.generate([_prompts(1, 2)[0]],
                                                         GREEDY)[0].token_ids
    _assert_pages_free(tiny_llm.engine)


def test_bad_request_fails_on_submit_and_the_loop_goes_on(tiny_llm):
    with pytest.raises(RequestError, match="prompt has"):
        tiny_llm.submit([5] * tiny_llm.engine.max_model_len, GREEDY)
    with pytest.raises(RequestError, match="vocabulary"):
        tiny_llm.submit([10**9], GREEDY)
    assert len(tiny_llm.submit([5, 6, 7], GREEDY).result().token_ids) == 10


def test_a_failing_step_ends_its_requests_with_the_error(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    real_step = engine.programs.step
    calls = []

    def failing_step(*args, **kwargs):
        program = real_step(*args, **kwargs)

        def run(*operands):
            calls.append(1)
            if len(calls) == 3:  # a decode step: the request holds pages and cached tokens
                raise RuntimeError("injected step failure")
            return program(*operands)
        return run
    monkeypatch.setattr(engine.programs, "step", failing_step)
    last = list(tiny_llm.submit([5, 6, 7], LONG))[-1]
    assert last.finish_reason == "abort" and "injected step failure" in last.error
    assert tiny_llm.submit([5, 6, 7], GREEDY).result().finish_reason == "length"
    _assert_pages_free(engine)


def test_async_streams_share_steps_and_cancel_aborts(tiny_llm):
    prompts = _prompts(4, 3)
    alone = [tiny_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    allm = AsyncLLM(tiny_llm)

    async def collect(p):
        return [t async for d in allm.stream(p, GREEDY) for t in d.token_ids]

    async def cancelled():
        async for _ in allm.stream([9, 8, 7], LONG):
            raise asyncio.CancelledError  # as a client task cancelled mid-stream

    async def main():
        victim = asyncio.ensure_future(cancelled())
        outs = await asyncio.gather(*(collect(p) for p in prompts))
        with pytest.raises(asyncio.CancelledError):
            await victim
        whole = await allm.generate(prompts[0], GREEDY)
        return outs, whole
    outs, whole = asyncio.run(main())
    assert outs == alone and whole.token_ids == alone[0]
    _assert_pages_free(tiny_llm.engine)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_top_logprobs_follow_the_full_forward(tiny_llm, tiny_llama_path, temperature):
    prompt = _prompts(1, 5)[0]
    params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True,
                            logprobs=True, top_logprobs=4, seed=3)
    out = tiny_llm.submit(prompt, params).result()
    ids = prompt + out.token_ids
    ref = _log_softmax(ktjax_logits(tiny_llama_path, np.array(ids))[len(prompt) - 1:-1])
    for step, top in enumerate(out.top_logprobs):
        tokens, lps = zip(*top)
        assert list(tokens) == np.argsort(-ref[step], kind="stable")[:4].tolist()
        np.testing.assert_allclose(lps, ref[step][list(tokens)], atol=1e-4)
    if temperature == 0:
        assert [t[0][0] for t in out.top_logprobs] == out.token_ids


def test_top_logprobs_needs_logprobs():
    with pytest.raises(RequestError, match="top_logprobs"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(RequestError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)


def test_submit_alongside_the_blocking_stream_api(tiny_llm):
    """Steps run by LLM.stream advance submitted requests too; their handles still end."""
    handle = tiny_llm.submit([5, 6, 7], GREEDY)
    text = "".join(tiny_llm.stream([8, 9, 10], SamplingParams(temperature=0, max_tokens=30,
                                                               ignore_eos=True)))
    done = threading.Thread(target=handle.result, daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive() and handle.output().token_ids == \
        tiny_llm.generate([[5, 6, 7]], GREEDY)[0].token_ids and text
    _assert_pages_free(tiny_llm.engine)
