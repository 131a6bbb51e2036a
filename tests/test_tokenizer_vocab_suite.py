"""Token ids against llama.cpp's own tokenizer suite: its models/ggml-vocab-*.gguf vocabulary
files with their .inp / .out cases (no BOS, specials not parsed, as its test-tokenizer-0).

The files come from the llama-cpp-python sdist (../shared/peers/build_llamacpp.sh unpacks it
into .peers/llama.cpp), or from the folder KTJAX_LLAMA_VOCABS names; tests/data/llama_vocab
holds the MIT-licensed phi-3 and gpt-2 ones, so part of the suite always runs. Pre-tokenizer types the
suite has no file of are checked on its llama-bpe vocabulary with the type rewritten, against
ids llama-tokenize gave for that (tests/data/llama_vocab_pre_fixtures.json, made by
scripts/make_vocab_pre_fixtures.py).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from ktjax.errors import UnsupportedModelError
from ktjax.gguf.pretokenizers import PRE_TOKENIZERS
from ktjax.gguf.reader import read_metadata
from ktjax.gguf.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEP = "\n__ggml_vocab_test__\n"
PRE_FIXTURES = {f.stem: json.loads(f.read_text(encoding="utf-8"))
                for f in sorted((ROOT / "tests" / "data").glob("llama_vocab_pre_fixtures*.json"))}
# Every vocabulary of the suite with cases (llama-cpp-python 0.3.36), and what ktjax makes of it.
SUPPORTED = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
             "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
UNSUPPORTED = {"bert-bge": "tokenizer.ggml.model = 'bert'",      # WordPiece
               "gemma-4": "tokenizer.ggml.model = 'gemma4'"}     # SentencePiece-style BPE


def _vocab_dirs() -> list[Path]:
    dirs = [ROOT / "tests" / "data" / "llama_vocab", ROOT / ".peers" / "llama.cpp" / "models"]
    if os.environ.get("KTJAX_LLAMA_VOCABS"):
        dirs.insert(0, Path(os.environ["KTJAX_LLAMA_VOCABS"]))
    return dirs


def vocab_file(name: str) -> Path:
    for d in _vocab_dirs():
        p = d / f"ggml-vocab-{name}.gguf"
        if p.is_file():
            return p
    pytest.skip(f"ggml-vocab-{name}.gguf not found (run ../shared/peers/build_llamacpp.sh or "
                "set KTJAX_LLAMA_VOCABS to llama.cpp's models/ folder)")


@functools.lru_cache(maxsize=None)
def _metadata(path: Path) -> dict:
    return read_metadata(path)


def _cases(path: Path) -> list[tuple[str, list[int]]]:
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEP)
    ids = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(ids) >= len(texts), f"{path.name}: fewer .out lines than .inp cases"
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


def _mismatches(tok: Tokenizer, cases) -> list:
    bad = []
    for text, want in cases:
        got = tok.encode(text, add_bos=False, parse_special=False)
        if got != want:
            bad.append((text[:40], want[:12], got[:12]))
    return bad


@pytest.mark.parametrize("name", SUPPORTED)
def test_suite_vocab_every_case(name):
    path = vocab_file(name)
    cases = _cases(path)
    tok = Tokenizer.from_gguf_metadata(_metadata(path))
    bad = _mismatches(tok, cases)
    assert not bad, f"{len(bad)} of {len(cases)} cases differ from llama.cpp: {bad[:3]}"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_suite_vocab_unsupported_models_are_refused(name):
    with pytest.raises(UnsupportedModelError, match=UNSUPPORTED[name]):
        Tokenizer.from_gguf_metadata(_metadata(vocab_file(name)))


@pytest.mark.parametrize("fixture,pre", [(name, pre) for name, fx in PRE_FIXTURES.items()
                                         for pre in sorted(fx["ids"])])
def test_pre_tokenizer_types_on_rewritten_suite_vocab(fixture, pre):
    """The pre-tokenizer types without a suite file, on a suite vocabulary (llama-bpe; the
    MIT gpt-2 one, kept in tests/data, for the issue's families) with the type rewritten."""
    fx = PRE_FIXTURES[fixture]
    meta = dict(_metadata(vocab_file(fx["base_vocab"][len("ggml-vocab-"):-len(".gguf")])))
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_gguf_metadata(meta)
    bad = _mismatches(tok, zip(fx["texts"], fx["ids"][pre]))
    assert not bad, f"{len(bad)} of {len(fx['texts'])} cases differ: {bad[:3]}"


def test_pre_types_of_the_issue_are_known():
    """The families of issue 31 and the flags llama.cpp ties to their names."""
    for pre in ("deepseek-llm", "deepseek-v3", "kimi-k2", "glm4", "gpt-4o", "tekken", "qwen35",
                "llama3", "smaug-bpe"):
        assert pre in PRE_TOKENIZERS
    assert PRE_TOKENIZERS["tekken"].add_bos and PRE_TOKENIZERS["tekken"].ignore_merges
    assert PRE_TOKENIZERS["glm4"].ignore_merges and not PRE_TOKENIZERS["glm4"].add_bos
    assert not PRE_TOKENIZERS["smaug-bpe"].ignore_merges


def test_gpt_oss_harmony_tokens():
    """As llama.cpp for o200k_harmony: <|channel|> & co. are user-defined (always split out,
    even without parse_special) and <|end|> stops being end-of-generation when <|return|>
    and <|call|> are."""
    from ktjax.gguf.synthetic import byte_level_vocab
    tokens, types = byte_level_vocab()
    harmony = ["<|return|>", "<|call|>", "<|end|>", "<|channel|>", "<|start|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o",
            "tokenizer.ggml.tokens": tokens + harmony,
            "tokenizer.ggml.token_type": types + [3] * len(harmony),
            "tokenizer.ggml.merges": []}
    tok = Tokenizer.from_gguf_metadata(meta)
    ret, call, end, channel, start = range(len(tokens), len(tokens) + 5)
    assert {ret, call} <= tok.stop_ids and end not in tok.stop_ids
    ids = tok.encode("a<|channel|>b<|end|>", parse_special=False)
    assert channel in ids and end in ids and tok.decode(ids) == "a<|channel|>b<|end|>"
    assert start in tok.encode("<|start|>x")
