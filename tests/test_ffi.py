"""The CPU XLA FFI path: a native handler called from a jitted program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import _native
from ktjax.host.ffi import register_targets, rms_norm

# XLA errors surface as JaxRuntimeError (XlaRuntimeError in older jaxlib releases).
try:
    from jax.errors import JaxRuntimeError as RuntimeErr
except ImportError:  # pragma: no cover
    from jaxlib.xla_extension import XlaRuntimeError as RuntimeErr


def rms_norm_ref(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def test_targets_listed_and_registration_idempotent() -> None:
    assert "ktjax_rms_norm_f32" in _native.ffi_targets()
    register_targets()
    register_targets()


@pytest.mark.parametrize("shape", [(64,), (3, 5, 64), (1, 7), (512, 256)])
def test_rms_norm_matches_jnp(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(shape[-1:], dtype=np.float32))
    got = jax.jit(lambda x, w: rms_norm(x, w, 1e-5))(x, w)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(rms_norm_ref(x, w, 1e-5)),
                               rtol=2e-5, atol=2e-5)


def test_wrong_weight_length_is_an_error_not_a_crash() -> None:
    x = jnp.ones((2, 64), jnp.float32)
    w = jnp.ones((10,), jnp.float32)
    with pytest.raises(RuntimeErr, match=r"w: expected dimension 0 = 64.*got shape \[10\]"):
        jax.block_until_ready(jax.jit(lambda x, w: rms_norm(x, w, 1e-6))(x, w))


def test_wrong_dtype_is_an_error_not_a_crash() -> None:
    x = jnp.ones((2, 64), jnp.float16)
    w = jnp.ones((64,), jnp.float32)
    with pytest.raises(RuntimeErr, match="x: expected dtype float32, got float16"):
        jax.block_until_ready(jax.jit(lambda x, w: rms_norm(x, w, 1e-6))(x, w))
    # The process survives and the target still works.
    y = jax.jit(lambda x, w: rms_norm(x, w, 1e-6))(x.astype(jnp.float32), w)
    np.testing.assert_allclose(np.asarray(y), 1.0, rtol=1e-5)
