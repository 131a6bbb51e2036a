"""Logits of every family and quant type against transformers loading the same GGUF file."""
import gguf
import numpy as np
import pytest

from ktjax.gguf.reader import GGUFFile
from reference import hf_logits, hf_model, hf_run, ktjax_logits
from tiny_models import write_tiny_gguf

T = gguf.GGMLQuantizationType
IDS = np.random.default_rng(7).integers(3, 259, 21)
KQUANT_DIMS = dict(hidden=256, head_dim=64, n_heads=4, n_kv_heads=2, ffn=256)


def _compare(path, tol):
    ours, ref = ktjax_logits(path, IDS), hf_logits(path, IDS)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{path.name}: max abs diff {diff:.2e}, top-1 agreement {top1:.3f}")
    assert diff < tol * max(1.0, np.abs(ref).max())
    assert top1 == 1.0


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}), ("llama", {"tied": False}), ("qwen2", {}), ("qwen3", {}),
    ("gemma3", {"n_layers": 7}),   # 7 layers: local layers 0-4 and 6, global layer 5
])
def test_families_float32(tmp_path, arch, kw):
    _compare(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, **kw), 1e-4)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0])
def test_block_quants(tmp_path, qtype):
    _compare(write_tiny_gguf(tmp_path / f"{qtype.name}.gguf", "qwen2", qtype), 1e-4)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K])
def test_k_quants(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"{qtype.name}.gguf", "llama", qtype, **KQUANT_DIMS)
    _compare(path, 1e-4)


def test_gemma3_k_quants(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", "gemma3", T.Q4_K, n_layers=6, **KQUANT_DIMS)
    _compare(path, 1e-4)


def test_llama3_rope_freqs_divide_each_frequency(tmp_path):
    """rope_freqs (llama3-style scaling) divides RoPE frequency i by factor i, as llama.cpp
    does: logits match transformers' Llama whose inverse frequencies are divided by the same
    factors (its GGUF loader ignores the tensor), and differ from the undivided ones."""
    import torch

    path = write_tiny_gguf(tmp_path / "llama3.gguf", "llama", seed=3, rope_freqs=True)
    t = GGUFFile(path).tensors["rope_freqs.weight"]
    factors = np.frombuffer(t.data, np.float32)
    assert factors.min() == 1 and factors.max() == 8       # a real spread of divisors
    model = hf_model(path)
    plain = hf_run(model, IDS)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq / torch.from_numpy(factors.copy())
    ours, ref = ktjax_logits(path, IDS), hf_run(model, IDS)
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(ours[5:] - plain[5:]).max() > 1e-3      # the factors do change the logits
