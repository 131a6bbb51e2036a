"""GGUF tensor data → float32 / bfloat16 through the native dequantizers.

Bit-exact with ``gguf.quants.dequantize`` (the tests compare bit patterns) and
multi-threaded; bfloat16 output is the float32 result rounded to nearest even.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from ktjax import _native
from ktjax.errors import GGUFError, UnsupportedModelError
from ktjax.gguf.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

_T = GGMLQuantizationType

SUPPORTED_QTYPES: frozenset[GGMLQuantizationType] = frozenset({
    _T.F32, _T.F16, _T.BF16,
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
    _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ1_S, _T.IQ1_M,
    _T.IQ4_NL, _T.IQ4_XS, _T.TQ1_0, _T.TQ2_0, _T.MXFP4,
})

# Byte offsets of the float16 fields (scales, mins) inside one block of each quant type.
F16_FIELD_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    _T.Q4_0: (0,), _T.Q4_1: (0, 2), _T.Q5_0: (0,), _T.Q5_1: (0, 2), _T.Q8_0: (0,),
    _T.Q2_K: (80, 82), _T.Q3_K: (108,), _T.Q4_K: (0, 2), _T.Q5_K: (0, 2), _T.Q6_K: (208,),
    _T.IQ2_XXS: (0,), _T.IQ2_XS: (0,), _T.IQ2_S: (0,), _T.IQ3_XXS: (0,), _T.IQ3_S: (0,),
    _T.IQ1_S: (0,), _T.IQ4_NL: (0,), _T.IQ4_XS: (0,), _T.TQ1_0: (52,), _T.TQ2_0: (64,),
    # IQ1_M spreads its d over the top nibbles of its scale words; MXFP4's e8m0 is always finite.
    _T.IQ1_M: (), _T.MXFP4: (),
}

_OUT_DTYPES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _qtype_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"with id {qtype}"


def dequantize(
    data: np.ndarray,
    qtype: int | GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Dequantizes one GGUF tensor.

    ``data`` is the tensor's bytes (``GGUFReader`` gives ``tensor.data``: uint8 for
    quantized types, a typed array for F32/F16/BF16). ``shape`` is the logical numpy shape,
    row-major, last dimension = GGUF ``ne[0]``. ``dtype`` is float32 or ml_dtypes.bfloat16.
    Raises UnsupportedModelError for a quant type ktjax cannot read and GGUFError when the
    byte size does not match ``shape``.
    """
    qtype = int(qtype)
    out_dtype = _OUT_DTYPES.get(np.dtype(dtype))
    if out_dtype is None:
        raise ValueError(f"dtype must be float32 or bfloat16, got {np.dtype(dtype)}")
    if qtype not in SUPPORTED_QTYPES:
        raise UnsupportedModelError(f"quant type {_qtype_name(qtype)} is not supported")
    shape = tuple(int(d) for d in shape)
    name = GGMLQuantizationType(qtype).name
    block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if shape and shape[-1] % block_size != 0:
        raise GGUFError(
            f"{name} tensor of shape {shape}: last dimension {shape[-1]} is not a multiple "
            f"of the block size {block_size}")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        flat = _native.dequantize(raw, qtype, math.prod(shape), out_dtype)
    except ValueError as e:
        raise GGUFError(f"{name} tensor of shape {shape}: {e}") from e
    return flat.reshape(shape)
