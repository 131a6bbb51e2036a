"""ktjax_stacked_matvec (few-row matmuls reading one layer of a stacked weight in place) and
LayerStack, against jnp, on every ISA level this machine has."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.host.stacked import stacked_matvec
from ktjax import weights

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,groups,n,k", [(1, 1, 128, 2048), (3, 4, 24, 40), (16, 2, 7, 33)])
def test_matches_einsum(isa, dtype, rows, groups, n, k):
    rng = np.random.default_rng(rows + k)
    x = rng.standard_normal((rows, groups, k)).astype(np.float32)
    stack = jnp.asarray(rng.standard_normal((3, groups, n, k)), dtype)
    got = jax.jit(stacked_matvec)(x, stack, jnp.int32(2))
    want = jnp.einsum("mgk,gnk->mgn", x, stack[2].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_layer_stack_in_a_scan_reads_each_layer():
    """linear/per_head_linear on a LayerStack bound by the scan index equal the sliced matmul,
    for decode rows and a long chunk (the host kernel for both)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.float32)
    stack = weights.LayerStack(w)
    for rows in (1, 17, 100):
        x = jnp.asarray(rng.standard_normal((rows, 32)), jnp.float32)

        def step(carry, i):
            bound = weights.bind_layer({"w": stack}, i)["w"]
            return carry, weights.linear(bound, x)

        _, ys = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(4, dtype=jnp.int32)))()
        want = jnp.einsum("mk,lnk->lmn", x, w)
        np.testing.assert_allclose(np.asarray(ys), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    x = np.ones((1, 1, 8), np.float32)
    stack = jnp.ones((2, 1, 4, 8), jnp.float32)
    with pytest.raises(Exception, match="layer"):
        jax.block_until_ready(jax.jit(stacked_matvec)(x, stack, jnp.int32(2)))
    with pytest.raises(Exception, match="x: holds NaN"):
        jax.block_until_ready(jax.jit(stacked_matvec)(x * np.nan, stack, jnp.int32(0)))
    with pytest.raises(Exception, match="last dimension of x"):
        jax.block_until_ready(jax.jit(stacked_matvec)(np.ones((1, 1, 9), np.float32), stack,
                                                      jnp.int32(0)))
