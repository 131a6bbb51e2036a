"""IQ / ternary / MXFP4 dequantization on crafted blocks, bit for bit against gguf.

tests/test_quants.py covers these types on random blocks with finite scales; here every
byte is random (NaN / Inf / subnormal scales included) and edge fields are enumerated.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ktjax.gguf.quants import dequantize
from test_quants import assert_bits_equal, reference

T = GGMLQuantizationType
NEW_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M,
             T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0, T.MXFP4]


def blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    return np.random.default_rng(seed).integers(0, 256, (n_blocks, type_size), dtype=np.uint8)


def check(raw: np.ndarray, qtype: GGMLQuantizationType) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (raw.shape[0], block_size)
    assert_bits_equal(dequantize(raw, qtype, shape), reference(raw, qtype).reshape(shape))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_all_random_bytes(qtype: GGMLQuantizationType) -> None:
    """Scales from random bits: NaN payloads, infinities and subnormals must match too."""
    check(blocks(qtype, 512, seed=int(qtype)), qtype)


def test_mxfp4_every_exponent() -> None:
    raw = blocks(T.MXFP4, 256, seed=1)
    raw[:, 0] = np.arange(256)  # e8m0 0 and 1 give subnormal halves, 255 gives 2^126
    check(raw, T.MXFP4)


def test_iq1_m_every_scale_nibble_pattern() -> None:
    """IQ1_M's f16 d is spread over the top nibbles of its four scale words."""
    raw = blocks(T.IQ1_M, 4096, seed=2)
    d = np.arange(4096, dtype=np.uint16) << 4 | 0x3  # 16-bit d patterns with varied low bits
    words = raw[:, 48:56].copy().view(np.uint16)
    for i in range(4):
        words[:, i] = (words[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
    raw[:, 48:56] = words.view(np.uint8)
    check(raw, T.IQ1_M)


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_ternary_every_byte(qtype: GGMLQuantizationType) -> None:
    """Each data byte value in each position (TQ1_0 bytes past 242 are not valid trits,
    but must still decode as gguf decodes them)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((256, type_size), np.uint8)
    raw[:, :type_size - 2] = np.arange(256, dtype=np.uint8)[:, None]
    raw[:, -2:] = np.array([1.5], np.float16).view(np.uint8)
    check(raw, qtype)


def test_iq4_xs_every_scale() -> None:
    raw = blocks(T.IQ4_XS, 64, seed=3)
    raw[:, :2] = np.array([0.75], np.float16).view(np.uint8)
    ls = np.arange(64 * 8, dtype=np.uint16).reshape(64, 8) % 64  # all 6-bit scales
    raw[:, 4:8] = ((ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)).astype(np.uint8)
    high = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1).astype(np.uint16)
    raw[:, 2:4] = high.view(np.uint8).reshape(64, 2)
    check(raw, T.IQ4_XS)
