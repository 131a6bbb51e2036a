"""The OpenAI-compatible server on 127.0.0.1, driven by the `openai` client: completions,
chat, streaming, errors, the API key, client disconnects, and 64 concurrent streams."""
import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

from ktjax import SamplingParams  # noqa: E402
from ktjax.server.app import create_app  # noqa: E402
from test_async_llm import _assert_pages_free  # noqa: E402

MODEL = "tiny"
KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Live:
    """uvicorn serving an app on a thread of this process."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_llm):
    live = _Live(create_app(tiny_llm, MODEL, api_key=KEY))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _raw(server, method, path, body=None, key=KEY):
    """(status, parsed JSON or text) of a raw HTTP request, for what the client cannot send."""
    data = body.encode() if isinstance(body, str) else body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        if data is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        s.sendall(head.encode() + b"\r\n" + (data or b""))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2].decode()
    try:
        payload = json.loads(payload)
    except json.JSONDecodeError:
        pass
    return int(status_line.split()[1]), payload


PROMPT = [5, 17, 99, 42, 7]


def test_completion_matches_the_python_api(client, tiny_llm):
    want = tiny_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True))[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 8
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streaming_completion_and_chat_equal_whole_responses(client):
    kw = dict(model=MODEL, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="hello there", **kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(prompt="hello there", stream=True, **kw))
    assert streamed == whole
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_n_seed_stop_and_logprobs(client, tiny_llm):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, extra_body={"ignore_eos": True})
    a = client.completions.create(n=3, seed=7, temperature=1.0, **kw)
    b = client.completions.create(n=3, seed=7, temperature=1.0, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert a.usage.completion_tokens == 18
    full = client.completions.create(temperature=0, **kw).choices[0].text
    stop = full[2:4]
    cut = client.completions.create(temperature=0, stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    c = client.completions.create(temperature=0, logprobs=2, **kw).choices[0].logprobs
    assert len(c.tokens) == 6 and len(c.top_logprobs[0]) <= 2 and c.text_offset[0] == 0


@pytest.mark.parametrize("body, param, code", [
    ({"model": "nope", "prompt": "x"}, "model", "model_not_found"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature", None),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens", None),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n", None),
    ({"model": MODEL, "prompt": ""}, "prompt", None),
    ({"model": MODEL, "prompt": [10**9]}, "prompt", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens",
     "context_length_exceeded"),
    ({"model": MODEL, "prompt": [5] * 1024}, "prompt", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop", None),
])
def test_bad_completion_requests_get_openai_errors(client, body, param, code):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**body)
    assert e.value.status_code == (404 if code == "model_not_found" else 400)
    err = e.value.body
    assert err["param"] == param and err["code"] == code and err["message"]


def test_bad_chat_requests_and_bad_json(client, server):
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"role": "user"}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages)
    status, body = _raw(server, "POST", "/v1/completions", "{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(server, "POST", "/v1/completions", "[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _raw(server, "GET", "/v1/nowhere")
    assert status == 404 and "error" in body


def test_api_key_on_every_endpoint_but_health(server):
    for path in ("/v1/models", "/metrics"):
        assert _raw(server, "GET", path, key=None)[0] == 401
        assert _raw(server, "GET", path, key="wrong")[0] == 401
        assert _raw(server, "GET", path)[0] == 200
    assert _raw(server, "POST", "/v1/completions", '{"model": "tiny", "prompt": "x"}',
                key=None)[0] == 401
    assert _raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def _metric(server, name):
    text = _raw(server, "GET", "/metrics")[1]
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith(name + "{")))


def test_disconnect_mid_stream_aborts_and_frees_pages(server, tiny_llm):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    finished = _metric(server, "ktjax_requests_finished_total")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data:") < 3:
            got += s.recv(4096)
        assert _metric(server, "ktjax_running_requests") == 1
        assert _metric(server, "ktjax_kv_pages_used") > 0
    _assert_pages_free(tiny_llm.engine)
    assert _metric(server, "ktjax_requests_finished_total") == finished + 1
    assert tiny_llm.engine.running == []


def test_64_concurrent_streams_lose_no_token(server, tiny_llm):
    """Every stream completes with exactly the tokens its prompt gives alone (greedy)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 259, int(k)).tolist() for k in rng.integers(3, 24, 64)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True)
    alone = [tiny_llm.generate([p], params)[0] for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(prompt):
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0, stream=True,
            extra_body={"ignore_eos": True})
        text, tokens, reasons = "", 0, []
        async for chunk in stream:
            c = chunk.choices[0]
            text += c.text
            tokens += len(c.logprobs.tokens) if c.logprobs else 0
            reasons.append(c.finish_reason)
        return text, tokens, reasons[-1]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))
    results = asyncio.run(main())
    for (text, tokens, reason), want in zip(results, alone):
        assert (text, tokens, reason) == (want.text, 8, "length")
    _assert_pages_free(tiny_llm.engine)


def test_disconnect_before_a_whole_response_aborts_it(server, tiny_llm):
    loop = tiny_llm.engine_loop()
    generated = loop.generated_tokens
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while loop.generated_tokens == generated:  # running: now hang up
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _assert_pages_free(tiny_llm.engine)
    assert loop.generated_tokens - generated < 600


def test_serve_command_passes_its_options(monkeypatch):
    import ktjax.server.app
    from ktjax.cli import main
    seen = {}
    monkeypatch.setattr(ktjax.server.app, "serve", lambda model, **kw: seen.update(kw, model=model))
    assert main(["serve", "smollm2-135m", "--port", "8123", "--api-key", "k",
                 "--max-model-len", "512"]) == 0
    assert seen["model"] == "smollm2-135m" and seen["port"] == 8123 and \
        seen["api_key"] == "k" and seen["host"] == "127.0.0.1" and seen["max_model_len"] == 512
