"""Host MoE expert sets with an epilogue (gpt-oss): per-expert biases of gate, up and down and
the clamped SwiGLU (ktjax.expert_activation), on every ISA level against the reference
kernels computing that level's formula and against a float64 numpy MoE over the exactly
decoded weights; MXFP4 experts (what gpt-oss ships); the FFI call under jit; bad epilogues.

The reference is scalar code (linear kernels and the element-wise steps) computing each
level's formula, bit-identical to the generic level. Tolerances: SIMD vs reference
|dy| <= 1e-4 * B (as tests/test_host_moe.py), B the MoE of absolute values (|x|, |W|, |b|;
the activation's factors |g| and |u| + 1 unclamped), an upper bound of every contribution's
size; any path vs float64 |dy| <= 0.03 * max |y64|: int8
activations and weights land within 0.01 of it, while leaving out any one bias, the clamp or
the activation's kind moves the output by >= 0.06 of it (measured on these shapes).
"""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from isa_levels import SIMD_ISAS
from test_host_moe import routing, unpack_set
from test_iq_host import random_iq

from ktjax.errors import KernelError
from ktjax.expert_activation import SILU, ExpertActivation
from ktjax.host import moe as hm
from ktjax import _native

T = gguf.GGMLQuantizationType
OAI = ExpertActivation("swiglu_oai", 1.702, 7.0)


def sigmoid(v):
    return 0.5 * (1 + np.tanh(v / 2))  # overflow-free


def numpy_moe(x, ids, wts, mats, biases, act, absolute=False):
    """float64 MoE with biases; `absolute`: the bound B (every factor's magnitude)."""
    gate, up, down = mats
    bg, bu, bd = (np.zeros(1) if b is None else b.astype(np.float64) for b in biases)
    f = np.abs if absolute else (lambda v: v)
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            pick = lambda b: b[e] if b.ndim == 2 else b  # noqa: E731
            g = f(x[t]) @ f(gate[e]).T + f(pick(bg))
            u = f(x[t]) @ f(up[e]).T + f(pick(bu))
            if absolute:
                h = g * (u + 1)
            elif act.kind == "silu":
                h = g * sigmoid(g) * u
            else:
                g = np.minimum(g, act.limit)
                h = g * sigmoid(act.alpha * g) * (np.clip(u, -act.limit, act.limit) + 1)
            out[t] += f(wts[t, j]) * (h @ f(down[e]).T + f(pick(bd)))
    return out


def random_biases(rng, E, H, I, which=(True, True, True)):
    shapes = [(E, I), (E, I), (E, H)]
    return tuple(rng.standard_normal(s).astype(np.float32) if on else None
                 for s, on in zip(shapes, which))


def check_all_isas(x, ids, wts, h, ref64, bound):
    def close(y, ref, tol):
        err = np.abs(y.astype(np.float64) - ref)
        assert np.all(err <= tol), f"max err {err.max()}, worst ratio {(err / tol).max()}"
    near64 = 0.03 * np.abs(ref64).max()
    ref = hm.moe_reference(x, ids, wts, h)
    close(ref, ref64, near64)
    # the scalar reference is the generic level's formula exactly (no FMA there)
    np.testing.assert_array_equal(hm.moe_forward(x, ids, wts, h, isa="generic"), ref)
    for isa in SIMD_ISAS:
        y = hm.moe_forward(x, ids, wts, h, isa=isa)
        close(y, hm.moe_reference(x, ids, wts, h, like=isa), 1e-4 * bound + 1e-6)
        close(y, ref64, near64)


@pytest.mark.parametrize("act,fmt,tokens", [
    (OAI, "int8", 1), (OAI, "int8", 33), (OAI, "bf16", 5), (OAI, "int4", 17),
    (SILU, "int8", 33), (SILU, "bf16", 5)], ids=lambda v: getattr(v, "kind", v))
def test_biased_experts_every_isa(act, fmt, tokens, store):
    rng = np.random.default_rng(tokens)
    E, H, I, k = 5, 96, 72, 2  # rows not multiples of 16: the vector tails run too
    # weights large enough that gate and up often pass the clamp limit (std ~ 4.9)
    gate, up = (rng.standard_normal((E, I, H), dtype=np.float32) * 0.5 for _ in range(2))
    down = rng.standard_normal((E, H, I), dtype=np.float32) * 0.1
    biases = random_biases(rng, E, H, I)
    h = hm.pack_experts_float(gate, up, down, fmt, act, biases)
    store.append(h)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)
    mats = unpack_set(h, E)
    g = np.stack(mats[0]) @ x.T.astype(np.float64)
    assert (g > 7).any() and (g < -7).any()  # the clamp is exercised
    check_all_isas(x, ids, wts, h, numpy_moe(x, ids, wts, mats, biases, act),
                   numpy_moe(x, ids, wts, mats, biases, act, absolute=True))


def test_some_biases_absent(store):
    rng = np.random.default_rng(2)
    E, H, I, k, tokens = 4, 64, 48, 2, 9
    mats_f = [rng.standard_normal(s, dtype=np.float32) * 0.3 for s in [(E, I, H), (E, I, H), (E, H, I)]]
    biases = random_biases(rng, E, H, I, which=(False, True, False))
    h = hm.pack_experts_float(*mats_f, "int8", OAI, biases)
    store.append(h)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)
    mats = unpack_set(h, E)
    check_all_isas(x, ids, wts, h, numpy_moe(x, ids, wts, mats, biases, OAI),
                   numpy_moe(x, ids, wts, mats, biases, OAI, absolute=True))
    stored = hm.stored_epilogue(h)
    assert stored["activation"] == "swiglu_oai" and stored["gate_bias"] is None
    np.testing.assert_array_equal(stored["up_bias"], biases[1])


def test_mxfp4_experts_with_biases(store):
    """gpt-oss's experts as its files ship them: MXFP4 blocks, repacked losslessly."""
    rng = np.random.default_rng(4)
    E, H, I, k, tokens = 4, 128, 96, 2, 12
    gate = random_iq(T.MXFP4, E * I, H, seed=1)
    up = random_iq(T.MXFP4, E * I, H, seed=2)
    down = random_iq(T.MXFP4, E * H, I, seed=3)
    biases = tuple(b * 3 for b in random_biases(rng, E, H, I))
    h = hm.pack_experts_gguf((gate, T.MXFP4), (up, T.MXFP4), (down, T.MXFP4), E, H, I,
                             activation=OAI, biases=biases)
    store.append(h)
    x = rng.standard_normal((tokens, H), dtype=np.float32) * 8
    ids, wts = routing(rng, tokens, E, k)
    mats = unpack_set(h, E)
    check_all_isas(x, ids, wts, h, numpy_moe(x, ids, wts, mats, biases, OAI),
                   numpy_moe(x, ids, wts, mats, biases, OAI, absolute=True))


def test_skipped_slots_and_ffi_layers(store):
    """The FFI call (as the models make it) picks each layer's set with its own epilogue;
    skipped slots (hybrid placement) add nothing, down bias included."""
    rng = np.random.default_rng(5)
    E, H, I, k, tokens = 4, 64, 32, 2, 7
    handles = []
    for act in (OAI, SILU):
        mats = [rng.standard_normal(s, dtype=np.float32) * 0.3 for s in [(E, I, H), (E, I, H), (E, H, I)]]
        handles.append(hm.pack_experts_float(*mats, "int8", act, random_biases(rng, E, H, I)))
        store.append(handles[-1])
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    ids, wts = routing(rng, tokens, E, k)

    @jax.jit
    def f(a, b, c):
        return jax.lax.scan(lambda _, layer: (0, hm.moe_layered(a, b, c, layer, tuple(handles))),
                            0, jnp.arange(2))[1]

    y = np.asarray(f(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts)))
    for i, h in enumerate(handles):
        np.testing.assert_array_equal(y[i], hm.moe_forward(x, ids, wts, h))
    skipped = ids.copy()
    skipped[:, 1] = -1
    only_first = hm.moe_forward(x, skipped, wts, handles[0])
    first_alone = hm.moe_forward(x, ids[:, :1], wts[:, :1], handles[0])
    np.testing.assert_allclose(only_first, first_alone, rtol=1e-6, atol=1e-6)


def test_bad_epilogues(store):
    rng = np.random.default_rng(6)
    E, H, I = 3, 32, 16
    mats = [rng.standard_normal(s, dtype=np.float32) for s in [(E, I, H), (E, I, H), (E, H, I)]]
    ok = np.zeros((E, I), np.float32)
    with pytest.raises(KernelError, match="unknown expert activation 'gelu'"):
        ExpertActivation("gelu")
    with pytest.raises(KernelError, match="unknown expert activation 'gelu'"):
        _native_pack(mats, {"activation": "gelu"})
    with pytest.raises(KernelError, match=r"gate_bias must be float32 \[3, 16\]"):
        hm.pack_experts_float(*mats, "int8", OAI, (np.zeros((E, I + 1), np.float32), None, None))
    with pytest.raises(KernelError, match=r"down_bias must be float32 \[3, 32\]"):
        hm.pack_experts_float(*mats, "int8", OAI, (ok, ok, np.zeros((E + 1, H), np.float32)))
    with pytest.raises(KernelError, match="up_bias must be float32, got float64"):
        hm.pack_experts_float(*mats, "int8", OAI, (ok, np.zeros((E, I)), None))
    with pytest.raises(KernelError, match="gate_bias must be 2-D"):
        hm.pack_experts_float(*mats, "int8", OAI, (np.zeros(E * I, np.float32), None, None))
    with pytest.raises(KernelError, match="up_bias must be a float32"):
        hm.pack_experts_float(*mats, "int8", OAI, (None, [[0.0] * I] * E, None))
    nan = ok.copy()
    nan[1, 2] = np.nan
    with pytest.raises(KernelError, match="gate_bias holds NaN or Inf"):
        hm.pack_experts_float(*mats, "int8", OAI, (nan, None, None))
    with pytest.raises(KernelError, match="finite limit > 0"):
        hm.pack_experts_float(*mats, "int8", ExpertActivation("swiglu_oai", 1.702, 0.0))
    with pytest.raises(KernelError, match="unknown expert epilogue field 'bias'"):
        _native_pack(mats, {"activation": "silu", "bias": ok})
    with pytest.raises(KernelError, match=r"expert biases are \(gate, up, down\)"):
        hm.pack_experts_float(*mats, "int8", OAI, (ok, ok))
    # a refused pack stores nothing; the store still packs and runs good sets
    h = hm.pack_experts_float(*mats, "int8", OAI, (ok, ok, None))
    store.append(h)
    assert hm.moe_forward(np.ones((1, H), np.float32), np.zeros((1, 1), np.int32),
                          np.ones((1, 1), np.float32), h).shape == (1, H)


def _native_pack(mats, epilogue):
    from ktjax.host.native import native_call
    return native_call(_native.pack_experts_float, *mats, "int8", epilogue)
