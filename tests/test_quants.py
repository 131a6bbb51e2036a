"""ktjax.gguf.quants.dequantize against gguf.quants.dequantize, bit for bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktjax import _native
from ktjax.errors import GGUFError, UnsupportedModelError
from ktjax.gguf.quants import F16_FIELD_OFFSETS, SUPPORTED_QTYPES, dequantize

T = GGMLQuantizationType
QTYPES = sorted(SUPPORTED_QTYPES, key=int)
BLOCK_QTYPES = [t for t in QTYPES if GGML_QUANT_SIZES[t][0] > 1]


def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random GGUF bytes for a tensor of `shape`, laid out as GGUFReader gives them.

    Quantized types get random bytes with finite float16 scales (random bytes would give
    NaN/Inf scales); F32/F16/BF16 are random bit patterns, NaNs and infinities included.
    """
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELD_OFFSETS.get(qtype, ()):
        scales = rng.standard_normal(n_blocks).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw, qtype)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    width = {4: np.uint32, 2: np.uint16}[got.dtype.itemsize]
    bad = np.flatnonzero(got.view(width) != want.view(width))
    assert bad.size == 0, f"{bad.size} elements differ, first at {bad[0]}: " \
        f"{got.reshape(-1)[bad[0]]!r} vs {want.reshape(-1)[bad[0]]!r}"


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape_blocks", [(1,), (3,), (7, 5), (2, 3, 9)])
def test_bit_exact_small(qtype: GGMLQuantizationType, shape_blocks: tuple[int, ...]) -> None:
    block_size = max(GGML_QUANT_SIZES[qtype][0], 32)  # float types: odd rows of 32
    shape = (*shape_blocks[:-1], shape_blocks[-1] * block_size)
    raw = random_blocks(qtype, shape, seed=sum(shape) + int(qtype))
    want = reference(raw, qtype)
    got = dequantize(raw, qtype, shape)
    assert got.shape == shape
    assert_bits_equal(got, want)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_bit_exact_large_threaded(qtype: GGMLQuantizationType) -> None:
    shape = (257, 2048)  # ~0.5 M elements: split across the thread pool, odd row count
    raw = random_blocks(qtype, shape, seed=int(qtype))
    got = dequantize(raw, int(qtype), shape)
    assert_bits_equal(got, reference(raw, qtype))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_typed_float_views_accepted(qtype: GGMLQuantizationType) -> None:
    """GGUFReader hands F32/F16/BF16 data out as typed arrays; any view must work."""
    shape = (4, 256)
    raw = random_blocks(qtype, shape, seed=1)
    typed = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}.get(qtype, np.uint8)
    got = dequantize(raw.view(typed), qtype, shape)
    assert_bits_equal(got, reference(raw, qtype))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 256), (65, 4096)])
def test_bfloat16_is_rne_of_float32(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    raw = random_blocks(qtype, shape, seed=7)
    f32 = dequantize(raw, qtype, shape)
    got = dequantize(raw, qtype, shape, dtype=ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    with np.errstate(invalid="ignore"):
        want = f32.astype(ml_dtypes.bfloat16)
    assert_bits_equal(got, want)


def test_thread_count_does_not_change_results() -> None:
    shape = (64, 4096)
    raw = random_blocks(T.Q4_K, shape, seed=3)
    before = _native.num_threads()
    try:
        _native.set_num_threads(1)
        one = dequantize(raw, T.Q4_K, shape)
        _native.set_num_threads(3)
        three = dequantize(raw, T.Q4_K, shape)
    finally:
        _native.set_num_threads(before)
    assert_bits_equal(one, three)
    with pytest.raises(ValueError, match="num_threads"):
        _native.set_num_threads(0)


def test_concurrent_callers() -> None:
    """Calls from several Python threads at once (the GIL is released) stay correct."""
    shape = (128, 4096)
    raws = [random_blocks(T.Q6_K, shape, seed=s) for s in range(6)]
    want = [dequantize(r, T.Q6_K, shape) for r in raws]
    with ThreadPoolExecutor(max_workers=6) as ex:
        for _ in range(3):
            got = list(ex.map(lambda r: dequantize(r, T.Q6_K, shape), raws))
            for g, w in zip(got, want):
                assert_bits_equal(g, w)


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_unsupported_type(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(type_size, dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match=f"quant type {qtype.name} is not supported"):
        dequantize(raw, qtype, (block_size,))
    with pytest.raises(ValueError, match=f"quant type {qtype.name} is not supported"):
        _native.dequantize(raw, int(qtype), block_size)


def test_unknown_type_id() -> None:
    with pytest.raises(UnsupportedModelError, match="id 99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))


@pytest.mark.parametrize("qtype", BLOCK_QTYPES + [T.F16], ids=lambda t: t.name)
def test_wrong_byte_size(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (2, 256)
    raw = random_blocks(qtype, shape, seed=0).reshape(-1)
    for bad in (raw[:-1], raw[:-type_size], np.concatenate([raw, raw[:type_size]])):
        with pytest.raises(GGUFError, match=rf"{qtype.name}.*must be {raw.size} bytes, got {bad.size}"):
            dequantize(bad, qtype, shape)


def test_native_rejects_partial_blocks_and_bad_arguments() -> None:
    raw = np.zeros(34, np.uint8)
    with pytest.raises(ValueError, match="not a multiple of the Q8_0 block size 32"):
        _native.dequantize(raw, int(T.Q8_0), 31)
    with pytest.raises(GGUFError, match="not a multiple of the block size 32"):
        dequantize(raw, T.Q8_0, (1, 31))
    with pytest.raises(TypeError, match="uint8"):
        _native.dequantize(raw.view(np.int8), int(T.Q8_0), 32)
    with pytest.raises(ValueError, match="out_dtype"):
        _native.dequantize(raw, int(T.Q8_0), 32, "float16")
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        dequantize(raw, T.Q8_0, (32,), dtype=np.float16)


def test_empty_tensor() -> None:
    got = dequantize(np.zeros(0, np.uint8), T.Q4_K, (0, 256))
    assert got.shape == (0, 256) and got.dtype == np.float32
