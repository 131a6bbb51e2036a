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
    naming the tensor and the type (Q8_K, llama.cpp's internal activation type: 256 values
    in 292 bytes per block)."""
    raw = np.zeros((256, 292), np.uint8)
    path = write_tiny_gguf(tmp_path / "iq.gguf", "llama", hidden=256, head_dim=64, ffn=256,
                           extra={"blk.1.ffn_up.weight": (raw, T.Q8_K)})
    assert GGUFFile(path).tensors["blk.1.ffn_up.weight"].shape == (256, 256)  # shape is right
    with pytest.raises(TensorError, match=r"'blk\.1\.ffn_up\.weight' uses quant type Q8_K"):
        LLM(str(path))


def test_dequantize_refuses_unsupported_quant_type(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((4, 292), np.uint8)          # 4 rows of one Q8_K block (256 values)
    w.add_tensor("token_embd.weight", raw, raw_dtype=T.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from ktjax.gguf import quants
    t = GGUFFile(path).tensors["token_embd.weight"]
    with pytest.raises(UnsupportedModelError, match="Q8_K"):
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


# ---- native entry points: each rejects what it cannot run, with an error, never a crash ----

from ktjax import _native  # noqa: E402
from ktjax.errors import KernelError  # noqa: E402


def test_pack_unknown_type_id_names_it():
    """The issue's reproducer: the error message was built from a null type name."""
    with pytest.raises(ValueError, match="type with id 99"):
        _native.pack_gguf_weight(np.zeros(32, np.uint8), 99, 1, 32)


@pytest.mark.parametrize("qtype,n,k,raw_bytes", [
    (gguf.GGMLQuantizationType.F32, 2**62, 1, 0),       # n * k * 4 wraps to 0 bytes exactly
    (gguf.GGMLQuantizationType.F16, 2**62 + 1, 2, 4),
    (gguf.GGMLQuantizationType.Q8_0, 2**62 + 1, 32, 34),
    (gguf.GGMLQuantizationType.Q4_K, 2**40, 2**40, 144),
    (gguf.GGMLQuantizationType.Q4_0, 0, 32, 0),
    (gguf.GGMLQuantizationType.Q4_0, 1, -32, 18)])
def test_pack_sizes_past_64_bits_or_not_positive(qtype, n, k, raw_bytes):
    with pytest.raises(ValueError, match="weight shape (must be positive|\\(n x k\\) overflows)"):
        _native.pack_gguf_weight(np.zeros(raw_bytes, np.uint8), int(qtype), n, k)


def test_pack_raw_must_be_uint8_bytes():
    with pytest.raises(ValueError, match="uint8"):
        _native.pack_gguf_weight(np.zeros(8, np.float32), int(gguf.GGMLQuantizationType.Q8_0),
                                 1, 32)
    raw = np.zeros((2, 3 * 34), np.uint8)[:, :34]   # not contiguous
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.pack_gguf_weight(raw, int(gguf.GGMLQuantizationType.Q8_0), 2, 32)


def test_dequantize_size_past_64_bits():
    """n_elements * 4 bytes wrapped to 0, which an empty buffer matched."""
    with pytest.raises(ValueError, match="2\\^63 bytes"):
        _native.dequantize(np.zeros(0, np.uint8), int(gguf.GGMLQuantizationType.F32), 2**62)


@pytest.fixture
def expert_sets():
    from ktjax.host import linear as hl
    from ktjax.host import moe as hm
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    routed = hm.pack_experts_float(w(2, 32, 32), w(2, 32, 32), w(2, 32, 32), "int8")
    yield routed
    hl.release(routed)


def test_moe_with_no_expert_per_token_is_an_error(expert_sets):
    """k = 0 dereferenced an empty expert set."""
    from ktjax.host import moe as hm
    x = np.ones((3, 32), np.float32)
    none_ids, none_wts = np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32)
    with pytest.raises(KernelError, match="0 experts per token"):
        hm.moe_forward(x, none_ids, none_wts, expert_sets)


def test_moe_layered_ffi_with_no_expert_per_token_is_an_error(expert_sets):
    import jax
    import jax.numpy as jnp
    from jax.errors import JaxRuntimeError
    from ktjax.host import moe as hm
    routed = expert_sets
    call = jax.jit(lambda x, i, w: hm.moe_layered(x, i, w, jnp.int32(0), (routed,)))
    with pytest.raises(JaxRuntimeError, match="experts per token"):
        jax.block_until_ready(call(jnp.ones((2, 32)), jnp.zeros((2, 0), jnp.int32),
                                   jnp.zeros((2, 0))))
    bad_id = jnp.full((2, 1), 2, jnp.int32)   # the set holds experts 0 and 1
    with pytest.raises(JaxRuntimeError, match="expert id 2 .* out of range"):
        jax.block_until_ready(call(jnp.ones((2, 32)), bad_id, jnp.ones((2, 1))))


def test_timing_bindings_need_iterations(expert_sets):
    routed = expert_sets
    with pytest.raises(ValueError, match="iters"):
        _native.time_parallel_for(0)
    with pytest.raises(ValueError, match="iters"):
        _native.time_moe(np.ones((1, 32), np.float32), [np.zeros((1, 1), np.int32)],
                         np.ones((1, 1), np.float32), [routed], 0)
    handle = _native.pack_float_weight(np.ones((16, 32), np.float32), "int8")
    try:
        with pytest.raises(ValueError, match="iters"):
            _native.time_linear([handle], np.ones((1, 32), np.float32), "", 0)
    finally:
        _native.release_weight(handle)


@pytest.mark.parametrize("fmt", ["int8", "int8_row", "int4"])
def test_subnormal_float_weights_quantize(fmt):
    """A group whose largest weight is subnormal has a scale whose reciprocal overflows: the
    values went through inf into an int cast (undefined; x86 gave -128, flipping signs)."""
    w = np.array([[1e-40, -1e-40, 5e-41, 0.0] * 8] * 16, np.float32)
    handle = _native.pack_float_weight(w, fmt)
    try:
        got = _native.unpack_weight(handle, 0)
    finally:
        _native.release_weight(handle)
    step = (2e-40 / 15) if fmt == "int4" else (1e-40 / 127)
    np.testing.assert_allclose(got, w, rtol=0, atol=step)
