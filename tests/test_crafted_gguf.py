"""Crafted GGUF files (issue 25): each is a GGUFError (or TensorError) naming the key or
tensor, raised by ktjax.LLM(path) itself, never a crash, a ZeroDivisionError, RecursionError,
MemoryError or minutes of allocation."""
from __future__ import annotations

import math
import struct
import time

import pytest
from gguf import GGUFValueType as V

from gguf_craft import Field, nested_array, parse
from ktjax import LLM
from ktjax.errors import GGUFError, TensorError
from ktjax.gguf.reader import GGUFFile
from tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("crafted") / "tiny.gguf", "llama")


def refused(crafted, tmp_path, error=GGUFError, match=None):
    """LLM(path) of the crafted file raises `error` matching `match`, within seconds."""
    path = crafted.write(tmp_path / "crafted.gguf")
    start = time.monotonic()
    with pytest.raises(error, match=match) as info:
        LLM(str(path))
    assert time.monotonic() - start < 30
    return info.value


def set_value(crafted, key, vtype, value, etype=None):
    f = crafted.field(key)
    f.vtype, f.value, f.etype, f.raw = vtype, value, etype, None
    return crafted


def test_crafted_round_trip_loads(tiny, tmp_path):
    """The crafting itself changes nothing: the file written back loads."""
    path = parse(tiny).write(tmp_path / "same.gguf")
    assert path.read_bytes() == tiny.read_bytes()
    LLM(str(path))


def test_ffn_dims_past_64_bits(tiny, tmp_path):
    """The issue's reproducer: feed_forward_length and the FFN tensors' dims 2^62 + 1 (their
    int64 element count wraps to a small number, which passed every check and then packed past
    the buffer: SIGSEGV)."""
    c = parse(tiny)
    big = 2**62 + 1
    set_value(c, "llama.feed_forward_length", V.UINT64, big)
    for t in c.tensors:
        if "ffn_gate" in t.name or "ffn_up" in t.name:
            t.dims = [64, big]
        elif "ffn_down" in t.name:
            t.dims = [big, 64]
    refused(c, tmp_path, match="feed_forward_length|2\\^63")


@pytest.mark.parametrize("dims", [[64, 2**62 + 1], [2**32, 2**32], [2**63, 0], [2**64 - 1]])
def test_tensor_dims_overflow(tiny, tmp_path, dims):
    """Tensor dims alone (metadata sane) whose product passes 2^63 or wraps int64 exactly."""
    c = parse(tiny)
    c.tensor("blk.0.ffn_up.weight").dims = dims
    refused(c, tmp_path, match="blk.0.ffn_up.weight")


def test_too_many_dims(tiny, tmp_path):
    c = parse(tiny)
    c.tensor("output_norm.weight").dims = [64, 1, 1, 1, 1]
    refused(c, tmp_path, match="output_norm.weight.*5 dimensions")


def test_misaligned_tensor_offset(tiny, tmp_path):
    c = parse(tiny)
    c.tensor("blk.1.attn_norm.weight").offset += 4
    refused(c, tmp_path, match="blk.1.attn_norm.weight.*not a multiple of the alignment 32")


def test_overlapping_tensor_data(tiny, tmp_path):
    """Two tensors reading the same bytes: llama.cpp refuses the file; ktjax loaded garbage."""
    c = parse(tiny)
    c.tensor("blk.1.ffn_norm.weight").offset = c.tensor("blk.1.attn_norm.weight").offset
    refused(c, tmp_path, match="overlaps")


@pytest.mark.parametrize("vtype,value,why", [
    (V.UINT32, 0, "must be in 1"), (V.UINT32, 48, "power of two"),
    (V.FLOAT32, math.nan, "must be an integer"), (V.STRING, "32", "must be an integer"),
    (V.UINT64, 2**40, "must be in 1")])
def test_bad_alignment(tiny, tmp_path, vtype, value, why):
    c = parse(tiny)
    c.fields.insert(1, Field("general.alignment", vtype, value))
    refused(c, tmp_path, match=f"general.alignment.*{why}")


def test_duplicate_metadata_key(tiny, tmp_path):
    c = parse(tiny)
    c.fields.append(Field("llama.block_count", V.UINT32, 2))
    refused(c, tmp_path, match="'llama.block_count' appears twice")


@pytest.mark.parametrize("key,vtype,value,why", [
    ("tokenizer.ggml.merges", V.STRING, "a b", "must be an array of strings"),
    ("llama.attention.layer_norm_rms_epsilon", V.STRING, "1e-6", "must be a number"),
    ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, math.inf, "must be finite"),
    ("llama.block_count", V.UINT32, 2**32 - 1, "must be in 1"),
    ("llama.block_count", V.UINT32, 1000, "exceeds the 20 tensors"),
    ("llama.attention.head_count", V.UINT32, 0, "must be in 1"),
    ("llama.attention.head_count_kv", V.UINT32, 0, "must be in 1"),
    ("llama.attention.head_count_kv", V.UINT32, 3, "does not divide the 4 query heads"),
    ("llama.rope.dimension_count", V.UINT32, 2**31, "must be in 0"),
    ("llama.rope.dimension_count", V.UINT32, 18, "exceeds the 16 dimensions"),
    ("llama.rope.dimension_count", V.UINT32, 7, "must be even"),
    ("llama.rope.freq_base", V.FLOAT32, 0.0, "must be positive"),
    ("llama.context_length", V.INT32, -5, "must be in 1"),
    ("llama.feed_forward_length", V.ARRAY, [128, 128], "must be an integer"),
    ("llama.embedding_length", V.BOOL, True, "must be an integer"),
    ("general.architecture", V.UINT32, 7, "must be a string"),
    ("tokenizer.ggml.tokens", V.ARRAY, [1, 2, 3], "must be an array of strings"),
    ("tokenizer.ggml.token_type", V.ARRAY, ["a"], "must be an array of integers"),
    ("tokenizer.ggml.bos_token_id", V.FLOAT32, 1.0, "must be an integer"),
    ("tokenizer.ggml.model", V.ARRAY, ["gpt2"], "must be a string"),
])
def test_metadata_of_the_wrong_type_or_range(tiny, tmp_path, key, vtype, value, why):
    c = parse(tiny)
    etype = None
    if vtype == V.ARRAY:
        etype = V.STRING if isinstance(value[0], str) else V.UINT32
    set_value(c, key, vtype, value, etype)
    refused(c, tmp_path, match=f"{key}.*{why}")


def test_arrays_nested_50000_deep(tiny, tmp_path):
    c = parse(tiny)
    c.fields.append(Field("general.deep", V.ARRAY, raw=nested_array(50_000)))
    refused(c, tmp_path, match="general.deep.*nests arrays deeper")


def test_shallow_nested_arrays_are_read(tiny, tmp_path):
    c = parse(tiny)
    c.fields.append(Field("general.nested", V.ARRAY, raw=nested_array(3)))
    path = c.write(tmp_path / "nested.gguf")
    assert GGUFFile(path).metadata["general.nested"] == [[[]]]


@pytest.mark.parametrize("etype", [V.STRING, V.ARRAY])
def test_huge_array_count_fails_at_once(tiny, tmp_path, etype):
    c = parse(tiny)
    c.fields.append(Field("general.huge", V.ARRAY, raw=struct.pack("<IQ", etype, 2**60)))
    refused(c, tmp_path, match="general.huge.*cannot fit")


@pytest.mark.parametrize("which", ["n_tensors", "n_kv"])
def test_huge_header_counts(tiny, tmp_path, which):
    c = parse(tiny)
    setattr(c, which, 2**63)
    refused(c, tmp_path)


def test_zero_width_ffn_is_a_tensor_error(tiny, tmp_path):
    """feed_forward_length 0 with matching empty FFN tensors: no packing of empty matrices."""
    c = parse(tiny)
    set_value(c, "llama.feed_forward_length", V.UINT32, 0)
    for t in c.tensors:
        if "ffn_gate" in t.name or "ffn_up" in t.name:
            t.dims = [64, 0]
        elif "ffn_down" in t.name:
            t.dims = [0, 64]
    refused(c, tmp_path, TensorError, match="ffn_gate.*every dimension must be positive")


def test_vocab_from_a_missing_tensor_is_a_tensor_error(tiny, tmp_path):
    """No vocab_size, no token list and no token_embd: the vocabulary size lookup names the
    missing tensor instead of a KeyError."""
    c = parse(tiny)
    c.fields = [f for f in c.fields if f.key not in ("llama.vocab_size", "tokenizer.ggml.tokens")]
    c.tensors = [t for t in c.tensors if t.name != "token_embd.weight"]
    refused(c, tmp_path, TensorError, match="token_embd.weight")
