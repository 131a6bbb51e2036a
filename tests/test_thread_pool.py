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


def _thread_affinities(**env) -> list[list[int]]:
    out = subprocess.run([sys.executable, "-c", _AFFINITIES], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_worker_is_pinned_unless_disabled():
    cpus = sorted(os.sched_getaffinity(0))
    assert [cpus[1]] in _thread_affinities()
    assert all(len(a) == len(cpus) for a in _thread_affinities(KTJAX_PIN_THREADS="0"))
