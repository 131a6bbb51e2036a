"""kv_cache_dtype: bfloat16 and int8 KV pages through the whole engine on CPU (the host kernel
reads bfloat16 pages, the reference int8 ones), against float32 pages, and the memory the
pages take."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.engine import kv_cache
from ktjax.errors import KernelError, KtjaxError

PROMPT = list(np.random.default_rng(3).integers(1, 200, 600))   # 2 prefill chunks: 512 + 88
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, ignore_eos=True)


def _llm(path, kv_dtype, attention="auto"):
    return LLM(str(path), max_model_len=1024, kv_cache_tokens=1024, host_linears=False,
               dtype="float32", kv_cache_dtype=kv_dtype, attention=attention)


@pytest.fixture(scope="module")
def float32_run(tiny_llama_path):
    llm = _llm(tiny_llama_path, "float32")
    return llm.score(PROMPT), llm.generate([PROMPT[:40]], GREEDY)[0], llm.engine.kv_cache_bytes


@pytest.mark.parametrize("kv_dtype,tol", [("bfloat16", 0.02), ("int8", 0.05)])
def test_smaller_pages_match_float32(tiny_llama_path, float32_run, kv_dtype, tol):
    want_scores, want_gen, f32_bytes = float32_run
    llm = _llm(tiny_llama_path, kv_dtype)
    scores = llm.score(PROMPT)
    # the second chunk (tokens 512..) attends to the first through the stored pages
    np.testing.assert_allclose(scores[512:], want_scores[512:], atol=tol, rtol=0)
    np.testing.assert_allclose(scores[:511], want_scores[:511], atol=1e-4, rtol=0)
    gen = llm.generate([PROMPT[:40]], GREEDY)[0]
    assert gen.token_ids == want_gen.token_ids
    np.testing.assert_allclose(gen.logprobs, want_gen.logprobs, atol=tol, rtol=0)
    # the memory report counts what the device holds, and int8 pages are the smallest
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(llm.engine.kv))
    assert llm.engine.kv_cache_bytes == held
    assert held < f32_bytes / (1.9 if kv_dtype == "bfloat16" else 3.1)   # head dim 16


def test_int8_pages_fit_twice_the_tokens_of_bfloat16():
    spec = kv_cache.KVCacheSpec(32, 8, 128, 128)            # Llama-3-8B
    assert kv_cache.bytes_per_token(spec, "bfloat16") == 131072
    assert kv_cache.bytes_per_token(spec, "int8") == 32 * 8 * 2 * (128 + 4)
    budget = 10 * 2 ** 30
    bf16, int8 = (kv_cache.pages_within(spec, budget, 16, d) for d in ("bfloat16", "int8"))
    assert 1.9 < int8 / bf16 < 2
    assert int8 * 16 >= 131072 > bf16 * 16          # 128K tokens fit 10 GiB in int8 only


def test_bad_kv_dtype_and_cpu_kernel_refuse_by_name(tiny_llama_path):
    with pytest.raises(KtjaxError, match="kv_cache_dtype 'int4'"):
        _llm(tiny_llama_path, "int4")
    with pytest.raises(KernelError, match="int8"):
        _llm(tiny_llama_path, "int8", attention="cpu")


def test_cli_flag_sets_the_kv_cache_dtype(tiny_llama_path, capsys, monkeypatch):
    from ktjax import cli
    seen = []

    def capture(self, model, config=None, **fields):  # the settings the CLI gave, no load
        seen.append(fields)
        raise KtjaxError("stop after the config")
    monkeypatch.setattr("ktjax.api.LLM.__init__", capture)
    assert cli.main(["generate", "hi", "-m", str(tiny_llama_path),
                     "--kv-cache-dtype", "int8"]) == 2
    assert seen[0]["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--kv-cache-dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
