"""Fused host MoE: every ISA path against the scalar reference computing that ISA's formula
and against a float64 numpy MoE over the exactly-decoded expert weights.

Tolerances: SIMD vs scalar reference |dy| <= 1e-4 * B; any path vs float64 numpy
|dy| <= 0.03 * B, B = the float64 MoE computed with |x| and |W| (sum of absolute
contributions). Activations are quantized to int8 (or, for AMX experts of >= 16 tokens on
group-scaled weights, rounded to bf16 with the weights) twice, input and intermediate, whose
rounding (<= 1/254 of a group's max, or 2^-9 relative, each) bounds the error well inside that.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import _native
from ktjax.errors import KernelError
from ktjax.host import linear as hl
from ktjax.host import moe as hm

from isa_levels import SIMD_ISAS
from test_host_linear import random_gguf

T = gguf.GGMLQuantizationType


def silu(g):
    return g * 0.5 * (1 + np.tanh(g / 2))  # g * sigmoid(g), overflow-free


def numpy_moe(x, ids, wts, gate, up, down, absolute=False):
    x = np.abs(x) if absolute else x
    f = (lambda v: np.abs(v)) if absolute else (lambda v: v)
    out = np.zeros(x.shape, np.float64)

    def expert(g, u, d, xr):
        h = silu(xr @ g.T) * (xr @ u.T)
        return (np.abs(h) if absolute else h) @ f(d).T

    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            out[t] += f(wts[t, j]) * expert(f(gate[e]), f(up[e]), down[e], x[t])
    return out


def unpack_set(handle, experts):
    mats = [_native.unpack_weight(handle, i).astype(np.float64) for i in range(3 * experts)]
    return mats[0::3], mats[1::3], mats[2::3]


def routing(rng, tokens, experts, k):
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
    return ids, wts / wts.sum(1, keepdims=True)


def check(y, ref, bound, rtol):
    err = np.abs(y.astype(np.float64) - ref)
    tol = rtol * bound + 1e-6
    assert np.all(err <= tol), f"max err {err.max()}, worst ratio {(err / tol).max()}"


@pytest.mark.parametrize("fmt", ["int8", "int8_row", "int4", "bf16"])
@pytest.mark.parametrize("tokens", [1, 4, 33])
def test_moe_float_formats(fmt, tokens, store):
    rng = np.random.default_rng(tokens)
    E, H, I, k = 6, 96, 80, 2
    gate, up = (rng.standard_normal((E, I, H), dtype=np.float32) * 0.2 for _ in range(2))
    down = rng.standard_normal((E, H, I), dtype=np.float32) * 0.2
    h = hm.pack_experts_float(gate, up, down, fmt)
    store.append(h)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)
    g, u, d = unpack_set(h, E)
    ref64 = numpy_moe(x, ids, wts, g, u, d)
    bound = numpy_moe(x, ids, wts, g, u, d, absolute=True)
    ref = hm.moe_reference(x, ids, wts, h)
    check(ref, ref64, bound, 0.03)
    for isa in SIMD_ISAS:
        y = hm.moe_forward(x, ids, wts, h, isa=isa)
        check(y, hm.moe_reference(x, ids, wts, h, like=isa), bound, 1e-4)
        check(y, ref64, bound, 0.03)


@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0), (T.Q4_0, T.Q5_1), (T.Q2_K, T.Q3_K)],
                         ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_moe_gguf(types, store):
    rng = np.random.default_rng(3)
    gu_type, d_type = types
    E, H, I, k, tokens = 5, 256, 256, 3, 17
    gate = random_gguf(gu_type, E * I, H, seed=1)
    up = random_gguf(gu_type, E * I, H, seed=2)
    down = random_gguf(d_type, E * H, I, seed=3)
    h = hm.pack_experts_gguf((gate, gu_type), (up, gu_type), (down, d_type), E, H, I)
    store.append(h)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)
    g, u, d = unpack_set(h, E)
    ref64 = numpy_moe(x, ids, wts, g, u, d)
    bound = numpy_moe(x, ids, wts, g, u, d, absolute=True)
    ref = hm.moe_reference(x, ids, wts, h)
    check(ref, ref64, bound, 0.03)
    for isa in SIMD_ISAS:
        y = hm.moe_forward(x, ids, wts, h, isa=isa)
        check(y, hm.moe_reference(x, ids, wts, h, like=isa), bound, 1e-4)
        check(y, ref64, bound, 0.03)


def test_moe_ffi_under_jit_picks_the_scanned_layer(store):
    rng = np.random.default_rng(5)
    E, H, I, k, tokens = 4, 64, 32, 2, 7
    layers = []
    for fmt in ("int8", "int4"):
        gate, up = (rng.standard_normal((E, I, H), dtype=np.float32) for _ in range(2))
        down = rng.standard_normal((E, H, I), dtype=np.float32)
        layers.append(hm.pack_experts_float(gate, up, down, fmt))
        store.append(layers[-1])
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)

    @jax.jit
    def f(a, b, c):
        def step(carry, layer):
            return carry, hm.moe_layered(a, b, c, layer, tuple(layers)) + 1.0
        return jax.lax.scan(step, 0, jnp.arange(len(layers)))[1]

    y = np.asarray(f(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts)))
    for i, h in enumerate(layers):
        np.testing.assert_array_equal(y[i], hm.moe_forward(x, ids, wts, h) + 1.0)


def test_moe_bad_input(store):
    rng = np.random.default_rng(6)
    E, H, I = 3, 32, 32
    h = hm.pack_experts_float(*(rng.standard_normal(s, dtype=np.float32) for s in [(E, I, H), (E, I, H), (E, H, I)]))
    store.append(h)
    lin = hl.pack_float_weight(np.ones((4, 32), np.float32))
    store.append(lin)
    x = np.ones((2, H), np.float32)
    ids = np.array([[0, 1], [2, 3]], np.int32)
    wts = np.full((2, 2), 0.5, np.float32)
    with pytest.raises(KernelError, match=r"expert id 3 at token 1, slot 1 is out of range \[0, 3\)"):
        hm.moe_forward(x, ids, wts, h)
    with pytest.raises(KernelError, match="NaN or Inf"):
        hm.moe_forward(np.full((2, H), np.nan, np.float32), ids % 3, wts, h)
    with pytest.raises(KernelError, match="routing weight at token 0, slot 1 is NaN"):
        hm.moe_forward(x, ids % 3, np.array([[0.5, np.nan], [1, 1]], np.float32), h)
    with pytest.raises(KernelError, match="not an expert set"):
        hm.moe_forward(x, ids % 3, wts, lin)
    with pytest.raises(KernelError, match="unknown or released"):
        hm.moe_forward(x, ids % 3, wts, 99999)
    with pytest.raises(KernelError, match="x must be"):
        hm.moe_forward(np.ones((2, H + 1), np.float32), ids % 3, wts, h)
    f = jax.jit(lambda a, b, c: hm.moe_layered(a, b, c, jnp.int32(0), (h,)))
    with pytest.raises(Exception, match="out of range"):
        f(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts)).block_until_ready()
    with pytest.raises(Exception, match="expected dtype int32"):
        f(jnp.asarray(x), jnp.asarray(ids, jnp.float32), jnp.asarray(wts)).block_until_ready()
    with pytest.raises(Exception, match="hidden size"):
        f(jnp.ones((2, H + 1)), jnp.asarray(ids % 3), jnp.asarray(wts)).block_until_ready()
    with pytest.raises(Exception, match="index 1 outside the 1 handles"):
        jax.jit(lambda a, b, c: hm.moe_layered(a, b, c, jnp.int32(1), (h,)))(
            jnp.asarray(x), jnp.asarray(ids % 3), jnp.asarray(wts)).block_until_ready()
