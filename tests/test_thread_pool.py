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


def _thread_affinities(tmp_path, **env) -> list[list[int]]:
    # cwd outside the checkout: `python -c` must import the installed ktjax, not the sources
    out = subprocess.run([sys.executable, "-c", _AFFINITIES], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_worker_is_pinned_unless_disabled(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    assert [cpus[1]] in _thread_affinities(tmp_path)
    assert all(len(a) == len(cpus) for a in _thread_affinities(tmp_path, KTJAX_PIN_THREADS="0"))
