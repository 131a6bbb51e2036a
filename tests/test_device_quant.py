"""Quantized device matrices (ktjax.device_quant): every format's dequantized matrix against its
reference (bit-exact with gguf.quants for `keep`), both matmul forms, a model's logits with
quantized device matrices against the dequantized path, and `ktjax info --rules` bytes."""
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import device_quant as dq
from ktjax import rules as placement_rules
from ktjax.engine.kv_cache import make_kv_cache
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import REFERENCE
from ktjax.models import loader
from ktjax.models.base import Batch
from ktjax.models.info import describe
from tiny_models import write_tiny_gguf

T = gguf.GGMLQuantizationType
# Byte offsets of each block type's float16 fields (scales and mins).
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
              T.Q6_K: (208,)}


def _random_blocks(rng, qtype, n, k):
    """Random raw blocks of a [n, k] tensor, with random finite float16 scales and mins."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // elems, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = (rng.standard_normal((n, k // elems)) * 1e-2).astype(np.float16)
        raw[..., off:off + 2] = vals.view(np.uint8).reshape(n, k // elems, 2)
    return raw.reshape(n, -1)


def _device(arrays_statics, fmt):
    arrays, statics = arrays_statics
    return dq.QuantMatrix(**{k: jnp.asarray(v) for k, v in arrays.items()}, **statics,
                          format=fmt)


@pytest.mark.parametrize("qtype", dq.KEEP_QTYPES, ids=lambda q: q.name)
def test_keep_is_bit_identical_to_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 6, 768
    raw = _random_blocks(rng, qtype, n, k)
    qm = _device(dq.pack_gguf(raw, qtype, (n, k)), "keep")
    got = np.asarray(jax.jit(dq.dequantize)(qm))
    ref = gguf.quants.dequantize(raw, qtype)
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert qm.nbytes == dq.packed_nbytes(qtype, (n, k), "keep")


@pytest.mark.parametrize("qtype", dq.K_MIX_QTYPES, ids=lambda q: q.name)
def test_k_quants_widen_losslessly(qtype):
    """The common layout of mixed K-quant layers dequantizes bit-identically too."""
    rng = np.random.default_rng(10 + int(qtype))
    n, k = 4, 512
    raw = _random_blocks(rng, qtype, n, k)
    qm = _device(dq.widen_to_k8(dq.pack_gguf(raw, qtype, (n, k)), n, k), "keep")
    got = np.asarray(jax.jit(dq.dequantize)(qm))
    np.testing.assert_array_equal(got.view(np.uint32),
                                  gguf.quants.dequantize(raw, qtype).view(np.uint32))
    assert qm.nbytes == dq.packed_nbytes(qtype, (n, k), "keep", k_mixed=True)


def _np_dequant_int(arrays, statics):
    """int8 / int4 in plain numpy from the stored codes (the formats' definition)."""
    g = statics["group"]
    if statics["bits"] == 8:
        q = arrays["codes"].astype(np.float32)
        n, k = q.shape
        return (q.reshape(n, k // g, g) * arrays["scale"][..., None]).reshape(n, k)
    c = arrays["codes"]
    n, k = c.shape[0], c.shape[1] * 2
    c = c.reshape(n, k // g, g // 2)
    q = np.concatenate([c & 15, c >> 4], axis=-1).astype(np.float32)
    w = arrays["scale"].astype(np.float32)[..., None] * q + \
        arrays["bias"].astype(np.float32)[..., None]
    return w.reshape(n, k)


@pytest.mark.parametrize("fmt,k,tol", [("int8", 256, 0.006), ("int8", 96, 0.006),
                                       ("int4", 256, 0.07)])
def test_int_formats(fmt, k, tol):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, k)).astype(np.float32)
    w[3] = 0.0                                             # an all-zero row: scale 0
    packed = dq.quantize_int8(w) if fmt == "int8" else dq.quantize_int4(w)
    qm = _device(packed, fmt)
    got = np.asarray(dq.dequantize(qm))
    np.testing.assert_array_equal(got, _np_dequant_int(*packed))
    # error within half a quantization step of each group's range
    assert np.abs(got - w).max() <= tol * np.abs(w).max()
    assert not got[3].any()
    assert qm.nbytes == dq.packed_nbytes(T.F32, w.shape, fmt)


def test_concat_rows_needs_one_layout():
    rng = np.random.default_rng(2)
    a = _device(dq.pack_gguf(_random_blocks(rng, T.Q4_K, 4, 256), T.Q4_K, (4, 256)), "keep")
    b = _device(dq.pack_gguf(_random_blocks(rng, T.Q6_K, 4, 256), T.Q6_K, (4, 256)), "keep")
    assert dq.concat_rows([a, b]) is None
    ab = dq.concat_rows([a, a])
    np.testing.assert_array_equal(np.asarray(dq.dequantize(ab)),
                                  np.tile(np.asarray(dq.dequantize(a)), (2, 1)))


def _every_layout(rng, n: int = 8) -> list:
    """One QuantMatrix per layout the loader makes: each keep type, widened K-quants, int8,
    int4, and rows concatenated with splits."""
    k = 512
    keep = [_device(dq.pack_gguf(_random_blocks(rng, q, n, k), q, (n, k)), "keep")
            for q in dq.KEEP_QTYPES]
    widened = _device(dq.widen_to_k8(dq.pack_gguf(_random_blocks(rng, T.Q4_K, n, k), T.Q4_K,
                                                  (n, k)), n, k), "keep")
    w = rng.standard_normal((n, k)).astype(np.float32)
    ints = [_device(dq.quantize_int8(w), "int8"), _device(dq.quantize_int4(w), "int4")]
    return [*keep, widened, *ints, dq.concat_rows([keep[3], keep[3]])]


def test_quant_matrices_round_trip_through_the_weights_file(tmp_path):
    """Exported artifacts hold GPU programs' device matrices: each layout comes back with
    the same arrays and layout fields, so its dequantized matrix is the same."""
    from ktjax.export import packed_weights
    mats = _every_layout(np.random.default_rng(5))
    assert all(dq.layout_problem(m) is None for m in mats)
    packed_weights.write(tmp_path / "q.ktw", {"layers": {str(i): m for i, m in enumerate(mats)}})
    back = packed_weights.read(tmp_path / "q.ktw", jax.devices()[0])["layers"]
    for i, m in enumerate(mats):
        b = back[str(i)]
        assert jax.tree.structure(b) == jax.tree.structure(m)   # layout fields are static
        for x, y in zip(jax.tree.leaves(m), jax.tree.leaves(b)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("edit,message", [
    (lambda q: q["layout"].__setitem__("bits", 5), "bits 5"),
    (lambda q: q["layout"].__setitem__("scale_group", 24), "groups"),
    (lambda q: q["layout"].__setitem__("group", 64), "sub_scale of shape"),
    (lambda q: q.__setitem__("splits", [3]), "splits"),
    (lambda q: q["arrays"].__setitem__("sub_min", None), "min_scale without sub_min"),
    (lambda q: q["layout"].__setitem__("format", 7), "malformed"),
])
def test_crafted_quant_matrices_are_refused(tmp_path, edit, message):
    import json
    import struct

    from ktjax.errors import ArtifactError
    from ktjax.export import packed_weights
    qm = _device(dq.pack_gguf(_random_blocks(np.random.default_rng(6), T.Q4_K, 8, 512), T.Q4_K,
                              (8, 512)), "keep")
    path = tmp_path / "q.ktw"
    packed_weights.write(path, {"w": qm})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + n])
    edit(header["tree"]["dict"]["w"]["quant_matrix"])
    text = json.dumps(header).encode()
    start = -(-(16 + n) // packed_weights.ALIGN) * packed_weights.ALIGN
    assert 16 + len(text) <= start
    path.write_bytes(data[:8] + struct.pack("<Q", len(text)) + text +
                     bytes(start - 16 - len(text)) + data[start:])
    with pytest.raises(ArtifactError, match=message):
        packed_weights.read(path, jax.devices()[0])


def test_int4_needs_whole_groups():
    with pytest.raises(Exception, match="multiple of 32"):
        dq.quantize_int4(np.zeros((2, 48), np.float32))


@pytest.mark.parametrize("rows", [1, 3, 24])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_0])
def test_linear_forms_match_the_dequantized_matmul(qtype, rows, monkeypatch):
    """Reduction form (few rows) and dequantize + dot form (more rows) both equal x @ W.T."""
    rng = np.random.default_rng(rows)
    n, k = 40, 512
    qm = _device(dq.pack_gguf(_random_blocks(rng, qtype, n, k), qtype, (n, k)), "keep")
    x = rng.standard_normal((rows, k)).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(dq.dequantize(qm), np.float64).T
    for limit in (0, 64):                                  # force each form
        monkeypatch.setenv("KTJAX_QUANT_REDUCE_ROWS", str(limit))
        with jax.default_matmul_precision("highest"):
            y = np.asarray(jax.jit(dq.linear)(qm, jnp.asarray(x)))
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def _logits(path, ids, rules, keep_quantized, dtype=jnp.float32):
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    placement = placement_rules.place(f, spec.table, cfg.n_layers, rules, "gpu")
    params = loader.load_params(f, spec, placement, dtype, keep_quantized=keep_quantized)
    forward = spec.family.make_forward(cfg, REFERENCE)
    t, page = len(ids), 4
    n_pages = -(-t // page)
    kv = make_kv_cache(cfg.cache_spec, n_pages + 1, page, jnp.float32)
    batch = Batch(tokens=jnp.asarray(ids[None], jnp.int32),
                  positions=jnp.arange(t, dtype=jnp.int32)[None],
                  slots=jnp.arange(t, dtype=jnp.int32)[None] + page,
                  block_tables=jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None],
                  cache_lens=jnp.array([0], jnp.int32),
                  logits_index=jnp.arange(t, dtype=jnp.int32)[None])
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(forward)(params, kv, batch)
    return params, np.asarray(logits[0])


IDS = np.random.default_rng(3).integers(3, 259, 9)
DIMS = dict(hidden=256, head_dim=64, n_heads=4, n_kv_heads=2, ffn=256)


@pytest.fixture(scope="module")
def q4k_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("dq") / "q4k.gguf", "llama", T.Q4_K,
                           tied=False, **DIMS)


def test_model_keep_quantized_matches_dequantized(tmp_path, q4k_path):
    """GPU default (keep stays quantized): the same logits as the dequantized path; q/k/v
    and gate/up fused into one matrix each; a tied Q8_0 head is a quantized copy of the
    embedding."""
    params, quant = _logits(q4k_path, IDS, "device", True)
    qkv = params["layers"]["attn_q+attn_k+attn_v"]
    assert isinstance(qkv, dq.QuantMatrix) and qkv.splits == (256, 128, 128)
    assert qkv.codes.shape == (2, 512, 128)                           # layers stacked
    assert "attn_q" not in params["layers"] and "ffn_gate+ffn_up" in params["layers"]
    assert isinstance(params["output"], dq.QuantMatrix)
    _, dense = _logits(q4k_path, IDS, "device", False)
    np.testing.assert_allclose(quant, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    tied = write_tiny_gguf(tmp_path / "q8.gguf", "llama", T.Q8_0, hidden=64, ffn=128)
    params, quant = _logits(tied, IDS, "device", True)
    assert params["output"].format == "keep" and params["output"].codes.dtype == np.int8
    _, dense = _logits(tied, IDS, "device", False)
    np.testing.assert_allclose(quant, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def test_model_mixed_k_quant_layers(tmp_path):
    """A Q4_K_M-style file (one layer's ffn_down in Q6_K) keeps that parameter quantized in
    the common layout, with the dequantized path's logits."""
    rng = np.random.default_rng(5)
    q6 = _random_blocks(rng, T.Q6_K, DIMS["hidden"], DIMS["ffn"])
    path = write_tiny_gguf(tmp_path / "mix.gguf", "llama", T.Q4_K, tied=False,
                           extra={"blk.1.ffn_down.weight": (q6, T.Q6_K)}, **DIMS)
    params, quant = _logits(path, IDS, "device", True)
    down = params["layers"]["ffn_down"]
    assert isinstance(down, dq.QuantMatrix) and down.codes.dtype == np.int8 and down.group == 16
    _, dense = _logits(path, IDS, "device", False)
    np.testing.assert_allclose(quant, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("int4", 0.25)])
def test_model_int_formats_near_dequantized(tmp_path, q4k_path, fmt, tol):
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n- {name: embd, match: 'token_embd\\.weight', placement: device, "
                     f"format: keep}}\n- {{name: q, match: '.*', placement: device, "
                     f"format: {fmt}}}\n")
    params, quant = _logits(q4k_path, IDS, str(rules), False)
    assert params["layers"]["ffn_down"].format == fmt
    assert params["layers"]["ffn_gate+ffn_up"].format == fmt
    _, dense = _logits(q4k_path, IDS, "device", False)
    assert np.abs(quant - dense).max() <= tol * np.abs(dense).max()


def test_info_reports_the_arrays_bytes(tmp_path, q4k_path, monkeypatch):
    """`ktjax info --rules` on a GPU: the device MiB of each rule equal the loaded arrays."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("KTJAX_QUANT_KERNEL", "xla")   # the programs still run on this CPU
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n- {name: ffn, match: '.*ffn_(gate|up|down)\\.weight', "
                     "placement: device, format: int4}\n"
                     "- {name: rest, match: '.*', placement: device, format: keep}\n")
    text = describe(str(q4k_path), str(rules))
    mib = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(ffn|rest)\s.*?([\d.]+) MiB$", text,
                                                   re.M)}
    params, _ = _logits(q4k_path, IDS[:2], str(rules), True, jnp.bfloat16)
    layers = params["layers"]
    ffn = sum(layers[k].nbytes for k in ("ffn_gate+ffn_up", "ffn_down"))
    rest = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params)) - ffn
    assert mib["ffn"] == pytest.approx(ffn / 2 ** 20, abs=0.006)
    assert mib["rest"] == pytest.approx(rest / 2 ** 20, abs=0.006)


LAYOUT_IDS = [*(q.name for q in dq.KEEP_QTYPES), "k8", "int8", "int4", "concat"]


@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("tuning", ["values=64,magic=0", "values=1024,stages=1"])
def test_pallas_gemv_matches_reference(rows, tuning, monkeypatch):
    """The Pallas GEMV (interpret mode here) against float64 x @ W.T, every layout: FMA
    rows and tensor-core rows, tiles narrower than a K-quant's super-block (one d per
    tile) and wider (several), the exponent trick and the plain conversion."""
    from ktjax.kernels import quant_matmul
    monkeypatch.setenv("KTJAX_QUANT_GEMV", tuning)
    rng = np.random.default_rng(rows)
    for name, qm in zip(LAYOUT_IDS, _every_layout(rng, n=16)):
        x = rng.standard_normal((rows, qm.shape[1])).astype(np.float32)
        want = x.astype(np.float64) @ np.asarray(dq.dequantize(qm), np.float64).T
        got = np.asarray(quant_matmul.gemv(qm, jnp.asarray(x), block_rows=16, interpret=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_pallas_gemv_triton_lowering_succeeds_without_a_gpu(rows):
    """Lowering for CUDA runs the Triton lowering rules here: an op they lack or a tile that
    is not a power of two fails in CI, not on the GPU machine."""
    from ktjax.kernels import quant_matmul
    for name, qm in zip(LAYOUT_IDS, _every_layout(np.random.default_rng(1), n=16)):
        x = jax.ShapeDtypeStruct((rows, qm.shape[1]), jnp.bfloat16)
        f = jax.jit(lambda q, v: quant_matmul.gemv(q, v, block_rows=16))
        text = f.trace(qm, x).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text, name


def test_pallas_gemv_reads_a_bound_layer_of_a_stack():
    """A stacked matrix with its layer bound (as inside the scan over layers): the kernel
    reads that layer in place and gives the layer's own product."""
    from ktjax.kernels import quant_matmul
    rng = np.random.default_rng(7)
    n, k = 32, 512
    per_layer = [dq.pack_gguf(_random_blocks(rng, T.Q4_K, n, k), T.Q4_K, (n, k))
                 for _ in range(3)]
    stack = dq.stack_to_device(per_layer, "keep", True, None)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    f = jax.jit(lambda qm, x, layer: quant_matmul.gemv(qm.at_layer(layer), x, interpret=True))
    for layer in range(3):
        want = np.asarray(dq.linear(stack.at_layer(jnp.int32(layer)).layer_slice(), x))
        np.testing.assert_allclose(np.asarray(f(stack, x, jnp.int32(layer))), want,
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.Q6_K, T.Q4_0])
def test_gathered_gemv_gives_each_row_its_own_matrix(qtype):
    """gathered_gemv (MoE decode over a pool of experts): row p times matrix index[p] of the
    stack, repeats and any pair count included; it lowers for CUDA too."""
    from ktjax.kernels import quant_matmul
    rng = np.random.default_rng(int(qtype))
    n, k, experts = 16, 512, 5
    stack = dq.stack_to_device([dq.pack_gguf(_random_blocks(rng, qtype, n, k), qtype, (n, k))
                                for _ in range(experts)], "keep", True, None)
    index = jnp.asarray([3, 0, 3, 4, 1, 2], jnp.int32)
    x = rng.standard_normal((6, k)).astype(np.float32)
    got = np.asarray(quant_matmul.gathered_gemv(stack, index, jnp.asarray(x), interpret=True))
    w = np.asarray(dq.dequantize(stack), np.float64)
    want = np.einsum("pk,pnk->pn", x.astype(np.float64), w[np.asarray(index)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert quant_matmul.gathered_supported(stack, 6)
    assert not quant_matmul.gathered_supported(stack, 65)
    assert not quant_matmul.gathered_supported(stack.at_layer(jnp.int32(0)), 6)
    f = jax.jit(lambda q, i, v: quant_matmul.gathered_gemv(q, i, v))
    spec = jax.ShapeDtypeStruct((6, k), jnp.bfloat16)
    assert "__gpu$xla.gpu.triton" in f.trace(stack, index, spec).lower(
        lowering_platforms=("cuda",)).as_text()


def test_pallas_gemv_takes_and_refuses(monkeypatch):
    """What the kernel takes: power-of-two rows and row blocks dividing N; tensor-core
    rows need 16 weight rows per program; a bad KTJAX_QUANT_GEMV is named."""
    from ktjax.kernels import quant_matmul
    qm = _every_layout(np.random.default_rng(0), n=64)[3]
    assert quant_matmul.supported(qm, 1) and quant_matmul.supported(qm, 64)
    assert not quant_matmul.supported(qm, 3) and not quant_matmul.supported(qm, 1, 128)
    assert not quant_matmul.supported(qm, 16, 8) and not quant_matmul.supported(qm, 1, 24)
    assert quant_matmul.block_rows_for(4096) == 8 and quant_matmul.block_rows_for(12) == 0
    assert quant_matmul.block_rows_for(1024, 16) == 16
    assert quant_matmul.block_rows_for(4096, 64) == 32
    # a tensor-core tile's shared memory (x per pipeline stage + the dequantized tile)
    # within half the H100's 227 KB: 64 bf16 rows -> 256 values, float32 -> 128
    assert quant_matmul.dot_values(64, 32, 2, 2) == 256
    assert quant_matmul.dot_values(64, 32, 4, 2) == 128
    assert quant_matmul.tile_units(9, 64, 1024) == 1
    assert quant_matmul.tile_units(24, 64, 1024) == 8
    with pytest.raises(ValueError, match="rows per program"):
        quant_matmul.gemv(qm, jnp.zeros((3, 512)), interpret=True)
    for bad in ("rows=x", "colour=3", "values"):
        monkeypatch.setenv("KTJAX_QUANT_GEMV", bad)
        with pytest.raises(ValueError, match="KTJAX_QUANT_GEMV"):
            quant_matmul.tuning_from_env()


def test_model_with_pallas_gemv(q4k_path, monkeypatch):
    """Decode-sized steps through the Pallas GEMV inside the scan: the reduction form's
    logits."""
    from ktjax.kernels import quant_matmul
    ids = IDS[:1]
    _, want = _logits(q4k_path, ids, "device", True)
    calls = []
    gemv = quant_matmul.gemv
    monkeypatch.setattr(quant_matmul, "gemv",
                        lambda qm, *a, **k: calls.append(qm.codes.ndim) or gemv(qm, *a, **k))
    monkeypatch.setenv("KTJAX_QUANT_KERNEL", "pallas")
    _, got = _logits(q4k_path, ids, "device", True)
    # qkv, o, gate+up, down: traced once in the scan (head: N=261), each given the whole
    # stack with the layer bound (a slice would be copied out for the custom call)
    assert calls == [3, 3, 3, 3]

    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.Q6_K])
def test_gpu_forms_and_pallas_gemv(qtype, monkeypatch):
    """On the GPU: both XLA forms and the Triton-lowered GEMV against float64."""
    from ktjax.kernels import quant_matmul
    rng = np.random.default_rng(4)
    n, k = 256, 1024
    qm = _device(dq.pack_gguf(_random_blocks(rng, qtype, n, k), qtype, (n, k)), "keep")
    x = rng.standard_normal((16, k)).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(dq.dequantize(qm), np.float64).T
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for rows in (4, 16):                                    # FMA tiles, tensor-core tiles
        np.testing.assert_allclose(np.asarray(quant_matmul.gemv(qm, jnp.asarray(x[:rows]))),
                                   want[:rows], **tol)
    for limit in (0, 64):
        monkeypatch.setenv("KTJAX_QUANT_REDUCE_ROWS", str(limit))
        np.testing.assert_allclose(np.asarray(jax.jit(dq.linear)(qm, jnp.asarray(x))), want,
                                   **tol)


def test_bad_input_is_named(monkeypatch, tmp_path):
    """Unsupported types, mixed layouts, odd widths and bad settings fail with the reason."""
    from ktjax.errors import TensorError
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 256, (2, 84), dtype=np.uint8)
    with pytest.raises(TensorError, match="no packed layout for Q2_K"):
        dq.pack_gguf(raw, T.Q2_K, (2, 256))
    a = dq.pack_gguf(_random_blocks(rng, T.Q4_K, 2, 256), T.Q4_K, (2, 256))
    b = dq.pack_gguf(_random_blocks(rng, T.Q6_K, 2, 256), T.Q6_K, (2, 256))
    with pytest.raises(TensorError, match="different layouts"):
        dq.stack_to_device([a, b], "keep", True, None)
    # int4 on a model whose matrices are 48 wide: the error names the tensor
    path = write_tiny_gguf(tmp_path / "w48.gguf", "llama", hidden=48, n_heads=3,
                           n_kv_heads=1, head_dim=16, ffn=96)
    rules = tmp_path / "r.yaml"
    rules.write_text("rules:\n- {match: 'token_embd\\.weight', placement: device, format: keep}\n"
                     "- {match: '.*', placement: device, format: int4}\n")
    with pytest.raises(TensorError, match=r"blk\.0\.attn_q\.weight: format int4 needs .* 32"):
        _logits(path, IDS[:2], str(rules), False)
    qm = _device(a, "keep")
    x = jnp.ones((1, 256), jnp.float32)
    monkeypatch.setenv("KTJAX_QUANT_REDUCE_ROWS", "many")
    with pytest.raises(ValueError, match="KTJAX_QUANT_REDUCE_ROWS must be a row count"):
        dq.linear(qm, x)
    monkeypatch.setenv("KTJAX_QUANT_REDUCE_ROWS", "8")
    monkeypatch.setenv("KTJAX_QUANT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="KTJAX_QUANT_KERNEL must be auto, xla or pallas"):
        dq.linear(qm, x)


@pytest.mark.parametrize("setting,backend,rows,pallas", [
    (None, "gpu", 1, False), (None, "gpu", 16, False), (None, "cpu", 16, False),
    ("xla", "gpu", 16, False), ("pallas", "cpu", 1, True), ("pallas", "gpu", 64, True)])
def test_matmul_form_choice(monkeypatch, setting, backend, rows, pallas):
    """auto: XLA's forms until the wide-tile GEMV has run on a GPU (PALLAS_AUTO_ROWS is
    empty); xla / pallas force a side."""
    if setting:
        monkeypatch.setenv("KTJAX_QUANT_KERNEL", setting)
    else:
        monkeypatch.delenv("KTJAX_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert dq.use_pallas_kernel(rows) == pallas
