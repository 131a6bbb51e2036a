"""The scheduler on a tiny model: mixed decode + prefill steps, preemption when the KV pool
runs dry, abort, and the prefix cache (shared pages, identical outputs, LRU revival)."""
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.engine.kv_cache import PagePool
from ktjax.engine.prefix_cache import chain_hashes
from ktjax.errors import KtjaxError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(3, 259, n).tolist()


def _alone(llm, prompt, params=GREEDY):
    return llm.generate([prompt], params)[0].token_ids


def test_long_prompt_never_stalls_running_streams(tiny_llm):
    """While a 700-token prompt prefills in chunks, the running request gets a token every
    step (mixed steps), and both get what they get alone."""
    eng = tiny_llm.engine
    short, long_ = _prompt(5, 1), _prompt(700, 2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    a = eng.add_request(short, params)
    eng.step()                                   # a's prefill
    b = eng.add_request(long_, params)
    kinds = []
    while b.in_prefill:
        n = len(a.output_ids)
        got = eng.step()
        assert a in got and len(a.output_ids) == n + 1
        kinds.append(b.n_cached)
    assert len(kinds) >= 2                       # the prompt took several chunks
    for _ in eng.run_until_done():
        pass
    assert a.output_ids == _alone(tiny_llm, short, params)
    assert b.output_ids == _alone(tiny_llm, long_, params)
    assert eng.pool.used_pages == 0


def test_preemption_recomputes_and_matches(tiny_llama_path):
    """A pool of 10 pages for 4 requests growing to 70 tokens (5 pages) each: the newest are
    preempted and recomputed; every output equals its run alone; no page is left held."""
    llm = LLM(str(tiny_llama_path), max_model_len=256, kv_cache_tokens=160, page_size=16,
              host_linears=False)
    prompts = [_prompt(n, 10 + n) for n in (20, 30, 12, 25)]
    params = SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True)
    together = llm.generate(prompts, params)
    assert llm.engine.scheduler.preemptions > 0
    for p, out in zip(prompts, together):
        assert out.token_ids == _alone(llm, p, params)
    assert llm.engine.pool.used_pages == 0


def test_abort_frees_pages_at_once(tiny_llm):
    eng = tiny_llm.engine
    seq = eng.add_request(_prompt(40, 3), SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.pool.used_pages > 0
    eng.abort([seq])
    assert eng.pool.used_pages == 0 and not eng.has_work()
    assert seq.finish_reason == "abort"


def test_prefix_cache_outputs_identical_and_prefill_only_the_rest(tiny_llama_path,
                                                                   monkeypatch):
    """Requests sharing a 300-token system prompt: from the second on, its full pages are
    hits (18; the third request, the first one's prompt again, also the page holding the
    end of the system prompt and its question), shared while both run and revived from the
    LRU after; tokens and log-probabilities equal bit for bit those of an engine without the
    cache."""
    system = _prompt(300, 4)
    prompts = [system + _prompt(9, 5), system + _prompt(17, 6), system + _prompt(9, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True)
    kw = dict(max_model_len=512, kv_cache_tokens=2048)  # host kernels: batch-invariant
    cached, plain = LLM(str(tiny_llama_path), **kw), \
        LLM(str(tiny_llama_path), prefix_caching=False, **kw)
    assert cached.engine.scheduler.chunk_unit == 128
    prefix = cached.engine.pool.prefix
    first = cached.generate(prompts[:1], params)[0]
    assert prefix.hit_pages == 0 and prefix.idle_pages >= 16
    eng = cached.engine
    buckets = []
    real_bucket = eng._bucket
    monkeypatch.setattr(eng, "_bucket", lambda plan: buckets.append(real_bucket(plan))
                        or buckets[-1])
    seqs = [eng.add_request(p, params) for p in prompts[1:]]
    eng.step()
    assert prefix.hit_pages == 18 + 19
    assert eng.stats()["prefix_hit_pages"] == 37 and eng.stats()["running"] == 2
    # both prompts' rests (29 and 5 tokens) prefilled in one step of 32-token chunks
    assert [s.n_cached for s in seqs] == [len(prompts[1]), len(prompts[2])]
    assert buckets[0].chunk_rows == 2 and buckets[0].chunk_tokens == 32
    for _ in eng.run_until_done():
        pass
    outs = [first] + [s.output() for s in seqs]
    ref = plain.generate(prompts, params)
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids and o.logprobs == r.logprobs
    assert cached.engine.pool.used_pages == 0


def test_prefix_cache_eviction_takes_least_recently_used():
    pool = PagePool(5, 4)                        # 4 usable pages
    keys = chain_hashes(list(range(16)), 4, b"m", [])
    assert len(keys) == 4 and chain_hashes(list(range(16)), 4, b"other", []) != keys
    a = pool.allocate(2)
    for page, key in zip(a, keys):
        pool.prefix.register(page, key)
    pool.free(a)                    # idle, addressable; the tail first in the LRU
    assert pool.free_pages == 4 and pool.used_pages == 0
    assert pool.prefix.lookup(keys) == a
    b = pool.allocate(3)            # 2 free pages, then the least recently used idle one:
    assert pool.prefix.lookup(keys) == a[:1]     # the tail, so the prefix's head still hits
    assert pool.prefix.idle_pages == 1
    pool.share(a[:1])
    assert pool.free_pages == 0 and pool.prefix.idle_pages == 0
    pool.free(b + a[:1])
    assert pool.free_pages == 4


def test_bucket_set_stays_bounded(tiny_llm):
    """Mixed traffic compiles at most a few programs per (decode rows, chunk) shape."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 259, int(n)).tolist() for n in rng.integers(3, 300, 12)]
    before = tiny_llm.engine.programs.n_step_programs  # the fixture is shared with other tests
    tiny_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert tiny_llm.engine.programs.n_step_programs - before < 60


def test_budget_too_small_is_refused(tiny_llama_path):
    with pytest.raises(KtjaxError, match="max_step_tokens 8 leaves no room"):
        LLM(str(tiny_llama_path), max_model_len=256, max_step_tokens=8)
