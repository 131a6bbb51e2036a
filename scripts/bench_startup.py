"""Process start to first token, three ways: cold (empty persistent compilation cache), warm
(the cache a first process filled) and from artifacts (`ktjax export`, loaded with a fresh
empty cache). Each run is its own process; the time runs from just before the process is
spawned to the first generated token, so it includes Python's and JAX's start-up.

  python scripts/bench_startup.py --model smollm2-135m --model gemma3-270m --runs 3
  python scripts/bench_startup.py --model /tmp/moe.gguf --max-model-len 256 --json out.json

Prints a table (median of --runs; child CPU seconds beside the wall time, since a shared
machine's wall time varies with its load) with each start's split: interpreter, `import jax`,
the rest of ktjax's imports, load, first step; and the floor, a process that only starts JAX
(imports it and its CPU backend), whose ratio to cold bounds what artifacts can reach.
Children import ktjax with its bytecode cached, as an installed package does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT = "The capital of France is"

_CHILD = r"""
import json, os, resource, sys, time
t0 = time.time()
import jax
t_jax = time.time()
from ktjax import LLM, SamplingParams
t_import = time.time()
args = json.loads(sys.argv[1])
llm = LLM(args["model"], artifacts=args["artifacts"], **args["settings"])
t_load = time.time()
out = llm.generate(args["prompt"], SamplingParams(max_tokens=1, temperature=0))
t_first = time.time()
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps({
    "python_start": t0, "import_jax": t_jax - t0, "import": t_import - t0,
    "load": t_load - t_import,
    "first_step": t_first - t_load, "end": t_first, "token": out[0].token_ids[0],
    "cpu": ru.ru_utime + ru.ru_stime, "compiles": llm.engine.programs.compiles}))
"""


# The floor under any start: Python, `import jax` and its CPU backend, nothing of ktjax.
_FLOOR = r"""
import json, resource, time
t0 = time.time()
import jax
jax.devices()
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps({"python_start": t0, "import_jax": time.time() - t0,
    "end": time.time(), "cpu": ru.ru_utime + ru.ru_stime}))
"""


class StageFailed(Exception):
    """A child process failed or ran out of time; the message says which and how."""


class Deadline:
    """Seconds left of the run (--deadline): each child gets at most what is left, and is
    killed when it overruns, so nothing outlives the run."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.time() + seconds

    def left(self) -> float:
        return 24 * 3600 if self.end is None else self.end - time.time()


def _run(args: list[str], env: dict, deadline: Deadline, what: str) -> str:
    left = deadline.left()
    if left < 1:
        raise StageFailed(f"{what}: no time left")
    try:
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=left)
    except subprocess.TimeoutExpired:  # subprocess.run killed it
        raise StageFailed(f"{what}: killed at the deadline after {left:.0f} s") from None
    if r.returncode != 0:
        raise StageFailed(f"{what}: exit {r.returncode}: {r.stderr[-3000:]}")
    return r.stdout


def _env(cache: str, pycache: str) -> dict:
    """Children import ktjax with its bytecode cached (in `pycache`, warmed by _warm_bytecode),
    as an installed package is: compiling its sources is not part of a start."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "KTJAX_CACHE_DIR": cache, "KTJAX_NO_PROGRESS": "1",
            "PYTHONPYCACHEPREFIX": pycache,
            "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _warm_bytecode(pycache: str, deadline: Deadline) -> None:
    _run([sys.executable, "-c", "import ktjax.api, ktjax.export.artifacts"],
         _env(os.path.join(pycache, "xla"), pycache), deadline, "bytecode warm-up")


def _child(model: str, artifacts: str | None, settings: dict, cache: str, pycache: str,
           deadline: Deadline, what: str) -> dict:
    spawn = time.time()
    code = [_FLOOR] if model is None else [_CHILD, json.dumps(
        {"model": model, "artifacts": artifacts, "settings": settings, "prompt": PROMPT})]
    out = _run([sys.executable, "-c", *code], _env(cache, pycache), deadline, what)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise StageFailed(f"{what}: printed no result")
    res = json.loads(line[len("RESULT "):])
    res["to_first_token"] = res["end"] - spawn
    res["interpreter"] = res["python_start"] - spawn
    return res


def _prompt_tokens(model: str) -> int:
    from ktjax.gguf.reader import GGUFFile
    from ktjax.gguf.tokenizer import Tokenizer
    from ktjax.models.catalog import resolve_model
    return len(Tokenizer.from_gguf_metadata(GGUFFile(resolve_model(model)).metadata)
               .encode(PROMPT))


def _summary(model: str, settings: dict, rows: dict, export_s: float | None, size: int,
             errors: list[str]) -> dict:
    fields = ("to_first_token", "cpu", "interpreter", "import_jax", "import", "load",
              "first_step", "compiles")
    med = {k: {f: statistics.median(r[f] for r in rs) for f in fields if f in rs[0]}
           for k, rs in rows.items() if rs}
    out = {"model": model, "settings": settings, "runs": len(rows["cold"]),
           "export_seconds": export_s, "artifact_bytes": size, "median": med,
           "errors": list(errors)}
    if "cold" in med and "artifacts" in med:
        out["speedup_vs_cold"] = med["cold"]["to_first_token"] / \
            med["artifacts"]["to_first_token"]
    if "cold" in med and "jax" in med:  # what a start that did nothing but start JAX gets
        out["ceiling_vs_cold"] = med["cold"]["to_first_token"] / med["jax"]["to_first_token"]
    tokens = {r["token"] for rs in rows.values() for r in rs if "token" in r}
    if len(tokens) > 1:
        out["errors"].append(f"the starts sampled different first tokens {sorted(tokens)}")
    return out


def bench_model(model: str, settings: dict, runs: int, kinds: str, exact: bool,
                work: str, deadline: Deadline, partial=lambda summary: None) -> dict:
    """A cold start, the export, then rounds of starts from artifacts, with the cache the
    round's cold start filled, and of JAX alone (the floor), each round after the first
    opening with its cold start (the first cold start comes before the export, so that it is
    measured when time is short). A failed stage is recorded in "errors" and the stages that do
    not need it still run; `partial` gets the summary after each stage."""
    art, pycache = os.path.join(work, "artifacts"), os.path.join(work, "pycache")
    spec = f"kinds={tuple(kinds.split(','))!r}"
    if exact:  # only the benchmark request's programs: its prompt's prefill, one decode
        n = _prompt_tokens(model)
        spec += f", prompt_tokens={n}, max_tokens={n + 2}"
    rows: dict[str, list[dict]] = {"cold": [], "artifacts": [], "cache": [], "jax": []}
    errors: list[str] = []
    export_s, size = None, 0

    def stage(kind: str, artifacts: str | None, cache: str) -> None:
        try:
            r = _child(None if kind == "jax" else model, artifacts, settings, cache, pycache,
                       deadline, f"{kind} start")
        except StageFailed as e:
            errors.append(str(e))
            print(f"{model}: {e}", file=sys.stderr, flush=True)
        else:
            rows[kind].append(r)
            print(f"{model}: {kind} start {r['to_first_token']:.2f} s (cpu {r['cpu']:.2f} s, "
                  f"{r.get('compiles', 0)} compiles)", file=sys.stderr, flush=True)
        partial(_summary(model, settings, rows, export_s, size, errors))

    try:
        _warm_bytecode(pycache, deadline)
    except StageFailed as e:
        errors.append(str(e))
    stage("cold", None, os.path.join(work, "cache0"))
    t = time.time()
    # the export runs in a child too: this process keeps its store handles free
    code = (f"from ktjax.export.artifacts import export; from ktjax.engine.config import "
            f"EngineConfig; from ktjax.export.program_set import ProgramSpec; "
            f"m = export({model!r}, {art!r}, EngineConfig(**{settings!r}), "
            f"ProgramSpec({spec}))")
    try:
        _run([sys.executable, "-c", code], _env(os.path.join(work, "export-cache"), pycache),
             deadline, "export")
        export_s = time.time() - t
        size = sum(os.path.getsize(os.path.join(dp, f))
                   for dp, _, fs in os.walk(art) for f in fs)
        print(f"{model}: exported in {export_s:.1f} s ({size / 2**20:.0f} MiB)",
              file=sys.stderr, flush=True)
    except StageFailed as e:
        errors.append(str(e))
        print(f"{model}: {e}", file=sys.stderr, flush=True)
    partial(_summary(model, settings, rows, export_s, size, errors))
    for i in range(runs):  # each round's starts close in time: a shared machine's load drifts
        if i:
            stage("cold", None, os.path.join(work, f"cache{i}"))
        if export_s is not None:
            stage("artifacts", art, os.path.join(work, f"empty{i}"))
        stage("cache", None, os.path.join(work, f"cache{i}"))
        stage("jax", None, os.path.join(work, f"empty{i}"))
    return _summary(model, settings, rows, export_s, size, errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--rules", default=None)
    ap.add_argument("--kinds", default="greedy,sample", help="program kinds exported")
    ap.add_argument("--exact", action="store_true",
                    help="export only the benchmark request's programs (a big model's export "
                         "otherwise compiles every prefill and decode bucket)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: a start still running then is killed")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    settings = {"max_model_len": a.max_model_len}
    if a.rules:
        settings["rules"] = a.rules
    results: list[dict] = []
    deadline = Deadline(a.deadline)

    def save(partial: dict | None = None) -> None:
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(results + ([partial] if partial else []), fh, indent=1)

    for model in a.model:
        work = tempfile.mkdtemp(prefix="ktjax-startup-")
        try:
            r = bench_model(model, settings, a.runs, a.kinds, a.exact, work, deadline, save)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(r)
        export = f"{r['export_seconds']:.0f} s" if r["export_seconds"] is not None else "failed"
        print(f"\n{model}  (max_model_len {a.max_model_len}; export {export}, "
              f"{r['artifact_bytes'] / 2**20:.0f} MiB; median of {r['runs']})")
        print(f"  {'start':<10} {'first token':>11} {'cpu':>6} {'python':>7} {'jax':>6} "
              f"{'ktjax':>6} {'load':>6} {'1st step':>8} {'compiles':>8}")
        for k, m in r["median"].items():
            rest = "" if k == "jax" else (
                f"{m['import'] - m['import_jax']:>5.2f}s {m['load']:>5.2f}s "
                f"{m['first_step']:>7.2f}s {m['compiles']:>8.0f}")
            print(f"  {k:<10} {m['to_first_token']:>10.2f}s {m['cpu']:>5.2f}s "
                  f"{m['interpreter']:>6.2f}s {m['import_jax']:>5.2f}s {rest}")
        if "speedup_vs_cold" in r:
            print(f"  artifacts vs cold: {r['speedup_vs_cold']:.1f}x")
        if "ceiling_vs_cold" in r:
            print(f"  ceiling (cold / starting JAX alone): {r['ceiling_vs_cold']:.1f}x")
        for e in r["errors"]:
            print(f"  error: {e[:300]}")
        save()


if __name__ == "__main__":
    main()
