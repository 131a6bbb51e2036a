"""Tokenizer tests: token ids against llama.cpp (recorded fixture, optionally a live binary),
round trips, incremental decoding and load errors."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from ktjax.gguf.reader import GGUFFile
from ktjax.errors import GGUFError, RequestError, UnsupportedModelError
from ktjax.gguf.tokenizer import CONTROL, NORMAL, USER_DEFINED, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "data" / "llama_tokenize_fixtures.json").read_text())
CASE_TEXTS = sorted({c["text"] for c in FIXTURE["cases"]})


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata as the engine's reader hands it to the tokenizer."""
    return GGUFFile(path).metadata


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_files() -> dict[str, Path]:
    return _load_script("make_tokenizer_fixtures").model_paths()


@pytest.fixture(scope="session")
def tokenizers(model_files) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf_metadata(gguf_metadata(path))
            for name, path in model_files.items()}


# -- llama.cpp agreement ------------------------------------------------------------------


def _encode_case(tok: Tokenizer, case: dict) -> list[int]:
    return tok.encode(case["text"], add_bos=None if case["add_special"] else False,
                      parse_special=case["parse_special"])


@pytest.mark.parametrize("model", sorted(FIXTURE["models"]))
def test_ids_match_llama_cpp_fixture(tokenizers, model_files, model):
    assert model_files[model].name == FIXTURE["models"][model]["file"]
    tok = tokenizers[model]
    bad = [(c["text"], c["add_special"], c["parse_special"], c["ids"], _encode_case(tok, c))
           for c in FIXTURE["cases"] if c["model"] == model]
    bad = [b for b in bad if b[3] != b[4]]
    assert not bad, "\n".join(f"{t!r} bos={a} special={p}\n  llama.cpp {w}\n  ktjax     {g}"
                              for t, a, p, w, g in bad)


@pytest.mark.parametrize("model", sorted(FIXTURE["models"]))
def test_special_ids_match_llama_cpp(tokenizers, model):
    tok, want = tokenizers[model], FIXTURE["models"][model]
    assert sorted(tok.stop_ids) == want["eog"]
    assert [tok.bos_id] == want["bos"] and [tok.eos_id] == want["eos"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    pool = ["Hello", " world", "  ", "\t", "\n", "\r\n", "é", "ñ", "中文", "日本語", "😀", "\u200d",
            "👩", "🏽", "123", "4567", ".", ",", "'s", "'ll", "<|im_end|>", "<end_of_turn>",
            "<bos>", " <", ">", "://", "x", "_", "▁", "Ġ", "\u00a0", "ß", "Ω", "∑", "  \n"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 25))) for _ in range(n)]


@pytest.mark.skipif(not os.environ.get("KTJAX_LLAMA_TOKENIZE"), reason="KTJAX_LLAMA_TOKENIZE not set")
@pytest.mark.parametrize("model", sorted(FIXTURE["models"]))
def test_ids_match_live_llama_tokenize(tokenizers, model_files, model):
    run = _load_script("make_tokenizer_fixtures").run_llama_tokenize
    binary, tok = os.environ["KTJAX_LLAMA_TOKENIZE"], tokenizers[model]
    bad = []
    for text in CASE_TEXTS + _random_texts(40):
        for parse_special in (False, True):
            want = run(binary, model_files[model], text, True, parse_special)
            got = tok.encode(text, parse_special=parse_special)
            if want != got:
                bad.append(f"{text!r} special={parse_special}\n  llama.cpp {want}\n  ktjax     {got}")
    assert not bad, "\n".join(bad)


# -- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(FIXTURE["models"]))
@pytest.mark.parametrize("parse_special", [False, True])
def test_round_trip(tokenizers, model, parse_special):
    tok = tokenizers[model]
    for text in CASE_TEXTS + _random_texts(30, seed=1):
        if model == "gemma3" and "▁" in text:
            continue  # SentencePiece writes spaces as ▁, so a literal ▁ decodes as a space
        ids = tok.encode(text, add_bos=False, parse_special=parse_special)
        assert tok.decode(ids) == text


def test_decode_skip_special(tokenizers):
    tok = tokenizers["smollm2"]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nhi"
    assert tok.token_to_piece(2) == "<|im_end|>"
    gemma = tokenizers["gemma3"]
    ids = gemma.encode("hi<end_of_turn>\n", parse_special=True)
    assert ids[0] == gemma.bos_id and 106 in ids
    assert gemma.decode(ids, skip_special=True) == "hi\n"


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.incremental_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("model", sorted(FIXTURE["models"]))
def test_incremental_decoder_holds_partial_characters(tokenizers, model):
    tok = tokenizers[model]
    # 𠀋 (CJK extension B) and 𓀀 are byte-fallback in Gemma; most non-ASCII characters are
    # split across byte-level pieces in SmolLM2.
    text = "a 👨‍👩‍👧 b 中文 𠀋 𓀀 🫠 é"
    ids = tok.encode(text, add_bos=False)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(ids) > len(text.split()) and "" in chunks[:-1]  # some tokens ended mid-character


def test_incremental_decoder_byte_tokens(tokenizers):
    tok = tokenizers["gemma3"]
    ids = tok.encode("𠀋", add_bos=False)
    assert [tok.token_to_piece(i) for i in ids] == ["\ufffd"] * 4  # one byte token per UTF-8 byte
    assert _stream(tok, ids) == ["", "", "", "𠀋", ""]
    dec = tok.incremental_decoder()
    assert dec.push(ids[0]) == "" and dec.flush() == "\ufffd"  # a dangling byte is not lost silently


def test_incremental_decoder_skips_special(tokenizers):
    tok = tokenizers["gemma3"]
    ids = tok.encode("<start_of_turn>model\nOK<end_of_turn>", parse_special=True)
    assert "".join(_stream(tok, ids)) == "model\nOK"
    dec = tok.incremental_decoder(skip_special=False)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "<bos><start_of_turn>model\nOK<end_of_turn>"


def test_model_properties(tokenizers):
    smol, gemma = tokenizers["smollm2"], tokenizers["gemma3"]
    assert (smol.vocab_size, smol.add_bos, smol.bos_id, smol.eos_id) == (49152, False, 1, 2)
    assert (gemma.vocab_size, gemma.add_bos, gemma.bos_id, gemma.eos_id) == (262144, True, 2, 1)
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    assert gemma.chat_template is None
    assert {2, 0} <= smol.stop_ids and {1, 106} <= gemma.stop_ids


# -- synthetic vocabularies: pre-tokenizers and errors ----------------------------------------


def _byte_level_meta(pre: str | None, **extra: Any) -> dict[str, Any]:
    """A byte-level BPE vocabulary: all 256 byte characters plus digit merges."""
    from ktjax.gguf.tokenizer import _byte_to_unicode

    tokens = list(_byte_to_unicode().values()) + ["12", "123", "1234", "<|im_end|>", "<|user|>"]
    types = [NORMAL] * 259 + [CONTROL, USER_DEFINED]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": ["1 2", "12 3", "123 4"]}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta | extra


@pytest.mark.parametrize("pre, pieces", [
    ("llama-bpe", ["123", "4"]),       # digits in groups of three
    ("qwen2", ["1", "2", "3", "4"]),   # one digit per pre-token
    ("smollm", ["1", "2", "3", "4"]),
    ("gpt-2", ["1234"]),
    ("gpt2", ["1234"]),
    ("default", ["123", "4"]),
    (None, ["123", "4"]),              # missing pre: llama.cpp's default
])
def test_pre_tokenizer_regexes(pre, pieces):
    tok = Tokenizer.from_gguf_metadata(_byte_level_meta(pre, **{"tokenizer.ggml.bos_token_id": 0}))
    ids = tok.encode("1234", add_bos=False)
    assert [tok.token_to_piece(i) for i in ids] == pieces
    assert tok.add_bos == (pre == "llama-bpe")


def test_user_defined_tokens_always_split_control_only_when_parsing():
    tok = Tokenizer.from_gguf_metadata(_byte_level_meta("gpt-2"))
    end, user = 259, 260
    assert user in tok.encode("a<|user|>b")
    assert end not in tok.encode("a<|im_end|>b")
    assert end in tok.encode("a<|im_end|>b", parse_special=True)
    assert tok.stop_ids == {end}  # <|im_end|> ends generation by its text, as in llama.cpp


@pytest.mark.parametrize("change, error, words", [
    ({"tokenizer.ggml.model": "bert"}, UnsupportedModelError, ["tokenizer.ggml.model", "bert"]),
    ({"tokenizer.ggml.pre": "klingon"}, UnsupportedModelError, ["tokenizer.ggml.pre", "klingon"]),
    ({"tokenizer.ggml.tokens": None}, GGUFError, ["tokenizer.ggml.tokens"]),
    ({"tokenizer.ggml.model": None}, GGUFError, ["tokenizer.ggml.model"]),
    ({"tokenizer.ggml.merges": None}, GGUFError, ["tokenizer.ggml.merges"]),
    ({"tokenizer.ggml.token_type": [1, 1]}, GGUFError, ["tokenizer.ggml.token_type"]),
    ({"tokenizer.ggml.eos_token_id": 10**6}, GGUFError, ["tokenizer.ggml.eos_token_id"]),
    ({"tokenizer.ggml.add_bos_token": True}, GGUFError, ["tokenizer.ggml.bos_token_id"]),
])
def test_load_errors(change, error, words):
    meta = _byte_level_meta("gpt-2")
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    with pytest.raises(error) as info:
        Tokenizer.from_gguf_metadata(meta)
    assert all(w in str(info.value) for w in words)


def test_duplicate_token_is_an_error():
    meta = _byte_level_meta("gpt-2")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["12"]
    with pytest.raises(GGUFError, match="twice"):
        Tokenizer.from_gguf_metadata(meta)


def test_request_errors():
    tok = Tokenizer.from_gguf_metadata(_byte_level_meta("gpt-2"))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        tok.decode([0, 10**6])
    with pytest.raises(RequestError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="BOS"):
        tok.encode("x", add_bos=True)


def test_spm_space_prefix_and_byte_fallback():
    """A tiny SentencePiece vocabulary with add_space_prefix (llama.cpp's default for 'llama')."""
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [NORMAL] * 6 + [6] * 256
    scores = [0.0, 0.0, 0.0, -5.0, -6.0, -7.0, -1.0, -2.0, -0.5] + [0.0] * 256
    tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores})
    assert tok.add_bos and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("ab aé")
    assert ids == [1, 8, 6] + [9 + b for b in "é".encode()]
    assert tok.decode(ids, skip_special=True) == "ab aé"
    assert tok.encode("a</s>b", add_bos=False, parse_special=True) == [6, 2, 3, 5]  # prefix after special
