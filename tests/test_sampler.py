"""The on-device sampler against numpy statements of each rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import SamplingParams
from ktjax.engine.sampler import (SamplingBatch, _argmax_reductions, apply_penalties,
                                  argmax_last, sample, split_seed)
from ktjax.errors import RequestError

V = 50


def _batch(n, **kw):
    d = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
             presence_penalty=0.0, frequency_penalty=0.0)
    d.update(kw)
    recent = kw.pop("recent", None)
    d.pop("recent", None)
    cols = {k: jnp.full((n,), v, jnp.int32 if k == "top_k" else jnp.float32)
            for k, v in d.items()}
    return SamplingBatch(seed=jnp.asarray(np.stack([split_seed(s) for s in range(n)])),
                         step=jnp.zeros(n, jnp.int32),
                         recent=jnp.asarray(recent if recent is not None
                                            else np.full((n, 4), -1, np.int32)), **cols)


def _draws(probs, n=400, **kw):
    logits = jnp.asarray(np.log(np.tile(probs, (n, 1))), jnp.float32)
    return set(np.asarray(sample(logits, _batch(n, **kw))[0]).tolist())


PROBS = np.array([0.4, 0.3, 0.2, 0.1])


def test_filters():
    assert _draws(PROBS) == {0, 1, 2, 3}
    assert _draws(PROBS, top_k=2) == {0, 1}
    assert _draws(PROBS, top_p=0.5) == {0, 1}       # 0.4 < 0.5 keeps token 1, 0.7 stops
    assert _draws(PROBS, min_p=0.6) == {0, 1}       # keeps p >= 0.24
    assert _draws(PROBS, temperature=0.0) == {0}


def test_penalties_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, V)).astype(np.float32)
    recent = np.array([[3, 3, 7, -1], [1, -1, -1, -1]], np.int32)
    out = np.asarray(apply_penalties(jnp.asarray(logits), _batch(
        2, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
        recent=recent)))
    ref = logits.copy()
    for r in range(2):
        ids, counts = np.unique(recent[r][recent[r] >= 0], return_counts=True)
        for t, c in zip(ids, counts):
            x = ref[r, t]
            x = x / 1.3 if x > 0 else x * 1.3
            ref[r, t] = x - 0.5 - 0.25 * c
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_logprob_is_models():
    logits = jnp.asarray(np.log(np.tile(PROBS, (2, 1))), jnp.float32)
    tokens, logprobs = sample(logits, _batch(2, temperature=0.0))
    np.testing.assert_allclose(np.asarray(logprobs), np.log(0.4), rtol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0),
    ("max_tokens", 0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("temperature", float("nan")), ("seed", -4),
    # passed validation before, then failed inside a step holding its pages (issue 25)
    ("top_k", 2**31), ("seed", 1.5), ("stop", [1]), ("max_tokens", "5"), ("max_tokens", 1.5),
    ("temperature", float("inf")), ("stop_token_ids", ["a"]),
    # bools where ints are meant, NaN, float32 range, wrong containers, negative ids
    ("max_tokens", True), ("top_k", True), ("seed", True), ("penalty_last_n", 1.5),
    ("penalty_last_n", -2), ("top_p", float("nan")), ("min_p", float("nan")),
    ("temperature", 1e39), ("temperature", "0.5"), ("repetition_penalty", 1e-50),
    ("repetition_penalty", float("inf")), ("presence_penalty", float("-inf")),
    ("frequency_penalty", None), ("seed", 2**64), ("stop", 3), ("stop", [""]),
    ("stop", {"a": 1}), ("stop_token_ids", [-1]), ("stop_token_ids", [1.5]),
    ("stop_token_ids", [True]), ("stop_token_ids", "ab"), ("stop_token_ids", 5),
    ("ignore_eos", "yes"), ("logprobs", 1),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: value})


def test_sampling_params_normalize_numpy_values():
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3),
                       seed=np.uint64(2**64 - 1), stop="x", stop_token_ids=np.array([1, 2]),
                       logprobs=np.bool_(True))
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.stop_token_ids, p.logprobs) == \
        (5, 3, 2**64 - 1, ("x",), (1, 2), True)
    assert type(p.max_tokens) is int and type(p.temperature) is float


@pytest.mark.parametrize("n", [5, 50, 1000, 70001])
def test_argmax_last_is_jnp_argmax(isa, n):
    """The host kernel (every ISA level; rows of 70001 split across threads) and the
    reductions other devices use: ties pick the first index, NaN counts as the maximum."""
    rng = np.random.default_rng(n)
    x = rng.integers(-3, 3, (8, n)).astype(np.float32)         # many ties
    x[1, n // 2] = np.nan
    x[2, [n - 1, n // 3]] = np.nan
    x[3] = -np.inf
    x[4, n // 4:] = np.inf
    x[5, -1] = 9                                               # the maximum in the tail
    x[6, n // 2:] = 9                                          # ties across thread chunks
    want = np.asarray(jnp.argmax(x, axis=-1))
    got = np.asarray(jax.jit(argmax_last)(x))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(jax.jit(_argmax_reductions)(x)), want)
