"""Host quantized linear: exact GGUF repacking, every ISA path against the scalar
reference, and every path against float64 dequantize(W) @ x.

Tolerances (B = |W| @ |x| in float64, the sum of absolute products):
  * unpacked weights vs gguf.quants.dequantize: bit-exact;
  * SIMD path vs scalar reference: |dy| <= 5e-5 * B (same integer dot products, float
    summation order differs);
  * any path vs float64 W @ x, int formats: |dy| <= |W| @ (step(x) / 2) + 5e-5 * B, where
    step(x) is the int8 activation step of x's group (amax / 127) -- the rounding of
    per-token activation quantization; bf16: |dy| <= 2^-8 * B.
"""

from __future__ import annotations

import os
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import quants
from isa_levels import ISAS, PYTHON, SIMD_ISAS

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.host import linear as hl

T = gguf.GGMLQuantizationType

# (type, byte offsets of f16 fields holding d / dmin-like factors)
GGUF_TYPES = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
GROUP = {T.Q2_K: 16, T.Q3_K: 16, T.Q6_K: 16}


def random_gguf(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random blocks of qtype (every bit pattern of the quants) with sane f16 factors."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n * k // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for off in GGUF_TYPES[qtype]:
        d = (rng.uniform(0.5, 2.0, nb) * 2.0 ** rng.integers(-12, -4, nb)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def dequant(raw: np.ndarray, qtype: T, n: int, k: int) -> np.ndarray:
    return quants.dequantize(raw.reshape(n, -1), qtype).reshape(n, k)


def act_step(x: np.ndarray, k: int, group: int) -> np.ndarray:
    """Per-element int8 step of activations quantized in groups of `group` along K."""
    kp = -(-k // group) * group
    xp = np.zeros((x.shape[0], kp), np.float64)
    xp[:, :k] = x
    amax = np.abs(xp).reshape(x.shape[0], -1, group).max(axis=2) / 127.0
    return np.repeat(amax, group, axis=1)[:, :k]


def check_close(y, x, w, group, *, bf16=False, base=None):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    b = np.abs(x64) @ np.abs(w64).T
    if base is not None:
        tol = 5e-5 * b + 1e-30
        ref = base
    elif bf16:
        tol = 2.0 ** -8 * b + 1e-30
    else:
        tol = (act_step(x, w.shape[1], group) / 2) @ np.abs(w64).T + 5e-5 * b + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= tol), f"max err {err.max()}, worst ratio {(err / tol).max()}"


@pytest.mark.parametrize("qtype", list(GGUF_TYPES), ids=lambda t: t.name)
def test_gguf_repack_is_exact(qtype, store):
    n, k = 37, 512
    raw = random_gguf(qtype, n, k)
    h = hl.pack_gguf_weight(raw, int(qtype), (n, k))
    store.append(h)
    info = hl.weight_info(h)
    assert (info["n"], info["k"], info["source_type"]) == (n, k, int(qtype))
    np.testing.assert_array_equal(hl.unpack_weight(h), dequant(raw, qtype, n, k))


@pytest.mark.parametrize("qtype", list(GGUF_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 3, 32, 257])
def test_gguf_linear_all_isas(qtype, tokens, store):
    n, k = 37 if tokens < 257 else 19, 512
    raw = random_gguf(qtype, n, k, seed=tokens)
    h = hl.pack_gguf_weight(raw, int(qtype), (n, k))
    store.append(h)
    w = hl.unpack_weight(h)
    x = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
    ref = hl.linear_reference(x, h)
    check_close(ref, x, w, GROUP.get(qtype, 32))
    for isa in SIMD_ISAS:
        y = hl.linear_forward(x, h, isa)
        assert y.shape == (tokens, n)
        check_close(y, x, w, GROUP.get(qtype, 32), base=hl.linear_reference(x, h, like=isa).astype(np.float64))
        check_close(y, x, w, GROUP.get(qtype, 32))


@pytest.mark.parametrize("fmt", list(GGUF_TYPES) + list(hl.FLOAT_FORMATS), ids=str)
def test_decode_one_call_over_many_row_blocks(fmt, store):
    # 20 row blocks (the last partial) in one kernel call, one thread: the decode path that
    # reads 16 or more as one stream on AMD CPUs, in 4-block tiles elsewhere.
    n, k = 309, 256
    rng = np.random.default_rng(181)
    if isinstance(fmt, str):
        h = hl.pack_float_weight(rng.standard_normal((n, k)).astype(np.float32), fmt)
        group = k if fmt == "int8_row" else GROUP.get(fmt, 32)
    else:
        h = hl.pack_gguf_weight(random_gguf(fmt, n, k, seed=181), int(fmt), (n, k))
        group = GROUP.get(fmt, 32)
    store.append(h)
    w = hl.unpack_weight(h)
    x = rng.standard_normal((1, k)).astype(np.float32)
    before = _native.num_threads()
    try:
        _native.set_num_threads(1)
        for isa in SIMD_ISAS:
            y = hl.linear_forward(x, h, isa)
            check_close(y, x, w, group, base=hl.linear_reference(x, h, like=isa).astype(np.float64))
    finally:
        _native.set_num_threads(before)


# Long prefill (257 tokens) only on the smaller shapes: the scalar reference is slow.
FLOAT_CASES = [(shape, tokens) for shape in [(1, 32), (37, 75), (96, 576), (129, 1000)]
               for tokens in [1, 3, 32, 257] if tokens < 257 or shape[0] * shape[1] <= 40_000]


@pytest.mark.parametrize("fmt", hl.FLOAT_FORMATS)
@pytest.mark.parametrize("shape,tokens", FLOAT_CASES)
def test_float_linear_all_isas(fmt, shape, tokens, store):
    n, k = shape
    rng = np.random.default_rng(n + k + tokens)
    w32 = rng.standard_normal((n, k)).astype(np.float32)
    h = hl.pack_float_weight(w32, fmt)
    store.append(h)
    w = hl.unpack_weight(h)
    if fmt in ("int8", "int8_row"):
        # Symmetric int8 in groups of 32 (scale stored as f16) or per row (f32): |w - q| <= scale / 2.
        assert np.abs(w - w32).max() <= np.abs(w32).max() / 127 * 0.51
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    ref = hl.linear_reference(x, h)
    group = k if fmt == "int8_row" else 32  # int8_row: one activation scale per token
    check_close(ref, x, w, group, bf16=fmt == "bf16")
    for isa in SIMD_ISAS:
        y = hl.linear_forward(x, h, isa)
        check_close(y, x, w, group, base=hl.linear_reference(x, h, like=isa).astype(np.float64))


def test_int8_row_format(store):
    w32 = np.arange(3 * 70, dtype=np.float32).reshape(3, 70) - 100
    h = hl.pack_float_weight(w32, "int8_row")
    store.append(h)
    assert hl.weight_info(h)["format"] == "int8/g32/row"
    # One scale per row: the row's largest value is exact.
    assert np.array_equal(np.abs(hl.unpack_weight(h)).max(axis=1), np.abs(w32).max(axis=1))
    with pytest.raises(KernelError, match="K < 65536"):
        hl.pack_float_weight(np.ones((1, 65536), np.float32), "int8_row")


@pytest.mark.parametrize("gtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_gguf_float_types_quantize_to_int8(gtype, store):
    w = np.random.default_rng(1).standard_normal((20, 70)).astype(np.float32)
    src = {T.F32: w, T.F16: w.astype(np.float16), T.BF16: quants.quantize(w, T.BF16)}[gtype]
    h = hl.pack_gguf_weight(src.view(np.uint8), int(gtype), (20, 70))
    store.append(h)
    assert hl.weight_info(h)["format"].startswith("int8/g32")
    wf = quants.dequantize(src.view(np.uint8), gtype) if gtype == T.BF16 else src.astype(np.float32)
    assert np.abs(hl.unpack_weight(h) - wf.reshape(20, 70)).max() <= np.abs(wf).max() / 127 * 0.51


def test_ffi_linear_under_jit_picks_the_scanned_layer(store):
    n = 50
    handles = []
    for seed in (2, 3):
        handles.append(hl.pack_gguf_weight(random_gguf(T.Q4_K, n, 256, seed=seed), int(T.Q4_K), (n, 256)))
        store.append(handles[-1])
    x = np.random.default_rng(2).standard_normal((2, 3, 256)).astype(np.float32)

    @jax.jit
    def f(v):
        def step(carry, layer):
            return carry, hl.linear_layered(v, layer, tuple(handles), n) * 2.0
        return jax.lax.scan(step, 0, jnp.arange(len(handles)))[1]

    y = np.asarray(f(jnp.asarray(x)))
    assert y.shape == (2, 2, 3, n)
    for i, h in enumerate(handles):
        np.testing.assert_array_equal(y[i].reshape(6, n), hl.linear_forward(x.reshape(6, 256), h) * 2.0)


def test_ffi_linear_errors(store):
    h = hl.pack_float_weight(np.ones((8, 64), np.float32))
    store.append(h)

    def call(v, handles=(h,), n=8, layer=0):
        f = jax.jit(lambda v: hl.linear_layered(v, jnp.int32(layer), handles, n))
        return f(v).block_until_ready()

    with pytest.raises(Exception, match="in_features"):
        call(jnp.ones((2, 63), jnp.float32))
    with pytest.raises(Exception, match="dtype"):
        call(jnp.ones((2, 64), jnp.bfloat16))
    with pytest.raises(Exception, match="out_features"):
        call(jnp.ones((2, 64), jnp.float32), n=9)
    with pytest.raises(Exception, match="NaN or Inf"):
        call(jnp.full((1, 64), jnp.inf))
    with pytest.raises(Exception, match="unknown or released weight handle 987654"):
        call(jnp.ones((1, 64)), handles=(987654,))
    with pytest.raises(Exception, match="index 1 outside the 1 handles"):
        call(jnp.ones((1, 64)), layer=1)


def test_store_handles_and_bad_input():
    before = _native.store_size()
    h = hl.pack_float_weight(np.ones((4, 32), np.float32), "int4")
    assert _native.store_size() == before + 1
    hl.release(h)
    assert _native.store_size() == before
    with pytest.raises(KernelError, match=f"unknown or released weight handle {h}"):
        hl.linear_reference(np.ones((1, 32), np.float32), h)
    with pytest.raises(KernelError, match="unknown or released"):
        hl.release(h)
    with pytest.raises(KernelError, match="needs 360 bytes"):
        hl.pack_gguf_weight(np.zeros(100, np.uint8), int(T.Q4_0), (10, 64))
    with pytest.raises(KernelError, match="K % 256"):
        hl.pack_gguf_weight(np.zeros(144, np.uint8), int(T.Q4_K), (1, 128))
    with pytest.raises(KernelError, match="cannot be packed"):
        hl.pack_gguf_weight(np.zeros(100, np.uint8), int(T.Q8_K), (1, 256))
    with pytest.raises(KernelError, match="non-finite"):
        hl.pack_float_weight(np.full((2, 32), np.nan, np.float32))
    h = hl.pack_float_weight(np.ones((4, 32), np.float32))
    try:
        with pytest.raises(KernelError, match="NaN or Inf"):
            hl.linear_forward(np.full((1, 32), np.nan, np.float32), h, "avx2" if "avx2" in ISAS else "")
        with pytest.raises(KernelError, match="expects K=32"):
            hl.linear_forward(np.ones((1, 31), np.float32), h)
    finally:
        hl.release(h)


def _active_isa_with(isa: str) -> subprocess.CompletedProcess:
    code = "from ktjax import _native as n; print(n.active_isa())"
    # cwd outside the checkout: `python -c` must import the installed ktjax, not the sources
    return subprocess.run([*PYTHON, "-c", code], env=dict(os.environ, KTJAX_ISA=isa),
                          capture_output=True, text=True, cwd=os.path.expanduser("~"))


def test_isa_env_override():
    out = _active_isa_with("generic")
    assert out.stdout.strip() == "generic", out.stderr
    out = _active_isa_with("amx")  # above the machine's level: clamped to it
    assert out.stdout.strip() == _native.detected_isa(), out.stderr
    out = _active_isa_with("sse9")
    assert out.returncode != 0 and "KTJAX_ISA accepts" in out.stderr


def test_last_level_cache_size_from_sysfs():
    sizes = []
    for i in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    assert _native.last_level_cache_bytes() == (max(sizes) if sizes else 32 << 20)


def test_bandwidth_probe_reads_its_buffer():
    # 16 MiB: 8 pieces of 2 MiB claimed by the pool (the sanitizer run checks their bounds);
    # a rate, however noisy, is positive and finite.
    gbps = _native.read_bandwidth_gbps(16 << 20, 1)
    assert 0 < gbps < float("inf")


def test_amx_roofline_probe_rejects_bad_arguments_and_missing_amx():
    with pytest.raises(ValueError, match="products >= 4"):
        _native.amx_tile_peak_tops(2, 1)
    with pytest.raises(ValueError, match="reps >= 1"):
        _native.amx_tile_peak_tops(1 << 10, 0)
    if _native.detected_isa() != "amx":
        with pytest.raises(RuntimeError, match="no AMX"):
            _native.amx_tile_peak_tops()
