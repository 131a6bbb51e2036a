"""Engine behaviour on a tiny model: batching, chunked prefill, sampling, stops, KV limits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.engine import buckets as bk
from ktjax.engine.kv_cache import BlockTable
from ktjax.engine.programs import Full, Greedy
from ktjax.engine.sampler import SamplingBatch, sample, sample_greedy, split_seed
from ktjax.errors import OutOfMemoryError, RequestError
from reference import ktjax_logits

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n, rng=np.random.default_rng(0)):
    return [rng.integers(3, 259, int(k)).tolist() for k in rng.integers(3, 40, n)]


def test_batch_equals_one_at_a_time(tiny_llm):
    prompts = _prompts(5)
    together = tiny_llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, together):
        alone = tiny_llm.generate([p], GREEDY)[0]
        assert out.token_ids == alone.token_ids
        assert out.finish_reason == "length" and len(out.token_ids) == 12


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_follows_full_forward_argmax(tiny_llm, tiny_llama_path):
    prompt = _prompts(1)[0]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                     ignore_eos=True, logprobs=True))[0]
    ids = prompt + out.token_ids
    logits = ktjax_logits(tiny_llama_path, np.array(ids))[len(prompt) - 1:-1]  # uncached pass
    assert out.token_ids == logits.argmax(-1).tolist()
    ref = np.take_along_axis(_log_softmax(logits), np.array(out.token_ids)[:, None], 1)[:, 0]
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-4)


def _copy(kv):
    return jax.tree.map(jnp.copy, kv)  # step programs donate the cache


@pytest.fixture
def step_inputs(tiny_llm):
    """[(bucket, batch, kv)] of a prefill step of three prompts padded to four rows and of
    the decode step after it (kv: the cache that prefill wrote), on pages freed afterwards."""
    eng = tiny_llm.engine
    prompts = _prompts(3, np.random.default_rng(4))
    tables = [BlockTable(eng.pool) for _ in prompts]
    for t, p in zip(tables, prompts):
        t.ensure(len(p) + 1)
    pages = bk.page_bucket(max(len(t.pages) for t in tables), eng.max_pages)
    prefill = bk.Bucket(4, 64, pages)
    prefill_batch = eng._batch([(t, 0, p) for t, p in zip(tables, prompts)], 4, 64, pages)
    decode = bk.Bucket(4, 1, pages)
    decode_batch = eng._batch([(t, len(p), [p[-1]]) for t, p in zip(tables, prompts)], 4, 1,
                              pages)
    _, kv = eng.programs.step(prefill)(eng.params, _copy(eng.kv), prefill_batch)
    yield [(prefill, prefill_batch, eng.kv), (decode, decode_batch, kv)]
    for t in tables:
        t.release()


def _forward(eng, bucket, batch, kv):
    """The step without sampling: the sampled logit rows and the updated cache."""
    logits, kv = eng.programs.step(bucket)(eng.params, _copy(kv), batch)
    return logits[:, 0], kv


def _assert_same_cache(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_fused_greedy_equals_forward_then_sampler(tiny_llm, step_inputs, with_logprobs):
    """Bit for bit what the separate greedy sampler program made of the plain step's logits:
    argmax tokens, log-softmax log-probs, the same cache."""
    eng = tiny_llm.engine
    for bucket, batch, kv in step_inputs:
        logits, kv_ref = _forward(eng, bucket, batch, kv)
        tokens, logprobs, kv_out = eng.programs.step(bucket, Greedy(with_logprobs))(
            eng.params, _copy(kv), batch)
        ref_tokens, ref_logprobs = jax.jit(sample_greedy, static_argnums=1)(logits,
                                                                            with_logprobs)
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_array_equal(logprobs, ref_logprobs)
        np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
        if with_logprobs:
            np.testing.assert_allclose(logprobs, np.take_along_axis(
                _log_softmax(np.asarray(logits)), np.asarray(tokens)[:, None], 1)[:, 0],
                atol=1e-5)
        _assert_same_cache(kv_out, kv_ref)


def test_fused_sampling_equals_forward_then_sample(tiny_llm, step_inputs):
    """Seeded sampling with penalties, filters and a greedy row: bit for bit the tokens and
    log-probs of `sample` on the plain step's logits, and the same cache."""
    rng = np.random.default_rng(5)
    window = 8
    recent = rng.integers(3, 259, (4, window)).astype(np.int32)
    recent[1, 5:] = -1
    f32 = lambda *v: jnp.array(v, jnp.float32)  # noqa: E731
    sb = SamplingBatch(temperature=f32(0.8, 0.0, 1.2, 1.0), top_k=jnp.array([0, 0, 5, 0]),
                       top_p=f32(1.0, 1.0, 0.9, 1.0), min_p=f32(0.0, 0.0, 0.0, 0.05),
                       repetition_penalty=f32(1.3, 1.5, 1.0, 1.1),
                       presence_penalty=f32(0.2, 0.0, 0.5, 0.0),
                       frequency_penalty=f32(0.1, 0.0, 0.0, 0.3),
                       seed=jnp.asarray(np.stack([split_seed(s) for s in (7, 2**40 + 3, 9, 0)])),
                       step=jnp.array([0, 3, 7, 1], jnp.int32), recent=jnp.asarray(recent))
    eng = tiny_llm.engine
    for bucket, batch, kv in step_inputs:
        logits, kv_ref = _forward(eng, bucket, batch, kv)
        tokens, logprobs, kv_out = eng.programs.step(bucket, Full(window))(
            eng.params, _copy(kv), batch, sb)
        ref_tokens, ref_logprobs = jax.jit(sample)(logits, sb)
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_array_equal(logprobs, ref_logprobs)
        _assert_same_cache(kv_out, kv_ref)


@pytest.mark.parametrize("params", [
    [GREEDY],
    [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=True)],
    [GREEDY, SamplingParams(seed=1, max_tokens=12, ignore_eos=True, repetition_penalty=1.2)],
], ids=["greedy", "greedy-logprobs", "mixed"])
def test_precompile_covers_the_first_steps(tiny_llama_path, params):
    """generate() precompiles the fused programs its first prefill and decode steps run:
    nothing compiles while it generates."""
    llm = LLM(str(tiny_llama_path), max_model_len=256, host_linears=False)
    eng = llm.engine
    for prompt, p in zip(_prompts(len(params), np.random.default_rng(6)), params):
        eng.add_request(prompt, p)
    eng.precompile()
    compiled = eng.programs.compile_seconds
    for _ in eng.run_until_done():
        pass
    assert eng.programs.compile_seconds == compiled


def test_chunked_prefill_matches_single_pass(tiny_llm, tiny_llama_path):
    ids = np.random.default_rng(1).integers(3, 259, 700)     # 512 + 188: two chunks
    scored = tiny_llm.score(ids.tolist())
    logits = ktjax_logits(tiny_llama_path, ids)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref = np.take_along_axis(logprobs[:-1], ids[1:, None], 1)[:, 0]
    assert np.abs(scored - ref).max() < 1e-3


def test_seed_reproducible_and_varies(tiny_llm):
    p = _prompts(1)[0]
    a = tiny_llm.generate([p], SamplingParams(seed=5, max_tokens=16, ignore_eos=True))[0]
    b = tiny_llm.generate([p], SamplingParams(seed=5, max_tokens=16, ignore_eos=True))[0]
    c = tiny_llm.generate([p], SamplingParams(seed=6, max_tokens=16, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(tiny_llm):
    p = _prompts(1)[0]
    greedy = tiny_llm.generate([p], GREEDY)[0]
    topk = tiny_llm.generate([p], SamplingParams(top_k=1, seed=3, max_tokens=12,
                                                 ignore_eos=True))[0]
    assert greedy.token_ids == topk.token_ids


def test_logprobs_and_stop_token(tiny_llm):
    p = _prompts(1)[0]
    out = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=12, logprobs=True,
                                                ignore_eos=True))[0]
    assert len(out.logprobs) == 12 and all(lp <= 0 for lp in out.logprobs)
    stop_at = out.token_ids[4]
    first = out.token_ids.index(stop_at)
    stopped = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=12,
                                                    stop_token_ids=[stop_at],
                                                    ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == out.token_ids[:first + 1]


def test_stop_string_truncates_and_stream_matches(tiny_llm):
    p = _prompts(1)[0]
    full = tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=20,
                                                 ignore_eos=True))[0].text
    assert len(full) > 6
    stop = full[3:5]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    out = tiny_llm.generate([p], params)[0]
    assert out.finish_reason == "stop" and out.text == full[:full.find(stop)]
    assert "".join(tiny_llm.stream(p, params)) == out.text


def test_requests_queue_when_kv_pool_is_full(tiny_llama_path):
    llm = LLM(str(tiny_llama_path), max_model_len=256, kv_cache_tokens=96, page_size=16)
    outs = llm.generate(_prompts(4), SamplingParams(temperature=0, max_tokens=30,
                                                    ignore_eos=True))
    assert all(len(o.token_ids) == 30 for o in outs)
    with pytest.raises(OutOfMemoryError, match="KV pages"):
        llm.generate([list(range(3, 83))], SamplingParams(max_tokens=100))


def test_prompt_errors(tiny_llm):
    with pytest.raises(RequestError, match="empty"):
        tiny_llm.generate([""])
    with pytest.raises(RequestError, match="1024"):
        tiny_llm.generate([[5] * 1024])
    with pytest.raises(RequestError, match="vocabulary"):
        tiny_llm.generate([[5, 10**6]])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K"])
def test_host_linears_match_dense(tmp_path, qtype):
    """CPU runs keep matmul weights quantized in the host kernels (int8 activations):
    scores stay within quantization noise of the dense float32 path."""
    import gguf
    from tiny_models import write_tiny_gguf
    path = str(write_tiny_gguf(tmp_path / "m.gguf", "llama", gguf.GGMLQuantizationType[qtype],
                               hidden=256, head_dim=64, n_heads=4, n_kv_heads=2, ffn=256))
    ids = np.random.default_rng(2).integers(3, 259, 40).tolist()
    dense = LLM(path, max_model_len=128, host_linears=False).score(ids)
    host = LLM(path, max_model_len=128, host_linears=True).score(ids)
    assert np.abs(dense - host).max() < 0.05 * np.abs(dense).max()
