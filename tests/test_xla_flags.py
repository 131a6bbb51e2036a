"""The CUDA graph flags (ktjax.engine.xla_flags): merged into XLA_FLAGS without overriding the
user's, switchable, and accepted by this jax's XLA (an unknown flag aborts the process)."""
import os
import subprocess
import sys

import pytest

from ktjax.engine import xla_flags


def test_merged_keeps_user_flags():
    flags = xla_flags.wanted_flags("1")
    assert flags["xla_gpu_enable_command_buffer"] == "+WHILE,+CONDITIONAL"
    user = "--xla_gpu_graph_min_graph_size=7 --xla_dump_to=/tmp/x"
    out = xla_flags.merged(user, flags)
    assert "--xla_gpu_graph_min_graph_size=7" in out and "min_graph_size=1" not in out
    assert "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" in out
    assert xla_flags.merged(out, flags) == out                   # idempotent


def test_modes():
    assert xla_flags.wanted_flags("0") == {}
    assert xla_flags.wanted_flags("unroll")["xla_gpu_command_buffer_unroll_loops"] == "true"
    with pytest.raises(ValueError, match="KTJAX_COMMAND_BUFFERS"):
        xla_flags.wanted_flags("yes")


def test_flags_parse_in_this_xla():
    """A fresh process imports ktjax first (flags applied), then starts jax's backend."""
    env = {**os.environ, "KTJAX_COMMAND_BUFFERS": "unroll"}
    env.pop("XLA_FLAGS", None)
    code = ("import ktjax, os, jax; jax.numpy.ones(2).block_until_ready(); "
            "print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--xla_gpu_command_buffer_unroll_loops=true" in out.stdout
