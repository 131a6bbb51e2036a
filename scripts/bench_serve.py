"""Serving benchmark: `ktjax serve` against llama.cpp's `llama-server`, same GGUF, same prompts.

Both servers run at once (an idle one takes no CPU); each concurrency level is measured on one
and then the other, so drift in the machine's load hits both. Every client streams
/v1/completions requests (greedy, ignore_eos, fixed max_tokens) one after another; reported per
level: output tok/s (all completion tokens / wall time), p50/p99 time to first token and
inter-token latency (gaps between streamed events of one request).

  python scripts/bench_serve.py --models smollm2-135m gemma3-270m --concurrency 1 8 32 \
      --llama-bin .peers/llama.cpp/build/bin --json /tmp/bench_serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

TOPICS = ["a lighthouse keeper", "the history of bread", "how rivers form", "a chess match",
          "the first day of school", "volcanoes", "a train journey", "honey bees",
          "an old clock", "the moon landing", "desert plants", "a lost key"]


def prompts(n: int) -> list[str]:
    """Distinct from the first token (no server can reuse another request's prefix)."""
    return [f"Request {i}: write a detailed, friendly paragraph about {TOPICS[i % len(TOPICS)]},"
            f" for reader number {i * 7919 % 1000}." for i in range(n)]


# ---- a small streaming HTTP/1.1 client (the client must cost little CPU next to servers) -----
async def stream_completion(port: int, body: dict) -> tuple[float, list[float], str | None]:
    """(time to first text, arrival time of each text event, finish_reason) of one request."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nConnection: close\r\nContent-Length: " +
                 str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {await reader.read()!r:.300}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    arrivals, finish, buf = [], None, b""

    async def pieces():
        if not chunked:
            while data := await reader.read(65536):
                yield data
            return
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    async for piece in pieces():
        now = time.perf_counter()
        buf += piece
        *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
        for ev in events:
            for line in ev.split(b"\n"):
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                msg = json.loads(line[5:])
                if "error" in msg:
                    raise RuntimeError(f"stream error: {msg}")
                for c in msg.get("choices", []):
                    if c.get("text"):
                        arrivals.append(now)
                    finish = c.get("finish_reason") or finish
    writer.close()
    return (arrivals[0] - t0 if arrivals else float("nan")), arrivals, finish


async def run_level(port: int, model: str, texts: list[str], concurrency: int,
                    max_tokens: int) -> dict:
    queue = list(texts)
    ttft, itl, finishes = [], [], []

    async def client():
        while queue:
            text = queue.pop()
            first, arrivals, finish = await stream_completion(port, {
                "model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True})
            ttft.append(first)
            itl.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
            finishes.append(finish)
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    assert all(f == "length" for f in finishes), f"unexpected finish reasons {set(finishes)}"

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")
    return {"concurrency": concurrency, "requests": len(texts),
            "output_tok_s": len(texts) * max_tokens / wall, "wall_s": wall,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99),
            "itl_mean_ms": statistics.fmean(itl) * 1000 if itl else float("nan")}


# ---- servers --------------------------------------------------------------------------------
def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy after {timeout} s")


def start_servers(path: str, name: str, args) -> dict[str, tuple[subprocess.Popen, int]]:
    ctx = args.max_tokens + 128  # per request: prompt (< 64 tokens) + output, with room
    slots = max(args.concurrency)
    cmds = {
        "ktjax": [sys.executable, "-m", "ktjax.cli", "serve", path, "--port", str(args.port),
                  "--served-model-name", name, "--max-model-len", str(ctx),
                  "--kv-cache-tokens", str(ctx * slots)],
        "llama-server": [os.path.join(args.llama_bin, "llama-server"), "-m", path,
                         "--port", str(args.port + 1), "--alias", name, "-np", str(slots),
                         "-c", str(ctx * slots), "-t", str(args.llama_threads),
                         "-tb", str(args.llama_threads), *args.llama_args.split()],
    }
    servers = {}
    env = dict(os.environ, KTJAX_NO_PROGRESS="1")
    if args.ktjax_threads:
        env["KTJAX_NUM_THREADS"] = str(args.ktjax_threads)
    for i, (kind, cmd) in enumerate(cmds.items()):
        if kind not in args.servers:
            continue
        log = open(f"/tmp/bench_serve_{kind}.log", "w")
        servers[kind] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                         args.port + i)
    for proc, port in servers.values():
        wait_healthy(port, proc)
    return servers


def bench_model(model: str, args) -> dict:
    from ktjax.models.catalog import resolve_model
    path = resolve_model(model)
    servers = start_servers(path, model, args)
    results: dict[str, list[dict]] = {k: [] for k in servers}
    try:
        for conc in args.concurrency:
            n = max(args.min_requests, conc * args.rounds)
            for kind, (_, port) in servers.items():
                # warm-up at this concurrency: ktjax compiles the shapes the level uses
                asyncio.run(run_level(port, model, prompts(conc + 1000)[1000:], conc,
                                      args.max_tokens))
                r = asyncio.run(run_level(port, model, prompts(n), conc, args.max_tokens))
                results[kind].append(r)
                print(f"{model:14s} {kind:12s} c={conc:<3d} {r['output_tok_s']:7.1f} tok/s  "
                      f"TTFT p50 {r['ttft_p50_ms']:7.1f} p99 {r['ttft_p99_ms']:7.1f} ms  "
                      f"ITL p50 {r['itl_p50_ms']:6.1f} p99 {r['itl_p99_ms']:6.1f} ms",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    ratios = [k["output_tok_s"] / ll["output_tok_s"]
              for k, ll in zip(results.get("ktjax", []), results.get("llama-server", []))]
    for conc, ratio in zip(args.concurrency, ratios):
        print(f"{model:14s} c={conc:<3d} ktjax / llama-server throughput: {ratio:.2f}x")
    return {"model": model, "path": path, **results, "throughput_ratio": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--min-requests", type=int, default=4)
    # On a machine loaded by other jobs llama.cpp's threads, which meet at a barrier after
    # every graph node, lose a time slice at each: -t 1 is its best setting there.
    ap.add_argument("--llama-threads", type=int, default=os.cpu_count())
    ap.add_argument("--ktjax-threads", type=int, default=None,
                    help="KTJAX_NUM_THREADS of the ktjax server (default: its own)")
    ap.add_argument("--port", type=int, default=8400, help="ktjax; llama-server gets port + 1")
    ap.add_argument("--llama-bin", default=".peers/llama.cpp/build/bin")
    ap.add_argument("--llama-args", default="",
                    help="more llama-server options, e.g. '--poll 0' on a loaded machine")
    ap.add_argument("--servers", nargs="+", default=["ktjax", "llama-server"])
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    out = {"args": vars(args), "load_before": os.getloadavg(),
           "results": [bench_model(m, args) for m in args.models],
           "load_after": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
