"""Fuzzing the model loader with mutated tiny GGUF files (issue 25): every case must end in a
KtjaxError or a correct load -- never a signal, a hang or an untyped exception.

Cases are seeded random mutations of tiny models of each family and packing path (float,
Q8_0 / Q4_0, K-quants, MoE experts): truncation, byte flips (mostly in the header), extreme
counts, lengths and metadata values, values of the wrong type, tensor dims that overflow,
bad or overlapping data offsets, unknown types, duplicated or dropped keys and tensors. Each
case is loaded by ktjax.LLM in a worker process (tests/fuzz_load_worker.py) that runs cases
in sequence, so a crash kills the worker, not the test; it is then restarted and the case
is reported with its seed and mutation. KTJAX_FUZZ_CASES sets the number of cases (default
600), KTJAX_FUZZ_SEED the first seed.
"""
from __future__ import annotations

import copy
import json
import math
import os
import select
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

import ktjax
from gguf_craft import Crafted, parse
from tiny_models import write_tiny_gguf

N_CASES = int(os.environ.get("KTJAX_FUZZ_CASES", "600"))
FIRST_SEED = int(os.environ.get("KTJAX_FUZZ_SEED", "0"))
CASE_TIMEOUT_S = 120   # generous for the sanitizer build; a healthy case takes milliseconds
WORKER = Path(__file__).with_name("fuzz_load_worker.py")

EXTREMES = [0, 1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 + 1, 2**63 - 1,
            2**63, 2**64 - 1]
_SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<B", V.UINT16: "<H", V.INT16: "<H", V.UINT32: "<I",
               V.INT32: "<I", V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<Q",
               V.FLOAT64: "<d"}
_FLOATS = [0.0, -1.0, 1e-6, 1e38, float("nan"), float("inf"), -float("inf")]


BASES = {   # name -> write_tiny_gguf arguments: one per family and packing path
    "llama_f32": dict(arch="llama", n_layers=2),
    "llama_q8_0": dict(arch="llama", qtype=T.Q8_0, n_layers=1),
    "qwen2_q4_0": dict(arch="qwen2", qtype=T.Q4_0, n_layers=1),
    "gemma3_q4_k": dict(arch="gemma3", qtype=T.Q4_K, n_layers=1, hidden=256, n_heads=2,
                        n_kv_heads=1, head_dim=128, ffn=256),
    "qwen3moe_q6_k": dict(arch="qwen3moe", qtype=T.F32, expert_qtype=T.Q6_K, n_layers=1,
                          n_experts=4, n_used=2, hidden=256, expert_ffn=256, n_heads=2,
                          n_kv_heads=1, head_dim=128),
}


def pick(rng: np.random.Generator, options):
    """One of `options` (rng.choice would turn big ints into float64)."""
    return options[int(rng.integers(len(options)))]


def _scalar_raw(rng: np.random.Generator, vtype: int) -> bytes:
    fmt = _SCALAR_FMT[V(vtype)]
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, pick(rng, _FLOATS + EXTREMES[:8]))
    bits = struct.calcsize(fmt) * 8
    return struct.pack(fmt, int(pick(rng, EXTREMES)) % 2**bits)


def _random_value(rng: np.random.Generator) -> tuple[int, bytes]:
    """A value of a random type, as (type, encoded bytes)."""
    vtype = int(pick(rng, [*_SCALAR_FMT, V.STRING, V.ARRAY, 13, 2**32 - 1]))
    if vtype in _SCALAR_FMT:
        return vtype, _scalar_raw(rng, vtype)
    if vtype == V.STRING:
        text = pick(rng, ["", "gpt2", "llama", "a b", "\xff", "x" * 100]).encode()
        if rng.random() < 0.2:
            return vtype, struct.pack("<Q", int(pick(rng, EXTREMES))) + text
        return vtype, struct.pack("<Q", len(text)) + text
    if vtype == V.ARRAY:
        etype = int(pick(rng, [*_SCALAR_FMT, V.STRING, V.ARRAY, 99]))
        count = int(rng.integers(0, 4)) if rng.random() < 0.7 else int(pick(rng, EXTREMES))
        body = b""
        for _ in range(min(count, 4)):
            if etype in _SCALAR_FMT:
                body += _scalar_raw(rng, etype)
            elif etype == V.STRING:
                body += struct.pack("<Q", 1) + b"a"
            elif etype == V.ARRAY:
                body += struct.pack("<IQ", V.UINT8, 0)
        return vtype, struct.pack("<IQ", etype, count) + body
    return vtype, b""   # an unknown type id


def _mutate_structure(c: Crafted, rng: np.random.Generator) -> str:
    """One structural change to c, described."""
    kind = pick(rng, ["field_value", "field_value", "dims", "offset", "type", "dup", "drop",
                       "size_key_and_dims", "counts"])
    if kind == "field_value":
        f = c.fields[rng.integers(len(c.fields))]
        f.vtype, f.raw = _random_value(rng)
        return f"{f.key} := type {f.vtype} raw {f.raw[:24].hex()}"
    if kind == "dims":
        t = c.tensors[rng.integers(len(c.tensors))]
        choice = rng.integers(4)
        if choice == 0:
            t.dims = [int(pick(rng, EXTREMES)) for _ in range(rng.integers(0, 7))]
        elif choice == 1:
            t.dims[rng.integers(len(t.dims))] = int(pick(rng, EXTREMES))
        elif choice == 2:
            t.dims = list(reversed(t.dims)) + [1]
        else:   # the product wraps int64 to the real element count
            n = math.prod(t.dims) % 2**64
            t.dims = [n, 2**63 + 1] if rng.random() < 0.5 else [2**32, 2**32, n]
        return f"{t.name} dims := {t.dims}"
    if kind == "offset":
        t = c.tensors[rng.integers(len(c.tensors))]
        other = c.tensors[rng.integers(len(c.tensors))]
        t.offset = int(pick(rng, [t.offset + 1, t.offset + 32, 0, other.offset,
                                   other.offset + 32, len(c.data), 2**63, 2**64 - 32]))
        return f"{t.name} offset := {t.offset}"
    if kind == "type":
        t = c.tensors[rng.integers(len(c.tensors))]
        t.type_id = int(pick(rng, [0, 1, 2, 8, 10, 12, 14, 15, 16, 24, 30, 39, 4, 5, 99,
                                    2**31, 2**32 - 1]))
        return f"{t.name} type := {t.type_id}"
    if kind == "dup":
        if rng.random() < 0.5:
            f = c.fields[rng.integers(len(c.fields))]
            c.fields.insert(int(rng.integers(len(c.fields) + 1)), f)
            return f"duplicate key {f.key}"
        t = c.tensors[rng.integers(len(c.tensors))]
        c.tensors.insert(int(rng.integers(len(c.tensors) + 1)), t)
        return f"duplicate tensor {t.name}"
    if kind == "drop":
        if rng.random() < 0.5:
            f = c.fields.pop(int(rng.integers(len(c.fields))))
            return f"drop key {f.key}"
        t = c.tensors.pop(int(rng.integers(len(c.tensors))))
        return f"drop tensor {t.name}"
    if kind == "size_key_and_dims":
        # A size key and every tensor dim of its old value changed together (the issue's
        # feed_forward_length = dims = 2^62 + 1), so the shape checks agree with the metadata.
        sizes = [f for f in c.fields if f.vtype == V.UINT32 and f.key.split(".", 1)[-1] in (
            "feed_forward_length", "embedding_length", "expert_feed_forward_length",
            "expert_count", "attention.head_count", "attention.key_length")]
        f = sizes[rng.integers(len(sizes))]
        old, new = f.value, int(pick(rng, EXTREMES))
        f.vtype, f.raw = V.UINT64, struct.pack("<Q", new % 2**64)
        for t in c.tensors:
            t.dims = [new if d == old else d for d in t.dims]
        return f"{f.key} and dims {old} := {new}"
    # counts: the header's tensor or key count
    which = pick(rng, ["n_tensors", "n_kv"])
    value = int(pick(rng, [*EXTREMES, len(c.tensors) + 1, len(c.fields) + 1]))
    setattr(c, which, value % 2**64)
    return f"{which} := {value}"


def make_case(base: bytes, parsed: Crafted, rng: np.random.Generator, path: Path) -> str:
    """Writes one mutated copy of `base` (`parsed`: its parts) to path; returns what was done."""
    kind = pick(rng, ["truncate", "flip", "structure", "structure", "structure", "combo"])
    data, what = base, []
    if kind in ("structure", "combo"):
        c = copy.deepcopy(parsed)
        what.append(_mutate_structure(c, rng))
        if kind == "combo":
            what.append(_mutate_structure(c, rng))
        data = c.to_bytes()
    header = len(base) - len(parsed.data)
    if kind in ("truncate", "combo") and rng.random() < (1 if kind == "truncate" else 0.3):
        cut = int(rng.integers(0, header if rng.random() < 0.7 else len(data)))
        data = data[:cut]
        what.append(f"truncate at {cut}")
    if kind in ("flip", "combo") and rng.random() < (1 if kind == "flip" else 0.3):
        buf = bytearray(data)
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(0, min(header, len(buf)) if rng.random() < 0.8 else len(buf)))
            if i < len(buf):
                buf[i] = int(rng.integers(256))
                what.append(f"byte {i} := {buf[i]}")
        data = bytes(buf)
    path.write_bytes(data)
    return "; ".join(what)


class Worker:
    """The loader worker process: started on demand, restarted after a death or a hang."""

    def __init__(self, log: Path, script: Path = WORKER):
        self.log, self.script, self.proc = log, script, None

    def start(self) -> None:
        env = dict(os.environ)
        # The worker imports the same ktjax (and native module) as this test.
        root = str(Path(ktjax.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        flags = ["-S"] if sys.flags.no_site else []
        self.proc = subprocess.Popen([sys.executable, *flags, str(self.script)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("ab"), text=True, bufsize=1)
        ready = self._reply(CASE_TIMEOUT_S)
        assert ready == {"outcome": "ready"}, f"fuzz worker did not start: {ready}"

    def _reply(self, timeout: float) -> dict:
        """The worker's next answer, {"outcome": "hang"} after `timeout` seconds of silence,
        or {"outcome": "died"} when its output ends."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {"outcome": "hang", "message": f"no answer within {timeout} s"}
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"outcome": "died"}

    def run(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        reply = self._reply(CASE_TIMEOUT_S)
        if reply["outcome"] == "hang":
            self.proc.kill()
            self.proc.wait()
        if reply["outcome"] != "died":
            return reply
        code = self.proc.wait()
        tail = self.log.read_bytes()[-3000:].decode(errors="replace")  # the stack, the ASan report
        return {"outcome": "died", "message": f"worker exited with {code}"
                f"{f' (signal {-code})' if code < 0 else ''}; its stderr ends:\n{tail}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def test_worker_reports_deaths_and_hangs(tmp_path, monkeypatch):
    """The harness itself: a case that kills or stalls the worker is reported as such, and
    the next case runs in a fresh worker."""
    script = tmp_path / "worker.py"
    script.write_text("import json, os, sys, time\n"
                      "print(json.dumps({'outcome': 'ready'}), flush=True)\n"
                      "for line in sys.stdin:\n"
                      "    if 'abort' in line: os.abort()\n"
                      "    if 'stall' in line: time.sleep(60)\n"
                      "    print(json.dumps({'outcome': 'ok'}), flush=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT_S", 2)
    worker = Worker(tmp_path / "worker.log", script)
    try:
        outcomes = [worker.run(Path(p))["outcome"] for p in ("a", "abort", "b", "stall", "c")]
    finally:
        worker.close()
    assert outcomes == ["ok", "died", "ok", "hang", "ok"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_bases")
    out = {}
    for name, kw in BASES.items():
        data = write_tiny_gguf(d / f"{name}.gguf", **kw).read_bytes()
        out[name] = (data, parse(data))
    return out


def test_every_base_model_loads(bases, tmp_path):
    """The unmutated bases load in the worker (so 'ok' outcomes below are meaningful)."""
    worker = Worker(tmp_path / "worker.log")
    try:
        for name, (data, _) in bases.items():
            path = tmp_path / f"{name}.gguf"
            path.write_bytes(data)
            assert worker.run(path) == {"outcome": "ok"}, name
    finally:
        worker.close()


def test_mutated_models_fail_cleanly(bases, tmp_path):
    worker = Worker(tmp_path / "worker.log")
    failures, outcomes = [], {}
    names = sorted(bases)
    try:
        for i in range(N_CASES):
            seed = FIRST_SEED + i
            rng = np.random.default_rng(seed)
            base = names[i % len(names)]
            path = tmp_path / f"case{seed}.gguf"
            what = make_case(*bases[base], rng, path)
            reply = worker.run(path)
            outcomes[reply["outcome"]] = outcomes.get(reply["outcome"], 0) + 1
            if reply["outcome"] in ("ok", "error"):
                path.unlink()   # keep only the files of failing cases
            else:
                failures.append(f"seed {seed} ({base}: {what}) -> {reply['outcome']}: "
                                f"{reply.get('error', '')} {reply['message']} [file {path}]")
    finally:
        worker.close()
    print(f"fuzz outcomes over {N_CASES} cases: {outcomes}")
    assert not failures, f"{len(failures)} of {N_CASES} cases failed:\n" + "\n".join(failures[:20])
    # The mutations must reach past the parser: some cases load, many are refused.
    assert outcomes.get("error", 0) > N_CASES // 4 and outcomes.get("ok", 0) > 0, outcomes
