"""AMX tile paths of the host linear and MoE kernels (run only on a CPU with AMX).

Calls with >= 16 tokens take the AMX tiles; they are compared with the scalar reference
computing AMX's formula (int8 dot products for per-row int8 weights; bf16 products for
bf16 weights and for group-scaled weights dequantized to bf16): |dy| <= 1e-4 * B,
B = |W| @ |x|. Every test runs in both modes: batch-invariant (the default: only int8_row
weights take the tiles) and not (KTJAX_BATCH_INVARIANT=0: every format does).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ktjax import _native
from ktjax.host import linear as hl
from ktjax.host import moe as hm

from test_host_linear import check_close, random_gguf

pytestmark = [pytest.mark.amx,
              pytest.mark.skipif(_native.detected_isa() != "amx", reason="needs a CPU with AMX")]
T = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True, params=[True, False], ids=["invariant", "fast"])
def invariance_mode(request):
    _native.set_batch_invariant(request.param)
    yield request.param
    _native.set_batch_invariant(True)


def check_amx_linear(source, tokens, n, k):
    rng = np.random.default_rng(tokens)
    if isinstance(source, str):
        h = hl.pack_float_weight(rng.standard_normal((n, k), dtype=np.float32), source)
    else:
        h = hl.pack_gguf_weight(random_gguf(source, n, k), int(source), (n, k))
    try:
        w = hl.unpack_weight(h)
        x = rng.standard_normal((tokens, k), dtype=np.float32)
        base = hl.linear_reference(x, h, like="amx").astype(np.float64)
        y = hl.linear_forward(x, h, "amx")
        b = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
        assert np.all(np.abs(y - base) <= 1e-4 * b + 1e-30)
        group = k if source == "int8_row" else 16 if source in (T.Q6_K, T.Q3_K) else 32
        check_close(y, x, w, group, bf16=source == "bf16")
    finally:
        hl.release(h)


@pytest.mark.parametrize("source", ["int8", "int8_row", "int4", "bf16", T.Q4_K, T.Q6_K, T.Q3_K, T.Q5_1],
                         ids=lambda s: s if isinstance(s, str) else s.name)
@pytest.mark.parametrize("tokens", [15, 16, 33, 64, 257])
def test_amx_linear_matches_reference(source, tokens):
    check_amx_linear(source, tokens, 45, 512 if source != "int8_row" else 1000)  # int8_row: a padded step


@pytest.mark.parametrize("source", ["int8_row", "bf16"])
@pytest.mark.parametrize("tokens", [300, 400])
def test_amx_full_k_in_chunks(source, tokens):
    # The activations outgrow the kernel's L2 budget: K runs in chunks, C tiles waiting in y
    # between them; past 384 tokens, in token groups too. n: 2-3 row blocks per thread.
    check_amx_linear(source, tokens, 520, 4000)


@pytest.mark.parametrize("fmt", ["int8", "int8_row", "int4", "bf16"])
def test_amx_moe_matches_reference(fmt):
    rng = np.random.default_rng(7)
    E, H, I, k, tokens = 4, 256, 160, 2, 70
    h = hm.pack_experts_float(rng.standard_normal((E, I, H), dtype=np.float32) * 0.1,
                              rng.standard_normal((E, I, H), dtype=np.float32) * 0.1,
                              rng.standard_normal((E, H, I), dtype=np.float32) * 0.1, fmt)
    try:
        x = rng.standard_normal((tokens, H), dtype=np.float32)
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        wts = np.full((tokens, k), 0.5, np.float32)
        base = hm.moe_reference(x, ids, wts, h, like="amx")
        y = hm.moe_forward(x, ids, wts, h, isa="amx")
        np.testing.assert_allclose(y, base, rtol=2e-3, atol=2e-3 * np.abs(base).max())
    finally:
        hl.release(h)


def test_tile_peak_probe_gives_a_rate():
    # Every pool thread configures its tiles, multiplies and releases them without a fault;
    # the rate, however noisy, is positive and finite.
    tops = _native.amx_tile_peak_tops(1 << 12, 2)
    assert 0 < tops < float("inf")
