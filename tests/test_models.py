"""Logits of every family and quant type against transformers loading the same GGUF file."""
import gguf
import numpy as np
import pytest

from reference import hf_logits, ktjax_logits
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


def test_llama3_rope_freqs_change_logits(tmp_path):
    """rope_freqs (llama3 scaling) divides the frequencies: same weights, different logits."""
    plain = ktjax_logits(write_tiny_gguf(tmp_path / "a.gguf", "llama", seed=3), IDS)
    scaled = ktjax_logits(write_tiny_gguf(tmp_path / "b.gguf", "llama", seed=3,
                                          rope_freqs=True), IDS)
    assert np.allclose(plain[0], scaled[0], atol=1e-5)  # position 0: rope is the identity
    assert np.abs(plain[5:] - scaled[5:]).max() > 1e-3
