"""Engine behaviour on a tiny model: batching, chunked prefill, sampling, stops, KV limits."""
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
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


def test_greedy_follows_full_forward_argmax(tiny_llm, tiny_llama_path):
    prompt = _prompts(1)[0]
    out = tiny_llm.generate([prompt], GREEDY)[0]
    ids = prompt + out.token_ids
    logits = ktjax_logits(tiny_llama_path, np.array(ids))   # one uncached pass
    assert out.token_ids == logits[len(prompt) - 1:-1].argmax(-1).tolist()


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
