"""The native thread pool pins its workers (one CPU each) unless told not to."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_AFFINITIES = """
import json, os
import numpy as np
from ktjax import _native
_native.set_num_threads(2)
from ktjax.host import linear as hl
h = hl.pack_float_weight(np.ones((256, 256), np.float32), "int8")
hl.linear_forward(np.ones((64, 256), np.float32), h)   # starts the pool's worker
print(json.dumps([sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]))
"""


def _run_json(tmp_path, code: str, **env):
    """The JSON that `code`, run in a fresh process with `env`, prints last. The cwd is
    outside the checkout: `python -c` must import the installed ktjax, not the sources."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thread_affinities(tmp_path, **env) -> list[list[int]]:
    return _run_json(tmp_path, _AFFINITIES, **env)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_worker_is_pinned_unless_disabled(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    assert [cpus[1]] in _thread_affinities(tmp_path)
    assert all(len(a) == len(cpus) for a in _thread_affinities(tmp_path, KTJAX_PIN_THREADS="0"))


_SPLIT_RUN = """
import json, os
import numpy as np
from ktjax import _native
from ktjax.host import linear as hl, moe as hm
rng = np.random.default_rng(0)
w = rng.standard_normal((300, 256), dtype=np.float32)
x = rng.standard_normal((40, 256), dtype=np.float32)
lin = hl.linear_forward(x, hl.pack_float_weight(w, "int8"))
E, H, I, k = 6, 128, 96, 2
experts = hm.pack_experts_float(rng.standard_normal((E, I, H), dtype=np.float32),
                                rng.standard_normal((E, I, H), dtype=np.float32),
                                rng.standard_normal((E, H, I), dtype=np.float32), "int8")
xm = rng.standard_normal((37, H), dtype=np.float32)
ids = np.stack([rng.choice(E, k, replace=False) for _ in range(37)]).astype(np.int32)
moe = hm.moe_forward(xm, ids, np.full((37, k), 0.5, np.float32), experts)
aff = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
print(json.dumps({"nodes": _native.num_nodes(), "linear": lin.tolist(), "moe": moe.tolist(), "affinity": aff}))
"""


def _split_run(tmp_path, **env) -> dict:
    return _run_json(tmp_path, _SPLIT_RUN, **{"KTJAX_NUM_THREADS": "2", **env})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_numa_nodes_split_the_work_and_keep_results(tmp_path):
    """On a made-up topology of two nodes (one allowed CPU each, plus a node with none of
    ours, a gap in the numbering and malformed cpulist parts), the pool spreads its threads
    over both nodes and the node-split linear and MoE kernels give exactly the single-node
    results."""
    cpus = sorted(os.sched_getaffinity(0))
    nodes = tmp_path / "nodes"
    for node, cpulist in {0: f"x,{cpus[0]},7-,-3", 2: f"{cpus[1]}-{cpus[1]}", 3: "4090-4095"}.items():
        (nodes / f"node{node}").mkdir(parents=True)
        (nodes / f"node{node}" / "cpulist").write_text(cpulist + "\n")
    split = _split_run(tmp_path, KTJAX_NUMA_NODES_DIR=str(nodes))
    single = _split_run(tmp_path, KTJAX_NUMA_NODES_DIR=str(tmp_path / "none"))
    assert (split["nodes"], single["nodes"]) == (2, 1)
    assert [cpus[1]] in split["affinity"]  # the worker sits on the second node's CPU
    assert split["linear"] == single["linear"]
    assert split["moe"] == single["moe"]
    unpinned = _split_run(tmp_path, KTJAX_NUMA_NODES_DIR=str(nodes), KTJAX_PIN_THREADS="0")
    assert unpinned["nodes"] == 1


_RESTARTED_POOL_RUNS = """
import numpy as np
from ktjax import _native
from ktjax.host import linear as hl
h = hl.pack_float_weight(np.ones((64, 64), np.float32), "int8")
for _ in range(300):
    _native.set_num_threads(2)                             # fresh workers ...
    hl.linear_forward(np.ones((4, 64), np.float32), h)     # ... and at once a job per node
print(_native.num_nodes())
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_fresh_workers_take_a_job_published_before_they_run(tmp_path):
    """A node-split job waits for every thread's part: a worker that first read the pool's
    generation after the job was published took the job for an old one and slept through
    it, and the caller spun for ever."""
    cpus = sorted(os.sched_getaffinity(0))
    nodes = tmp_path / "nodes"
    for node, cpu in enumerate(cpus[:2]):
        (nodes / f"node{node}").mkdir(parents=True)
        (nodes / f"node{node}" / "cpulist").write_text(f"{cpu}\n")
    out = subprocess.run([sys.executable, "-c", _RESTARTED_POOL_RUNS], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "KTJAX_NUMA_NODES_DIR": str(nodes)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


_DENORMALS_AFTER_AN_FFI_START = """
import json
import jax, jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from ktjax.gguf.quants import dequantize
from ktjax.kernels.rms_norm import rms_norm_host
# the pool is first used, its worker started, inside an FFI call on one of XLA's threads
jax.block_until_ready(jax.jit(lambda x, w: rms_norm_host(x, w, 1e-6))(
    jnp.ones((4096, 256), jnp.float32), jnp.ones((256,), jnp.float32)))
rng = np.random.default_rng(0)
blocks = rng.integers(0, 256, (4096, 17), dtype=np.uint8)
blocks[:, 0] = rng.integers(0, 2, 4096)     # e8m0 exponents 0 and 1: denormal scales
got = dequantize(blocks.reshape(-1), int(T.MXFP4), (128, 1024))
want = gguf_dequantize(blocks.reshape(-1), T.MXFP4).reshape(128, 1024)
print(json.dumps(int(np.sum(got.view(np.uint32) != want.view(np.uint32)))))
"""


def test_denormals_survive_a_pool_started_inside_xla(tmp_path):
    """XLA's threads flush denormals and threads inherit that mode: a pool started from an
    FFI call once handed it to its workers, and MXFP4's denormal scales came out as zeros."""
    assert _run_json(tmp_path, _DENORMALS_AFTER_AN_FFI_START, KTJAX_NUM_THREADS="2") == 0
