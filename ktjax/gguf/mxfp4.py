"""MXFP4 (gpt-oss's expert format) dequantization in numpy: blocks of 32 values, one E8M0
exponent byte then 16 bytes of 4-bit E2M1 codes (the low nibbles are values 0-15, the high
ones 16-31). ggml stores the code table doubled and halves the scale, so a value is
table[code] * 2^(e - 128); the product is exact in float32, hence bit-exact with
gguf.quants' reference."""
from __future__ import annotations

import numpy as np

BLOCK, BLOCK_BYTES = 32, 17
_DOUBLED_E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


def _half_scale(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 bits (subnormal below e = 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def dequantize(raw: np.ndarray, n_values: int) -> np.ndarray:
    """Float32 values [n_values] of MXFP4 bytes `raw` (uint8, n_values / 32 blocks)."""
    blocks = raw.reshape(n_values // BLOCK, BLOCK_BYTES)
    scale = _half_scale(blocks[:, 0])[:, None]
    codes = blocks[:, 1:]
    values = np.concatenate([_DOUBLED_E2M1[codes & 0x0F], _DOUBLED_E2M1[codes >> 4]], axis=1)
    with np.errstate(over="ignore"):  # the largest exponents overflow to inf, as in ggml
        return (values * scale).reshape(-1)
