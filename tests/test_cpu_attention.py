"""The host paged-attention kernel (ktjax_paged_attention) against the jnp reference, on every
ISA level this machine has, and its bad-input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.kernels import paged_attention_cpu, paged_attention_ref

def make_problem(rng, *, rows=3, tokens=1, heads=6, kv=2, hd=64, vd=None, pages=24,
                 page_size=4, table_pages=5, layers=2, cache_dtype=np.float32, mla=None):
    """Random caches and a batch whose rows hold different lengths in shuffled pages; the last
    row is padding (position -1) when rows > 1."""
    vd = hd if vd is None else vd
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    k_cache = f(layers, pages, page_size, kv, hd).astype(cache_dtype)
    v_cache = (np.zeros((layers, pages, page_size, kv, 0), cache_dtype) if mla
               else f(layers, pages, page_size, kv, vd).astype(cache_dtype))
    tables = np.stack([rng.permutation(np.arange(1, pages))[:table_pages] for _ in range(rows)])
    lens = rng.integers(0, table_pages * page_size - tokens + 1, rows)
    lens[0] = table_pages * page_size - tokens          # a full table
    if rows > 2:
        lens[1] = 0                                     # nothing cached yet
    positions = lens[:, None] + np.arange(tokens)[None]
    if rows > 1:
        positions[-1] = -1                              # a padding row
    if tokens > 2:
        positions[0, -1] = -1                           # a padded token inside a row
    return dict(q=f(rows, tokens, heads, hd), k_new=f(rows, tokens, kv, hd),
                v_new=None if mla else f(rows, tokens, kv, vd),
                k_cache=jnp.asarray(k_cache), v_cache=jnp.asarray(v_cache),
                layer=jnp.int32(1), block_tables=tables.astype(np.int32),
                cache_lens=lens.astype(np.int32), q_positions=positions.astype(np.int32))


def both(problem, **kw):
    args = list(problem.values())
    got = jax.jit(lambda *a: paged_attention_cpu.paged_attention(*a, **kw))(*args)
    want = jax.jit(lambda *a: paged_attention_ref.paged_attention(*a, **kw))(*args)
    return np.asarray(got), np.asarray(want)


CASES = {
    "decode-gqa": dict(),
    "mha-odd-head-dim": dict(heads=3, kv=3, hd=72),
    "one-kv-head-many-heads": dict(heads=16, kv=1, hd=32, table_pages=8),
    "short-chunk": dict(tokens=5),
    "long-context-splits": dict(rows=1, heads=4, kv=1, hd=256, pages=80, page_size=16,
                                table_pages=64),
    "value-dim-differs": dict(hd=48, vd=32),
    "head-chunks-cut-groups": dict(rows=1, heads=24, kv=8, hd=32),  # chunks of 8 heads, rep 3
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(isa, case):
    problem = make_problem(np.random.default_rng(len(case)), **CASES[case])
    got, want = both(problem, scale=0.125)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window", [1, 3, 9])
def test_sliding_window(isa, window):
    problem = make_problem(np.random.default_rng(window), tokens=3, page_size=4)
    got, want = both(problem, scale=0.2, sliding_window=jnp.int32(window))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bf16_cache(isa):
    problem = make_problem(np.random.default_rng(7), cache_dtype=jnp.bfloat16)
    got, want = both(problem, scale=0.125)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_latent_values_in_keys(isa):
    """MLA: one latent per token; values are its first 48 dims."""
    problem = make_problem(np.random.default_rng(3), heads=8, kv=1, hd=64, mla=True,
                           cache_dtype=jnp.bfloat16)
    got, want = both(problem, scale=0.1, values_in_keys=48)
    assert got.shape[-1] == 48
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_long_chunks_run_in_the_kernel(isa):
    """Prefill chunks too (one kernel for every step size keeps rows batch-invariant), with
    cached keys past the 256-key split."""
    problem = make_problem(np.random.default_rng(5), rows=2, tokens=40, page_size=16,
                           table_pages=20, pages=48)
    hlo = jax.jit(lambda *a: paged_attention_cpu.paged_attention(*a, scale=0.1)).lower(
        *problem.values()).as_text()
    assert "ktjax_paged_attention" in hlo
    got, want = both(problem, scale=0.1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case,window", [("decode-gqa", 0), ("short-chunk", 3),
                                         ("long-context-splits", 40),
                                         ("head-chunks-cut-groups", 0)])
def test_sinks(isa, case, window):
    """gpt-oss's per-head sink logits (denominator only) on decode and chunk steps, key splits
    merged (long context), head chunks, with and without gpt-oss's sliding window."""
    problem = make_problem(np.random.default_rng(11), **CASES[case])
    heads = problem["q"].shape[2]
    sinks = np.random.default_rng(12).normal(0.0, 2.0, heads).astype(np.float32)
    sinks[0] = 8.0  # a head whose sink takes most of the weight
    kw = dict(scale=0.125, sliding_window=jnp.int32(window), sinks=jnp.asarray(sinks))
    got, want = both(problem, **kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    if case == "decode-gqa":
        plain, _ = both(problem, scale=0.125)
        assert np.abs(plain - got).max() > 0.1  # the sinks change the result


def _error(problem, **kw) -> str:
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.jit(
            lambda *a: paged_attention_cpu.paged_attention(*a, **kw))(*problem.values()))
    return str(err.value)


def test_bad_input_is_an_error_naming_the_argument():
    rng = np.random.default_rng(0)
    problem = make_problem(rng)
    problem["block_tables"] = problem["block_tables"].copy()
    problem["block_tables"][0, 0] = 999
    assert "block_tables" in _error(problem, scale=0.1) and "999" in _error(problem, scale=0.1)

    problem = make_problem(rng)
    problem["layer"] = jnp.int32(2)
    assert "layer" in _error(problem, scale=0.1)

    problem = make_problem(rng)
    problem["q"] = problem["q"].copy()
    problem["q"][0, 0, 0, 0] = np.nan
    assert "q: holds NaN" in _error(problem, scale=0.1)

    problem = make_problem(rng)
    problem["cache_lens"] = problem["cache_lens"].copy()
    problem["cache_lens"][0] = -3
    assert "cache_lens" in _error(problem, scale=0.1)

    problem = make_problem(rng, heads=5, kv=2)
    assert "KV heads" in _error(problem, scale=0.1)

    problem = make_problem(rng)  # 6 query heads
    assert "sinks" in _error(problem, scale=0.1, sinks=jnp.zeros(5))
    bad = np.zeros(6, np.float32)
    bad[2] = np.inf
    assert "sinks: holds NaN or Inf" in _error(problem, scale=0.1, sinks=jnp.asarray(bad))


@pytest.mark.parametrize("cut", [0, 5, 16, 270, 299], ids=lambda c: f"cached-{c}")
def test_result_follows_position_not_where_the_cache_ends(isa, cut):
    """A 300-token sequence's queries from `cut` on, attended with keys 0..cut-1 in the cache
    and the rest as the step's own: every query's result is bit for bit the same as with the
    whole sequence but itself cached (a decode step), whatever `cut` is (chunk boundaries,
    prefix-cache hits and draft verification all move it; splits of 256 keys included)."""
    rng = np.random.default_rng(1)
    n, ps, kv, hd, heads = 300, 16, 2, 32, 4
    keys, values = (rng.standard_normal((n, kv, hd)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    pages = n // ps + 2
    table = np.arange(1, pages, dtype=np.int32)[None]            # page i + 1 holds positions i*ps..

    def cache_up_to(length):
        k = np.zeros((1, pages, ps, kv, hd), np.float32)
        v = np.zeros_like(k)
        k[0, 1:].reshape(-1, kv, hd)[:length] = keys[:length]
        v[0, 1:].reshape(-1, kv, hd)[:length] = values[:length]
        return jnp.asarray(k), jnp.asarray(v)

    def attend(start, stop):  # queries start..stop-1, cache holding 0..start-1
        k, v = cache_up_to(start)
        out = paged_attention_cpu.paged_attention(
            q[None, start:stop], keys[None, start:stop], values[None, start:stop], k, v,
            jnp.int32(0), table, jnp.array([start], jnp.int32),
            jnp.arange(start, stop, dtype=jnp.int32)[None], scale=0.2)
        return np.asarray(out)[0]

    chunk = attend(cut, n)
    for p in (cut, (cut + n) // 2, n - 1):
        np.testing.assert_array_equal(chunk[p - cut], attend(p, p + 1)[0])
