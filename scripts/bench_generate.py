#!/usr/bin/env python
"""Prefill and decode throughput of ktjax, optionally side by side with llama.cpp.

  python scripts/bench_generate.py --model smollm2-135m --prompt-tokens 128 --gen-tokens 64 --json
  ... --llama-bench .peers/llama.cpp/build/bin/llama-bench   # adds the peer and the ratios
  ... --batch 1,8,64 --prefill-tokens 2048 --roofline         # GPU: one load, every case

Compilation is timed apart (compile_s) and excluded from throughput; the prompt is random
vocabulary ids, generation ignores EOS so every run decodes exactly --gen-tokens. Both
engines decode after --prompt-tokens of context (llama-bench's -d). Each --batch value is
one case (batch > 1 against llama-batched-bench's generation speed at that many sequences);
--prefill-tokens adds a batch-1 prompt of that length (prefill tok/s and, on a GPU, TFLOPS
against the card's bf16 dense peak).

On a GPU the peer runs with -ngl 99 -fa 1 (all layers on the GPU, flash attention).
--profile-steps N adds scripts/profile_step.py's figures for N batch-1 decode steps (GPU:
kernels per step, their time, the gap to the step's wall time). A failing peer leaves
`peer_error` and ktjax's figures.
--roofline: on CPU the read bandwidth is probed right before each decode pass and decode is
compared with scripts/roofline.py's active bytes per token; on a GPU the HBM read bandwidth is
measured once in this run (a reduction over 2 GiB) and each decode step is compared with the
bytes it must read: every device weight array once (the embedding table only as a head)
plus each row's KV cache at its mean context.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

PEER_TIMEOUT_S = 600   # one llama.cpp run; a hung peer must not hold the GPU forever
# bf16 dense tensor-core peak (TFLOPS) by device name, for prefill's fraction of peak.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def measure_hbm_gbps(device, gib: float = 2.0, iters: int = 10) -> float:
    """Device memory read bandwidth: the best of `iters` sums over `gib` GiB of bf16."""
    import jax
    import jax.numpy as jnp

    n = int(gib * 2 ** 30) // 2
    x = jax.device_put(jnp.ones((n // 4096, 4096), jnp.bfloat16), device)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return n * 2 / best / 1e9


def weight_bytes(params) -> int:
    """Bytes of the device weights a step reads: every array once, the embedding table only
    when it is also the output head (a step gathers just its rows)."""
    import jax

    total = sum(int(a.nbytes) for a in jax.tree.leaves(params) if hasattr(a, "nbytes"))
    if "output" in params:
        total -= int(params["token_embd"].nbytes)
    return total


def matmul_elements(f_tensors: dict) -> int:
    """Weight elements a token multiplies (every matrix once, the head included), from a
    dense model's GGUF tensors."""
    n = sum(t.n_elements for name, t in f_tensors.items()
            if len(t.shape) == 2 and name != "token_embd.weight")
    if "output.weight" not in f_tensors:
        n += f_tensors["token_embd.weight"].n_elements      # tied head
    return n


def peak_tflops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_kind), None)


class Bench:
    def __init__(self, args):
        from ktjax import LLM, _native
        from ktjax.gguf.reader import GGUFFile

        _native.set_num_threads(args.threads)  # the host kernels' pool, as llama-bench's -t
        self.args = args
        batches = _ints(args.batch)
        per_seq = args.prompt_tokens + args.gen_tokens + 16
        max_len = max(per_seq, args.prefill_tokens + 16)
        t0 = time.perf_counter()
        self.llm = LLM(args.model, max_model_len=max_len,
                       kv_cache_tokens=max(4 * max_len, max(batches, default=1) * (per_seq + 32)))
        self.load_s = time.perf_counter() - t0
        self.tensors = GGUFFile(self.llm.model_path).tensors
        self.engine = self.llm.engine
        self.device = self.llm.engine_config.device
        self.vocab = self.engine.programs.vocab
        self.rng = np.random.default_rng(0)

    def _prompts(self, batch: int, tokens: int) -> list[list[int]]:
        return [self.rng.integers(100, self.vocab - 100, tokens).tolist() for _ in range(batch)]

    def one_pass(self, prompts, gen_tokens: int, probe_cpu_bw: bool = False):
        """(prefill seconds, decode seconds, read GB/s probed before decode or 0)."""
        from ktjax import SamplingParams, _native

        params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        engine = self.engine
        for p in prompts:
            engine.add_request(p, params)
        t = time.perf_counter()
        while any(s.in_prefill for s in engine.running + engine.waiting):
            engine.step()
        t_prefill = time.perf_counter() - t
        read_gbps = _native.read_bandwidth_gbps(0, 3) if probe_cpu_bw else 0.0
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        return t_prefill, time.perf_counter() - t, read_gbps

    def decode_case(self, batch: int, hbm_gbps: float | None) -> dict:
        a = self.args
        prompts = self._prompts(batch, a.prompt_tokens)
        compile0 = self.engine.programs.compile_seconds
        self.one_pass(prompts, a.gen_tokens)          # compiles every bucket this case needs
        compile_s = self.engine.programs.compile_seconds - compile0
        cpu_roofline = a.roofline and self.device.platform == "cpu"
        runs = [self.one_pass(prompts, a.gen_tokens, cpu_roofline) for _ in range(a.repeats)]
        t_decode = min(r[1] for r in runs)
        steps = a.gen_tokens - 1                      # the first token comes from the prefill
        out = {"batch": batch, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
               "prefill_tok_s": batch * a.prompt_tokens / min(r[0] for r in runs),
               "decode_tok_s": batch * steps / t_decode, "step_ms": 1e3 * t_decode / steps,
               "compile_s": compile_s}
        if cpu_roofline:
            from roofline import active_bytes  # scripts/ is on sys.path when run as a script
            per_token = active_bytes(self.llm.model_path)["active_bytes_per_token"] * batch
            fractions = [batch * steps / r[1] / (r[2] * 1e9 / per_token) for r in runs]
            out.update(read_gbps=[r[2] for r in runs], active_bytes_per_token=per_token / batch,
                       decode_roofline_fractions=fractions,
                       decode_roofline_fraction=float(np.median(fractions)))
        elif hbm_gbps:
            cache = self.llm.config.cache_spec
            kv_token = cache.bytes_per_token(np.dtype(self.engine_dtype).itemsize)
            mean_ctx = a.prompt_tokens + a.gen_tokens / 2
            step_bytes = self.weight_bytes + batch * mean_ctx * kv_token
            out.update(step_bytes=int(step_bytes), hbm_gbps=hbm_gbps,
                       roofline_step_ms=1e3 * step_bytes / (hbm_gbps * 1e9),
                       decode_roofline_fraction=step_bytes / (hbm_gbps * 1e9) /
                       (t_decode / steps))
        return out

    @property
    def engine_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(self.llm.engine_config.dtype)

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.engine.params)

    def prefill_case(self, tokens: int) -> dict:
        prompts = self._prompts(1, tokens)
        compile0 = self.engine.programs.compile_seconds
        self.one_pass(prompts, 1)
        compile_s = self.engine.programs.compile_seconds - compile0
        t = min(self.one_pass(prompts, 1)[0] for _ in range(self.args.repeats))
        cfg = self.llm.config
        cache = cfg.cache_spec
        # matmuls 2*N*K per token; causal attention QK^T and PV: 2 * 2 * T^2/2 * heads * dim
        flops = 2 * matmul_elements(self.tensors) * tokens + \
            2 * cfg.n_layers * cfg.n_heads * cache.head_dim * tokens * tokens
        out = {"prefill_tokens": tokens, "prefill_tok_s": tokens / t, "compile_s": compile_s,
               "tflops": flops / t / 1e12}
        peak = peak_tflops(getattr(self.device, "device_kind", ""))
        if peak and self.device.platform != "cpu":
            out.update(peak_tflops=peak, fraction_of_peak=out["tflops"] / peak)
        return out


def run_llama_bench(binary: str, model_path: str, prompt: int, gen: int, repeats: int,
                    threads: int, gpu: bool, depth: bool = True) -> dict:
    """llama-bench's prompt processing from an empty context and its generation after
    `prompt` tokens of context (-d), as ktjax decodes after its prompt."""
    cmd = [binary, "-m", model_path, "-p", str(prompt), "-n", str(gen), "-t", str(threads),
           "-o", "json", "-r", str(repeats)]
    if depth:
        cmd += ["-d", f"0,{prompt}"]
    if gpu:
        cmd += ["-ngl", "99", "-fa", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=PEER_TIMEOUT_S)
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r.get("n_depth", 0) == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and
              r.get("n_depth", 0) == (prompt if depth else 0))

    def best(row: dict) -> float:
        """The best repetition, as ktjax reports its best pass (a shared host's load moves
        averages)."""
        return max(row.get("samples_ts") or [row["avg_ts"]])

    return {"engine": "llama.cpp", "prefill_tok_s": best(pp), "decode_tok_s": best(tg),
            "prefill_avg_tok_s": pp["avg_ts"], "decode_avg_tok_s": tg["avg_ts"],
            "build": rows[0].get("build_commit"), "command": shlex.join(cmd)}


def run_llama_batched_bench(binary: str, model_path: str, prompt: int, gen: int,
                            batches: list[int], threads: int, gpu: bool) -> dict[int, dict]:
    """llama-batched-bench: {sequences: generation and prompt speeds} (tokens/s over all
    sequences), prompts not shared, as ktjax's batch cases."""
    base = [binary, "-m", model_path, "-npp", str(prompt), "-ntg", str(gen),
            "-npl", ",".join(map(str, batches)), "-c", str(max(batches) * (prompt + gen) + 64),
            "-t", str(threads), "--output-format", "jsonl"]
    # the flash-attention flag's syntax changed across llama.cpp versions
    variants = [["-ngl", "99", "-fa", "on"], ["-ngl", "99", "-fa", "1"], ["-ngl", "99", "-fa"]] \
        if gpu else [[]]
    err = ""
    for extra in variants:
        cmd = base + extra
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
        rows = [json.loads(line) for line in out.stdout.splitlines()
                if line.startswith("{") and '"speed_tg"' in line]
        if out.returncode == 0 and rows:
            return {int(r["pl"]): {"engine": "llama.cpp", "decode_tok_s": r["speed_tg"],
                                   "prefill_tok_s": r["speed_pp"], "command": shlex.join(cmd)}
                    for r in rows}
        err = out.stderr[-400:]
    raise RuntimeError(f"llama-batched-bench failed: {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path or catalog name (default model)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batch", default="1",
                    help="comma-separated batch sizes, one decode case each ('' for none)")
    ap.add_argument("--prefill-tokens", type=int, default=0,
                    help="also time a batch-1 prompt of this many tokens (TFLOPS on a GPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="host-kernel threads of both engines")
    ap.add_argument("--llama-bench", default=None, help="path to llama-bench, to run the peer")
    ap.add_argument("--llama-batched-bench", default=None,
                    help="path to llama-batched-bench (default: beside llama-bench)")
    ap.add_argument("--roofline", action="store_true",
                    help="decode as a fraction of the bandwidth roofline (CPU: probed per "
                         "pass; GPU: HBM measured once)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many batch-1 decode steps (scripts/profile_step.py)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = ap.parse_args()

    bench = Bench(args)
    gpu = bench.device.platform != "cpu"
    hbm = measure_hbm_gbps(bench.device) if args.roofline and gpu else None
    result = {"engine": "ktjax", "model": os.path.basename(bench.llm.model_path),
              "device": getattr(bench.device, "device_kind", bench.device.platform),
              "load_s": bench.load_s, "weight_bytes": bench.weight_bytes,
              "command": shlex.join([sys.executable, *sys.argv]),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": []}
    if hbm:
        result["hbm_gbps"] = hbm
    for b in _ints(args.batch):
        result["cases"].append(bench.decode_case(b, hbm))
    if args.prefill_tokens:
        result["prefill"] = bench.prefill_case(args.prefill_tokens)
    if args.profile_steps:
        from profile_step import is_xla_op, profile_engine
        prof = profile_engine(bench.engine, args.prompt_tokens, args.profile_steps)
        ops = sorted(((k, v) for k, v in prof.pop("ops").items() if is_xla_op(k)),
                     key=lambda kv: -kv[1][0])[:12]
        result["profile"] = {**prof, "top_ops_ms_calls": ops}
    result["compile_s"] = bench.engine.programs.compile_seconds
    if args.llama_bench:
        try:
            _add_peer(result, args, bench.llm.model_path, gpu)
        except (OSError, subprocess.SubprocessError, RuntimeError, ValueError,
                StopIteration, KeyError) as e:   # keep ktjax's figures when the peer fails
            err = getattr(e, "stderr", "") or ""
            result["peer_error"] = f"{type(e).__name__}: {e} {err[-300:]}"
    if len(result["cases"]) == 1:   # one case: its figures at the top level too
        result.update({k: v for k, v in result["cases"][0].items() if k != "compile_s"})
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        if k == "cases":
            for c in v:
                print("  " + ", ".join(f"{ck}={cv:.2f}" if isinstance(cv, float) else
                                       f"{ck}={cv}" for ck, cv in c.items()))
        else:
            print(f"{k:>15}: {v:.2f}" if isinstance(v, float) else f"{k:>15}: {v}")


def _add_peer(result: dict, args, model_path: str, gpu: bool) -> None:
    """The peer's figures beside each case, and ktjax / peer ratios."""
    batches = _ints(args.batch)
    if 1 in batches:
        peer = run_llama_bench(args.llama_bench, model_path, args.prompt_tokens,
                               args.gen_tokens, args.repeats, args.threads, gpu)
        case = next(c for c in result["cases"] if c["batch"] == 1)
        case["peer"] = peer
        case["decode_ratio"] = case["decode_tok_s"] / peer["decode_tok_s"]
        case["prefill_ratio"] = case["prefill_tok_s"] / peer["prefill_tok_s"]
    many = [b for b in batches if b > 1]
    if many:
        binary = args.llama_batched_bench or os.path.join(os.path.dirname(args.llama_bench),
                                                          "llama-batched-bench")
        if os.path.exists(binary):
            peers = run_llama_batched_bench(binary, model_path, args.prompt_tokens,
                                            args.gen_tokens, many, args.threads, gpu)
            for c in result["cases"]:
                if c["batch"] in peers:
                    c["peer"] = peers[c["batch"]]
                    c["decode_ratio"] = c["decode_tok_s"] / c["peer"]["decode_tok_s"]
        else:
            result["peer_note"] = f"{binary} not found: batch > 1 has no peer figure"
    if args.prefill_tokens:
        peer = run_llama_bench(args.llama_bench, model_path, args.prefill_tokens, 4,
                               args.repeats, args.threads, gpu, depth=False)
        result["prefill"]["peer"] = peer
        result["prefill"]["prefill_ratio"] = \
            result["prefill"]["prefill_tok_s"] / peer["prefill_tok_s"]


if __name__ == "__main__":
    main()
