"""IQ / ternary / MXFP4 weights on the host kernels, repacked losslessly
(cpu_kernels/quants/iq_groups.h): every type as int4 indices into its 16-entry table looked
up in registers, in groups of 16 (IQ2_XS / IQ2_S / IQ1_M) or 32, with the K-quant scale
encoding (int8 per group x f32 per 256) where the scales are integers times the block's d. Every ISA path against the scalar reference and against
float64 dequantize(W) @ x (tolerances as in test_host_linear.py); MoE experts too."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from isa_levels import SIMD_ISAS
from test_host_linear import check_close, dequant

from ktjax.errors import KernelError
from ktjax.host import linear as hl
from ktjax.host import moe as hm

T = gguf.GGMLQuantizationType

# type -> byte offset of its f16 d (None: MXFP4's e8m0 byte; IQ1_M: d in 4 nibbles at 48..55)
HOST_TYPES = {T.IQ4_NL: 0, T.IQ4_XS: 0, T.MXFP4: None, T.IQ2_XXS: 0, T.IQ3_XXS: 0,
              T.IQ3_S: 0, T.IQ1_S: 0, T.TQ1_0: 52, T.TQ2_0: 64, T.IQ2_XS: 0, T.IQ2_S: 0,
              T.IQ1_M: 48}
GROUP16 = (T.IQ2_XS, T.IQ2_S, T.IQ1_M)  # a scale per 16 values
SCALES = {T.IQ4_NL: "f16", T.MXFP4: "e8m0"}  # the others: i8xf32


def host_format(qtype: T) -> str:
    return f"int4lut/g{16 if qtype in GROUP16 else 32}/{SCALES.get(qtype, 'i8xf32')}"


def random_iq(qtype: T, n: int, k: int, seed: int = 0, d_exp: tuple[int, int] = (-12, -6)) -> np.ndarray:
    """Random blocks of qtype with f16 d in [0.5, 2) * 2^[d_exp) (MXFP4: 2^-9 .. 2^-4)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n * k // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    off = HOST_TYPES[qtype]
    if off is None:  # weights ~2^-7 .. 2^-4
        raw[:, 0] = rng.integers(119, 124, nb)
    else:
        d = (rng.uniform(0.5, 2.0, nb) * 2.0 ** rng.integers(*d_exp, nb)).astype(np.float16)
        if qtype == T.IQ1_M:  # d's nibbles in the top 4 bits of the 4 scale words
            words = raw[:, off:off + 8].copy().view(np.uint16)
            for i in range(4):
                words[:, i] = (words[:, i] & 0x0FFF) | (((d.view(np.uint16) >> (4 * i)) & 0xF) << 12)
            raw[:, off:off + 8] = words.view(np.uint8)
        else:
            raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", list(HOST_TYPES), ids=lambda t: t.name)
def test_repack_is_exact_and_indexed(qtype, store):
    n, k = 37, 512
    raw = random_iq(qtype, n, k)
    h = hl.pack_gguf_weight(raw, int(qtype), (n, k))
    store.append(h)
    info = hl.weight_info(h)
    assert (info["n"], info["k"], info["source_type"]) == (n, k, int(qtype))
    assert info["format"] == host_format(qtype)
    np.testing.assert_array_equal(hl.unpack_weight(h), dequant(raw, qtype, n, k))


@pytest.mark.parametrize("qtype", list(HOST_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 40])
def test_linear_all_isas(qtype, tokens, store):
    n, k = 37, 512
    raw = random_iq(qtype, n, k, seed=tokens)
    h = hl.pack_gguf_weight(raw, int(qtype), (n, k))
    store.append(h)
    w = hl.unpack_weight(h)
    x = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
    group = 16 if qtype in GROUP16 else 32
    check_close(hl.linear_reference(x, h), x, w, group)
    for isa in SIMD_ISAS:
        y = hl.linear_forward(x, h, isa)
        check_close(y, x, w, group, base=hl.linear_reference(x, h, like=isa).astype(np.float64))
        check_close(y, x, w, group)


def test_mxfp4_every_exponent(store):
    """MXFP4's e8m0 bytes stay bytes (2^(e - 128)): every e unpacks exactly, and each ISA's
    vector decode of the smallest (subnormal 2^-128, 2^-127) and of large exponents matches
    the scalar reference's, with activations sized to keep the products normal and finite
    (up to 2^111: the kernels' -128 * scale bias correction overflows float above 2^120)."""
    n, k = 16, 256
    raw = random_iq(T.MXFP4, 2 * n, k).reshape(-1, 17)
    raw[:, 0] = np.arange(raw.shape[0]) % 256
    h = hl.pack_gguf_weight(raw.reshape(-1), int(T.MXFP4), (2 * n, k))
    store.append(h)
    assert hl.weight_info(h)["format"] == "int4lut/g32/e8m0"
    with np.errstate(over="ignore"):  # gguf's doubled values at 2^127 overflow to inf, as ours do
        want = dequant(raw.reshape(-1), T.MXFP4, 2 * n, k)
    np.testing.assert_array_equal(hl.unpack_weight(h), want)
    x = np.random.default_rng(3).standard_normal((1, k)).astype(np.float32)
    for lo, x_scale in ((0, 2.0 ** 60), (224, 2.0 ** -90)):
        blocks = np.random.default_rng(lo).integers(0, 256, (n * k // 32, 17), dtype=np.uint8)
        blocks[:, 0] = lo + np.arange(blocks.shape[0]) % 16
        h = hl.pack_gguf_weight(blocks.reshape(-1), int(T.MXFP4), (n, k))
        store.append(h)
        xs, w = x * np.float32(x_scale), hl.unpack_weight(h)
        for isa in SIMD_ISAS:
            base = hl.linear_reference(xs, h, like=isa).astype(np.float64)
            check_close(hl.linear_forward(xs, h, isa), xs, w, 32, base=base)


@pytest.mark.parametrize("qtype", [T.IQ4_XS, T.MXFP4, T.IQ2_XXS, T.IQ2_XS], ids=lambda t: t.name)
def test_moe_experts_all_isas(qtype, store):
    e, hidden, inter, tokens, top = 4, 256, 512, 3, 2
    gate, up = (random_iq(qtype, e * inter, hidden, seed=s) for s in (1, 2))
    down = random_iq(qtype, e * hidden, inter, seed=3)
    h = hm.pack_experts_gguf((gate, int(qtype)), (up, int(qtype)), (down, int(qtype)), e, hidden, inter)
    store.append(h)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.stack([rng.permutation(e)[:top] for _ in range(tokens)]).astype(np.int32)
    wts = rng.uniform(0.2, 1.0, (tokens, top)).astype(np.float32)
    ref = hm.moe_reference(x, ids, wts, h)
    # float64 model of the experts from gguf's own dequantization
    g = dequant(gate, qtype, e * inter, hidden).reshape(e, inter, hidden).astype(np.float64)
    u = dequant(up, qtype, e * inter, hidden).reshape(e, inter, hidden).astype(np.float64)
    dn = dequant(down, qtype, e * hidden, inter).reshape(e, hidden, inter).astype(np.float64)
    want = np.zeros((tokens, hidden))
    for t in range(tokens):
        for j in range(top):
            a, b = g[ids[t, j]] @ x[t], u[ids[t, j]] @ x[t]
            with np.errstate(over="ignore"):  # silu of a very negative a: a / inf = 0
                act = a / (1 + np.exp(-a)) * b
            want[t] += wts[t, j] * (dn[ids[t, j]] @ act)
    scale = np.abs(want).max()
    assert np.abs(ref - want).max() <= 0.03 * scale  # int8 activations, twice
    for isa in SIMD_ISAS:
        y = hm.moe_forward(x, ids, wts, h, isa=isa)
        np.testing.assert_allclose(y, hm.moe_reference(x, ids, wts, h, like=isa), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("qtype", [T.IQ4_XS, T.MXFP4, T.IQ2_XXS], ids=lambda t: t.name)
def test_bad_sizes_are_refused(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    with pytest.raises(KernelError, match=f"{qtype.name} tensor of shape \\(2, {block}\\) needs {2 * size} bytes"):
        hl.pack_gguf_weight(np.zeros(2 * size - 1, np.uint8), int(qtype), (2, block))
    if block > 32:
        with pytest.raises(KernelError, match=f"K % {block}"):
            hl.pack_gguf_weight(np.zeros(size, np.uint8), int(qtype), (1, block // 2))
