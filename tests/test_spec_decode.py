"""Speculative decoding: greedy output identical to plain decoding (prompt lookup and a draft
model), and the rejection rule keeps the target's distribution (statistically, tiny vocab)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.engine.drafters import NgramDrafter
from ktjax.engine.sampler import SamplingBatch, split_seed
from ktjax.engine.spec_decode import target_logprobs, verify_sample


def _repetitive_prompts():
    rng = np.random.default_rng(3)
    phrase = rng.integers(3, 259, 12).tolist()
    return [phrase * 4 + rng.integers(3, 259, 3).tolist(), phrase * 3,
            rng.integers(3, 259, 30).tolist()]


def test_ngram_lookup():
    d = NgramDrafter(max_n=3, min_n=2)
    assert d.lookup([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]
    assert d.lookup([5, 1, 2, 7, 1, 2], 2) == [7, 1]       # the latest earlier match
    assert d.lookup([1, 2, 3, 4], 3) == []


def test_ngram_greedy_equals_plain(tiny_llm, tiny_llama_path):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    prompts = _repetitive_prompts()
    plain = tiny_llm.generate(prompts, params)
    spec = LLM(str(tiny_llama_path), max_model_len=1024, kv_cache_tokens=4096,
               host_linears=False, speculative="ngram", spec_tokens=3)
    seqs = [spec.engine.add_request(p, params) for p in prompts]
    for _ in spec.engine.run_until_done():
        pass
    for s, ref in zip(seqs, plain):
        assert s.output_ids == ref.token_ids
        np.testing.assert_allclose(s.logprobs, ref.logprobs, atol=1e-5)
    assert sum(s.drafted for s in seqs) > 0 and sum(s.accepted for s in seqs) > 0
    # seeded sampling through the rejection rule: reproducible
    sampled = SamplingParams(seed=9, max_tokens=12, ignore_eos=True, top_k=20)
    a, b = (spec.generate(prompts, sampled) for _ in range(2))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 12 for o in a)
    assert spec.engine.pool.used_pages == 0


def _sampling_batch(rows, temperature, top_k=0, seed=0):
    f32 = lambda v: jnp.full(rows, v, jnp.float32)  # noqa: E731
    return SamplingBatch(temperature=f32(temperature), top_k=jnp.full(rows, top_k, jnp.int32),
                         top_p=f32(1.0), min_p=f32(0.0), repetition_penalty=f32(1.0),
                         presence_penalty=f32(0.0), frequency_penalty=f32(0.0),
                         seed=jnp.asarray(np.tile(split_seed(seed), (rows, 1))),
                         step=jnp.arange(rows, dtype=jnp.int32),
                         recent=jnp.full((rows, 1), -1, jnp.int32))


@pytest.mark.parametrize("draft_kind", ["certain", "distribution"])
def test_rejection_rule_keeps_the_target_distribution(draft_kind):
    """One position, vocab 6, 40000 independent trials (rows with their own keys): the
    token emitted (the draft if it passes, else the residual sample) follows the target's
    temperature-scaled top-k distribution, whatever the draft distribution was."""
    rows, vocab = 40000, 6
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3]]), (rows, 1))
    sb = _sampling_batch(rows, temperature=0.8, top_k=4, seed=11)
    p = np.exp(np.asarray(target_logprobs(logits[:1], jax.tree.map(lambda a: a[:1], sb))))[0]
    rng = np.random.default_rng(0)
    q = np.array([0.05, 0.1, 0.5, 0.05, 0.2, 0.1])  # far from p, with mass where p has none
    draft = rng.choice(vocab, rows, p=q).astype(np.int32)
    probs = jnp.asarray(np.tile(q, (rows, 1)), jnp.float32) if draft_kind == "distribution" \
        else None
    if probs is None:  # a certain draft: q is one-hot at the drafted token
        draft = np.full(rows, 2, np.int32)
    v = jax.jit(verify_sample)(logits, sb, jnp.asarray(draft), probs)
    emitted = np.where(np.asarray(v.accept), draft, np.asarray(v.residual))
    freq = np.bincount(emitted, minlength=vocab) / rows
    assert p[4] == 0 and freq[4] == 0               # outside top-k: never emitted
    np.testing.assert_allclose(freq, p, atol=0.012)  # ~4 sigma of a 40000-trial frequency
    if probs is None:
        np.testing.assert_allclose(np.asarray(v.accept).mean(), p[2], atol=0.012)


def test_greedy_rows_pass_only_the_argmax():
    logits = jnp.array([[0.1, 3.0, 0.2], [0.1, 3.0, 0.2]])
    v = verify_sample(logits, _sampling_batch(2, temperature=0.0), jnp.array([1, 2]))
    assert np.asarray(v.accept).tolist() == [True, False]
    assert int(v.residual[1]) == 1


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory):
    """A one-layer random model with the target's (byte-level) vocabulary."""
    from tiny_models import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("draft") / "draft.gguf", "llama",
                           n_layers=1, seed=7, context_length=2048)


@pytest.mark.parametrize("same_model", [True, False], ids=["draft=target", "other-draft"])
def test_draft_model_greedy_equals_plain(tiny_llm, tiny_llama_path, draft_path, same_model):
    """Greedy output is plain decoding's, whatever the draft; a draft that is the target
    itself has nearly every draft accepted."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = _repetitive_prompts()
    plain = tiny_llm.generate(prompts, params)
    spec = LLM(str(tiny_llama_path), max_model_len=1024, kv_cache_tokens=4096,
               host_linears=False, spec_tokens=3,
               speculative=str(tiny_llama_path if same_model else draft_path))
    seqs = [spec.engine.add_request(p, params) for p in prompts]
    for _ in spec.engine.run_until_done():
        pass
    assert [s.output_ids for s in seqs] == [o.token_ids for o in plain]
    drafted, accepted = sum(s.drafted for s in seqs), sum(s.accepted for s in seqs)
    assert drafted > 0
    if same_model:
        assert accepted >= 0.9 * drafted
    # sampling runs the rejection rule with the draft's distributions in the target's step
    outs = spec.generate(prompts, SamplingParams(seed=4, max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    assert spec.engine.pool.used_pages == 0
    assert spec.engine.drafter.engine.pool.used_pages == 0


def test_draft_model_vocab_mismatch_is_refused(draft_path):
    from ktjax.engine.config import EngineConfig
    from ktjax.engine.drafters import make_drafter
    from ktjax.errors import UnsupportedModelError
    config = EngineConfig(max_model_len=128, speculative=str(draft_path)).resolve(2048)
    with pytest.raises(UnsupportedModelError, match="vocabulary of 261 tokens, the target's "
                                                     "has 300"):
        make_drafter(config, vocab_size=300)


@pytest.mark.parametrize("options,match", [
    (dict(speculative="ngram", spec_tokens=0), "spec_tokens=0"),
    (dict(speculative=3), "speculative=3: expected 'ngram'"),
    (dict(speculative="/nonexistent/draft.gguf"), "no such GGUF file"),
])
def test_bad_speculative_settings_are_errors(tiny_llama_path, options, match):
    from ktjax.errors import KtjaxError
    with pytest.raises(KtjaxError, match=match):
        LLM(str(tiny_llama_path), max_model_len=128, **options)
