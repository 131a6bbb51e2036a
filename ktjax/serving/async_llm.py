"""AsyncLLM: asyncio front of an LLM's engine loop, for servers and async applications."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams
from ktjax.serving.engine_loop import Delta, RequestHandle


class AsyncLLM:
    """`await generate(prompt, params)` / `async for delta in stream(prompt, params)` on one
    LLM, from any number of tasks; the requests share the engine's steps. Cancelling the
    awaiting task (a client that went away) aborts its requests and frees their pages."""

    def __init__(self, llm):
        self.llm = llm
        self.loop = llm.engine_loop()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.llm._encode(prompt)

    async def stream_many(self, requests: Sequence[tuple[list[int], SamplingParams]],
                          prompt: str | None = None
                          ) -> AsyncIterator[tuple[int, RequestHandle, Delta]]:
        """Submit several requests (e.g. the `n` choices of one API call) and yield
        (index, handle, delta) as they arrive, until all have finished. All are validated
        before any is queued."""
        for ids, params in requests:
            self.loop.engine.validate(ids, params)
        aloop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

        def sink_for(i: int):
            return lambda d: aloop.call_soon_threadsafe(deltas.put_nowait, (i, d))
        handles: list[RequestHandle] = []
        try:
            for i, (ids, params) in enumerate(requests):
                handles.append(self.loop.submit(ids, params, prompt, sink=sink_for(i)))
            left = len(handles)
            while left:
                i, delta = await deltas.get()
                left -= delta.finished
                yield i, handles[i], delta
        finally:  # cancelled, closed early or failed: end what still runs
            for h in handles:
                h.abort()

    async def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
                     ) -> AsyncIterator[Delta]:
        ids = self.encode(prompt)
        text = prompt if isinstance(prompt, str) else None
        async for _, _, delta in self.stream_many([(ids, params or SamplingParams())], text):
            yield delta

    async def generate(self, prompt: str | Sequence[int],
                       params: SamplingParams | None = None) -> RequestOutput:
        ids = self.encode(prompt)
        text = prompt if isinstance(prompt, str) else None
        handle = None
        async for _, handle, _ in self.stream_many([(ids, params or SamplingParams())], text):
            pass
        return handle.output()
