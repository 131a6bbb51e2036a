"""The OpenAI-compatible HTTP server: Starlette routes over AsyncLLM, SSE streams through
sse-starlette, run by uvicorn.

/v1/completions, /v1/chat/completions (streaming, stop, logprobs with top alternatives, n,
seed, max_tokens, sampling fields), /v1/models, /health, /metrics. With an API key every path
but /health needs `Authorization: Bearer KEY`."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ktjax.errors import KtjaxError
from ktjax.server import metrics
from ktjax.server.protocol import APIError, GenerationRequest, ModelContext, parse_chat, \
    parse_completion
from ktjax.serving.async_llm import AsyncLLM
from ktjax.serving.engine_loop import Delta

log = logging.getLogger("ktjax.server")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class APIKeyMiddleware:
    """Pure ASGI (streams pass through untouched): 401 unless the bearer token matches."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error_response(APIError(
                    401, "a valid API key is required (Authorization: Bearer KEY)",
                    code="invalid_api_key", type="authentication_error"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Choice:
    """What one choice has produced so far, in the response's terms."""

    def __init__(self, index: int, prefix: str = ""):
        self.index = index
        self.text = prefix
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []


class Server:
    """State shared by the routes: the model, its AsyncLLM, the API's names."""

    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.async_llm = AsyncLLM(llm)
        self.model_name = model_name
        self.created = int(time.time())
        self.ctx = ModelContext(name=model_name, max_model_len=llm.engine.max_model_len,
                                encode=llm._encode, chat_prompt=llm.chat_prompt,
                                vocab_size=llm.config.vocab_size)

    # ---- plain endpoints ------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(metrics.render(self.async_llm.loop, self.model_name),
                                 media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "ktjax", "max_model_len": self.ctx.max_model_len}]})

    # ---- generation -----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        req = (parse_chat if chat else parse_completion)(body, self.ctx)
        requests = [(ids, params) for ids, choice_params in zip(req.prompts, req.choice_params)
                    for params in choice_params]
        try:  # reject what the engine would refuse before any response starts
            for ids, params in requests:
                self.async_llm.loop.engine.validate(ids, params)
        except KtjaxError as e:
            raise APIError(400, str(e)) from e
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            return EventSourceResponse(self._sse(req, requests, rid, chat))
        return await _until_disconnect(request, self._whole(req, requests, rid, chat))

    def _prefix(self, req: GenerationRequest, index: int) -> str:
        """The echoed prompt of choice `index` (completions with echo)."""
        if not req.echo:
            return ""
        p = index // req.n
        text = req.prompt_texts[p]
        return text if text is not None else self.llm.tokenizer.decode(req.prompts[p])

    async def _deltas(self, req: GenerationRequest, requests: list
                      ) -> AsyncIterator[tuple[_Choice, Delta]]:
        choices = [_Choice(i, self._prefix(req, i)) for i in range(len(requests))]
        async for i, _, delta in self.async_llm.stream_many(requests):
            if delta.finish_reason == "abort":
                raise APIError(500, f"the request failed: {delta.error or 'aborted'}",
                               type="server_error")
            c = choices[i]
            c.text += delta.text
            c.tokens += len(delta.token_ids)
            c.finish_reason = delta.finish_reason
            if req.top_logprobs is not None:
                tops = delta.top_logprobs or [[] for _ in delta.token_ids]
                c.logprobs += list(zip(delta.token_ids, delta.logprobs, tops))
            yield c, delta

    def _usage(self, req: GenerationRequest, completion_tokens: int) -> dict:
        prompt = sum(len(p) for p in req.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    async def _whole(self, req: GenerationRequest, requests: list, rid: str,
                     chat: bool) -> Response:
        choices: dict[int, _Choice] = {}
        async for c, _ in self._deltas(req, requests):
            choices[c.index] = c
        out = []
        for i in range(len(requests)):
            c = choices[i]
            lp = self._logprobs(req, c.logprobs, chat, len(self._prefix(req, i)))
            if chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": out,
            "usage": self._usage(req, sum(c.tokens for c in choices.values()))})

    async def _sse(self, req: GenerationRequest, requests: list, rid: str,
                   chat: bool) -> AsyncIterator[dict]:
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if chat:  # the role comes first, as OpenAI's streams
            yield {"data": json.dumps({**head, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(len(requests))]})}
        offsets = [len(self._prefix(req, i)) for i in range(len(requests))]
        total = 0
        try:
            async for c, delta in self._deltas(req, requests):
                total += len(delta.token_ids)
                text = (self._prefix(req, c.index) if c.tokens == len(delta.token_ids) else "")\
                    + delta.text
                if not text and not delta.finished and req.top_logprobs is None:
                    continue  # text held back (a partial character or stop string)
                lp = self._logprobs(req, c.logprobs[len(c.logprobs) - len(delta.token_ids):],
                                    chat, offsets[c.index])
                offsets[c.index] += len(text)
                choice = {"index": c.index, "logprobs": lp,
                          "finish_reason": delta.finish_reason}
                if chat:
                    choice["delta"] = {"content": text} if text else {}
                else:
                    choice["text"] = text
                yield {"data": json.dumps({**head, "choices": [choice]})}
        except APIError as e:  # the stream has started: the error goes in-band
            yield {"data": json.dumps(e.body())}
            return
        if req.include_usage:
            yield {"data": json.dumps({**head, "choices": [],
                                       "usage": self._usage(req, total)})}
        yield {"data": "[DONE]"}

    def _logprobs(self, req: GenerationRequest, entries: list, chat: bool,
                  offset: int) -> dict | None:
        """OpenAI's logprobs object of `entries` (token id, logprob, alternatives)."""
        if req.top_logprobs is None:
            return None
        tok = self.llm.tokenizer

        def piece(t: int) -> tuple[str, bytes]:
            raw = tok.token_bytes(t)
            return raw.decode("utf-8", errors="replace"), raw
        if chat:
            content = []
            for t, lp, top in entries:
                s, raw = piece(t)
                content.append({"token": s, "logprob": lp, "bytes": list(raw), "top_logprobs": [
                    {"token": piece(a)[0], "logprob": alp, "bytes": list(piece(a)[1])}
                    for a, alp in top]})
            return {"content": content}
        tokens, offsets = [], []
        for t, _, _ in entries:
            offsets.append(offset)
            s = piece(t)[0]
            tokens.append(s)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{piece(a)[0]: alp for a, alp in top} for _, _, top in entries]
                if req.top_logprobs else None,
                "text_offset": offsets}


async def _until_disconnect(request: Request, work) -> Response:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()
    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return Response(status_code=499)  # nobody is listening
    finally:
        watcher.cancel()


async def _api_error(request: Request, e: APIError) -> Response:
    return _error_response(e)


async def _http_error(request: Request, e: HTTPException) -> Response:
    return _error_response(APIError(e.status_code, str(e.detail),
                                    code="not_found" if e.status_code == 404 else None))


def create_app(llm, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app serving `llm` as `model_name`."""
    s = Server(llm, model_name)
    app = Starlette(routes=[
        Route("/health", s.health),
        Route("/metrics", s.metrics),
        Route("/v1/models", s.models),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
    ], exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.state.server = s
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def served_name(model: str | None) -> str:
    """The name clients pass as `model`: the catalog name, or the GGUF file's name."""
    from ktjax.models.catalog import CATALOG, DEFAULT_MODEL
    name = model or DEFAULT_MODEL
    return name if name in CATALOG else os.path.basename(os.fspath(name))


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, **engine_options: Any
          ) -> None:
    """Load `model` and serve it until interrupted."""
    import uvicorn

    from ktjax.api import LLM
    llm = LLM(model, **{k: v for k, v in engine_options.items() if v is not None})
    app = create_app(llm, model_name or served_name(model), api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning")
