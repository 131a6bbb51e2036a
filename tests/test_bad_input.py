"""Malformed models: every case is a ktjax error naming the problem, never a crash."""
import gguf
import numpy as np
import pytest

from ktjax import LLM
from ktjax.errors import GGUFError, TensorError, UnsupportedModelError
from ktjax.gguf.reader import GGUFFile
from ktjax.models import loader
from ktjax.rules import place
from tiny_models import write_tiny_gguf

T = gguf.GGMLQuantizationType


def _load(path):
    f = GGUFFile(path)
    spec = loader.inspect(f)
    return loader.load_params(f, spec, place(f, spec.table, spec.config.n_layers, "device",
                                             "cpu"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("bad") / "good.gguf", "llama")


@pytest.mark.parametrize("keep", [3, 20, 200, 2000, -100])
def test_truncated_file(good, tmp_path, keep):
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(GGUFError, match="truncated|not a GGUF"):
        _load(cut)


def test_bad_magic_and_empty(good, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(GGUFError, match="bad magic"):
        GGUFFile(bad)
    bad.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        GGUFFile(bad)
    with pytest.raises(GGUFError, match="no such"):
        GGUFFile(tmp_path / "missing.gguf")


def test_corrupt_length_field(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")   # first key's length: absurd
    bad = tmp_path / "len.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        GGUFFile(bad)


def test_unknown_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", "llama")
    data = path.read_bytes().replace(b"llama.", b"xlama.").replace(
        b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00xlama")
    path.write_bytes(data)
    with pytest.raises(UnsupportedModelError, match="'xlama'"):
        _load(path)


def test_missing_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", skip=("blk.1.ffn_up.weight",))
    with pytest.raises(TensorError, match="blk.1.ffn_up.weight"):
        _load(path)


def test_misshaped_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "s.gguf",   # `extra` replaces the right-shaped tensor
                           extra={"blk.0.attn_norm.weight": np.ones(65, np.float32)})
    with pytest.raises(TensorError, match=r"blk.0.attn_norm.weight.*\(65,\)"):
        _load(path)


def test_unexpected_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "u.gguf", extra={"blk.0.mystery.weight": np.ones(4,
                                                                                 np.float32)})
    with pytest.raises(TensorError, match="mystery"):
        _load(path)


def test_loader_refuses_unsupported_quant_type(tmp_path):
    """A model whose tensor uses a GGML type ktjax has no kernels for is refused when loaded,
    naming the tensor and the type (IQ2_XXS: 256 values in 66 bytes per block)."""
    raw = np.zeros((256, 66), np.uint8)
    path = write_tiny_gguf(tmp_path / "iq.gguf", "llama", hidden=256, head_dim=64, ffn=256,
                           extra={"blk.1.ffn_up.weight": (raw, T.IQ2_XXS)})
    assert GGUFFile(path).tensors["blk.1.ffn_up.weight"].shape == (256, 256)  # shape is right
    with pytest.raises(TensorError, match=r"'blk\.1\.ffn_up\.weight' uses quant type IQ2_XXS"):
        LLM(str(path))


def test_dequantize_refuses_unsupported_quant_type(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((4, 66), np.uint8)           # 4 rows of one IQ2_XXS block (256 values)
    w.add_tensor("token_embd.weight", raw, raw_dtype=T.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from ktjax.gguf import quants
    t = GGUFFile(path).tensors["token_embd.weight"]
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        quants.dequantize(t.data, t.qtype, t.shape)


def test_missing_metadata_key(tmp_path):
    path = write_tiny_gguf(tmp_path / "k.gguf")
    path.write_bytes(path.read_bytes().replace(b"llama.block_count", b"llama.block_cnxxt"))
    with pytest.raises(GGUFError, match="llama.block_count"):
        _load(path)


@pytest.mark.parametrize("arch,metadata,match", [
    ("llama", {"llama.expert_count": 8},
     r"llama\.expert_used_count = 0 with 8 experts \(expected 1\.\.expert_count\)"),
    ("llama", {"llama.expert_count": 8, "llama.expert_used_count": 9},
     r"llama\.expert_used_count = 9 with 8 experts"),
    ("llama", {"llama.expert_count": 8, "llama.expert_used_count": 2,
               "llama.expert_gating_func": 2},
     r"llama\.expert_gating_func = 2 \(sigmoid\) is not supported for llama"),
    ("qwen2", {"qwen2.expert_count": 8, "qwen2.expert_used_count": 2},
     "qwen2 with 8 experts is not supported"),
])
def test_unsupported_expert_configs_are_refused(tmp_path, arch, metadata, match):
    """Mixtral (llama with experts) loads (tests/test_moe.py); these expert metadata cannot
    run and are refused with the key that makes them so."""
    path = write_tiny_gguf(tmp_path / "moe.gguf", arch, extra_kv=metadata)
    with pytest.raises(UnsupportedModelError, match=match):
        loader.inspect(GGUFFile(path))
