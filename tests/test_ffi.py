"""The CPU XLA FFI path: the production handlers registered once and called from jitted
programs; bad operands are XLA errors, never a crash, and the target keeps working."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import _native
from ktjax.engine.sampler import argmax_last
from ktjax.host import linear as hl
from ktjax.host.ffi import register_targets
from ktjax.kernels.rms_norm import rms_norm_host, rms_norm_reference

# XLA errors surface as JaxRuntimeError (XlaRuntimeError in older jaxlib releases).
try:
    from jax.errors import JaxRuntimeError as RuntimeErr
except ImportError:  # pragma: no cover
    from jaxlib.xla_extension import XlaRuntimeError as RuntimeErr


def test_targets_listed_and_registration_idempotent() -> None:
    assert set(_native.ffi_targets()) == {
        "ktjax_rms_norm_f32", "ktjax_linear_layered", "ktjax_moe_layered",
        "ktjax_paged_attention", "ktjax_argmax", "ktjax_stacked_matvec", "ktjax_moe_submit",
        "ktjax_moe_wait", "ktjax_moe_after"}
    assert set(_native.cuda_ffi_targets()) == {"ktjax_linear_layered", "ktjax_moe_layered",
                                               "ktjax_moe_submit", "ktjax_moe_wait",
                                               "ktjax_moe_after"}
    register_targets()
    register_targets()


def test_host_argmax_matches_jnp() -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1000), dtype=np.float32))
    got = jax.jit(argmax_last)(x)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(x), axis=-1))


def test_wrong_dtype_is_an_error_not_a_crash(store) -> None:
    h = hl.pack_float_weight(np.ones((8, 64), np.float32))
    store.append(h)
    f = jax.jit(lambda v: hl.linear_layered(v, jnp.int32(0), (h,), 8))
    with pytest.raises(RuntimeErr, match="x: expected dtype float32, got float16"):
        jax.block_until_ready(f(jnp.ones((2, 64), jnp.float16)))
    # The process survives and the target still works.
    y = f(jnp.ones((2, 64), jnp.float32))
    np.testing.assert_allclose(np.asarray(y), 64.0, rtol=1e-2)


@pytest.mark.parametrize("shape", [(64,), (3, 5, 64), (1, 7), (512, 256)])
def test_host_rms_norm_matches_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(shape[-1:], dtype=np.float32))
    got = jax.jit(lambda x, w: rms_norm_host(x, w, 1e-5))(x, w)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(rms_norm_reference(x, w, 1e-5)),
                               rtol=2e-5, atol=2e-5)


def test_host_rms_norm_bad_operands_are_errors() -> None:
    f = jax.jit(lambda x, w: rms_norm_host(x, w, 1e-6))
    with pytest.raises(RuntimeErr, match=r"w: expected dimension 0 = 64.*got shape \[10\]"):
        jax.block_until_ready(f(jnp.ones((2, 64), jnp.float32), jnp.ones((10,), jnp.float32)))
    with pytest.raises(RuntimeErr, match="x: expected dtype float32, got float16"):
        jax.block_until_ready(f(jnp.ones((2, 64), jnp.float16), jnp.ones((64,), jnp.float32)))
