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


def test_layers_mode_unrolls_the_decoder(tmp_path, monkeypatch):
    """KTJAX_COMMAND_BUFFERS=layers: the graph flags of mode 1, and the decoder's step has no
    loop over layers left (a `while` XLA may keep out of the graph), with the same tokens."""
    from tiny_models import write_tiny_gguf
    from ktjax import LLM, SamplingParams
    from ktjax.engine.buckets import StepBucket
    assert xla_flags.wanted_flags("layers") == xla_flags.wanted_flags("1")
    path = write_tiny_gguf(tmp_path / "m.gguf", n_layers=3)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = {}
    for value in ("1", "layers"):
        monkeypatch.setenv("KTJAX_COMMAND_BUFFERS", value)
        llm = LLM(str(path), max_model_len=64)
        programs = llm.engine.programs
        text = programs._forward.trace(*programs.lower_args(
            ("step", StepBucket(1, 0, 0, 1), None))).lower().as_text()
        out[value] = ("stablehlo.while" in text,
                      llm.generate([[1, 2, 3, 4]], greedy)[0].token_ids)
    assert out["1"][0] and not out["layers"][0]
    assert out["1"][1] == out["layers"][1]
    monkeypatch.setenv("KTJAX_COMMAND_BUFFERS", "yes")
    with pytest.raises(ValueError, match="KTJAX_COMMAND_BUFFERS"):
        xla_flags.unrolled_layers()
