"""Mixture-of-experts families (qwen2moe, qwen3moe, Mixtral) against transformers loading the
same GGUF file; host (fused MoE kernel through FFI) against device (ragged_dot) experts; bad
expert metadata."""
import gguf
import jax
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.errors import TensorError, UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from reference import ktjax_logits
from test_models import IDS, _compare
from tiny_models import write_tiny_gguf

T = gguf.GGMLQuantizationType
FAMILIES = {  # Mixtral is `llama` with experts, whose size is feed_forward_length
    "qwen3moe": ("qwen3moe", dict(n_experts=8, n_used=2)),
    "qwen2moe": ("qwen2moe", dict(n_experts=8, n_used=2, shared_ffn=48)),
    "mixtral": ("llama", dict(n_experts=4, n_used=2, ffn=32)),
}
EXPERTS_ON_HOST = """
rules:
  - {name: routed experts, match: 'blk\\.\\d+\\.ffn_(gate|up|down)_exps\\.weight',
     placement: host, format: keep}
  - {name: the rest, match: '.*', placement: device, format: keep}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_families_float32(tmp_path, family):
    arch, kw = FAMILIES[family]
    _compare(write_tiny_gguf(tmp_path / f"{family}.gguf", arch, **kw), 1e-4)


def test_moe_quantized_experts(tmp_path):
    arch, kw = FAMILIES["qwen2moe"]
    _compare(write_tiny_gguf(tmp_path / "q.gguf", arch, expert_qtype=T.Q8_0, **kw), 1e-4)


@pytest.mark.parametrize("family,qtype", [("qwen3moe", T.Q8_0), ("qwen2moe", T.Q4_K),
                                          ("mixtral", T.Q8_0)])
def test_host_experts_match_device(tmp_path, family, qtype):
    """The same GGUF blocks in the fused host kernel (int8 activations) and dequantized in
    XLA's grouped matmuls: same top-1, logits within the activation quantization error."""
    arch, kw = FAMILIES[family]
    if qtype == T.Q4_K:
        kw = dict(kw, hidden=256, expert_ffn=256, head_dim=64)
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, expert_qtype=qtype, **kw)
    rules = tmp_path / "experts_host.yaml"
    rules.write_text(EXPERTS_ON_HOST)
    device, host = ktjax_logits(path, IDS), ktjax_logits(path, IDS, str(rules))
    assert np.abs(device - host).max() < 0.03 * np.abs(device).max()
    assert (device.argmax(-1) == host.argmax(-1)).all()


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a CUDA GPU")
def test_host_experts_in_a_gpu_program(tmp_path):
    """KTransformers' split: a GPU program (attention, router) calling the host MoE kernel
    through the CUDA bridge scores a prompt like the all-GPU program."""
    arch, kw = FAMILIES["qwen3moe"]
    path = str(write_tiny_gguf(tmp_path / "m.gguf", arch, expert_qtype=T.Q8_0, **kw))
    gpu = jax.devices("gpu")[0]
    split = LLM(path, dtype="float32", device=gpu, max_model_len=64)   # qwen3moe.yaml
    assert split.placement["layers.ffn_up_exps"].placement == "host"
    full = LLM(path, dtype="float32", device=gpu, max_model_len=64, rules="device")
    prompt = IDS.tolist()
    a, b = split.score(prompt), full.score(prompt)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert len(split.generate([prompt], greedy)[0].token_ids) == 8


def test_greedy_32_tokens_match_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "g.gguf", "qwen3moe", **FAMILIES["qwen3moe"][1])
    prompt = [int(t) for t in IDS[:8]]
    ours = LLM(str(path), host_linears=False, dtype="float32").generate(
        prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                              moe_intermediate_size=32)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                      do_sample=False)[0, len(prompt):].tolist()
    assert list(ours) == ref


def _inspect(path):
    return loader.inspect(GGUFFile(path))


def test_expert_count_disagrees_with_tensors(tmp_path):
    bad = np.zeros((4, 32, 64), np.float32)  # metadata says 8 experts
    path = write_tiny_gguf(tmp_path / "b.gguf", "qwen3moe", n_experts=8,
                           extra={"blk.1.ffn_up_exps.weight": bad})
    with pytest.raises(TensorError, match=r"blk\.1\.ffn_up_exps\.weight.*\(4, 32, 64\)"):
        _inspect(path)


def test_expert_ffn_disagrees_with_tensors(tmp_path):
    bad = np.zeros((8, 48, 64), np.float32)  # metadata says expert ffn 32
    path = write_tiny_gguf(tmp_path / "b.gguf", "qwen3moe", n_experts=8, expert_ffn=32,
                           extra={"blk.0.ffn_gate_exps.weight": bad})
    with pytest.raises(TensorError, match=r"ffn_gate_exps.*expected \(8, 32, 64\)"):
        _inspect(path)


@pytest.mark.parametrize("kw,match", [
    (dict(n_used=9), "expert_used_count = 9 with 8 experts"),
    (dict(extra_kv={"qwen3moe.expert_gating_func": 2}), r"expert_gating_func = 2 \(sigmoid\)"),
    (dict(extra_kv={"qwen3moe.expert_group_count": 4}), "expert_group_count = 4"),
])
def test_unsupported_routing(tmp_path, kw, match):
    path = write_tiny_gguf(tmp_path / "b.gguf", "qwen3moe", n_experts=8, **kw)
    with pytest.raises(UnsupportedModelError, match=match):
        _inspect(path)
