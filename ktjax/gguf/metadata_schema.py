"""Types and ranges of the GGUF metadata keys ktjax reads, checked once when a file is parsed.

A model family turns metadata into sizes, divisors and loop counts (`int(...)`, `hidden //
n_heads`, one structure per layer); a crafted file must not make that a ZeroDivisionError,
a TypeError or minutes of allocation. So every key read anywhere in ktjax is listed here with
its type and bounds, and a value outside them is a GGUFError naming the key. Keys not listed
may hold anything: nothing reads them. Architecture keys are checked under the file's own
`general.architecture` prefix.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ktjax.errors import GGUFError

# llama.cpp keeps hyperparameters in uint32 (and ggml dimensions below 2^31 in practice); a
# size past this cannot describe tensors that fit in a file.
INT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = INT_LIMIT

    def problem(self, v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be an integer"
        if not self.lo <= v <= self.hi:
            return f"must be in {self.lo}..{self.hi}"
        return None


@dataclass(frozen=True)
class Real:
    positive: bool = False   # > 0
    non_negative: bool = False

    def problem(self, v: Any) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "must be a number"
        if not math.isfinite(v):
            return "must be finite"
        if self.positive and not v > 0:
            return "must be positive"
        if self.non_negative and v < 0:
            return "must not be negative"
        return None


@dataclass(frozen=True)
class Of:
    """A value of one Python type (str, bool), or a list of them (`array`)."""

    kind: type | tuple[type, ...]
    array: bool = False

    def problem(self, v: Any) -> str | None:
        names = {str: "a string", bool: "a boolean", int: "an integer",
                 (int, float): "a number"}
        what = names.get(self.kind, str(self.kind))
        if not self.array:
            return None if type(v) is self.kind else f"must be {what}"
        if not isinstance(v, list):
            return f"must be an array of {what.split(' ', 1)[1]}s"
        allowed = set(self.kind) if isinstance(self.kind, tuple) else {self.kind}
        if set(map(type, v)) <= allowed:   # one C-level pass over a 262k-token vocabulary
            return None
        bad = next(x for x in v if type(x) not in allowed)
        return f"must be an array of {what.split(' ', 1)[1]}s, holds {type(bad).__name__} {bad!r:.60}"


STR, BOOL = Of(str), Of(bool)

GLOBAL_KEYS = {
    "general.architecture": STR,
    "general.alignment": Int(1, 2**30),
    "tokenizer.ggml.model": STR,
    "tokenizer.ggml.pre": STR,
    "tokenizer.chat_template": STR,
    "tokenizer.ggml.tokens": Of(str, array=True),
    "tokenizer.ggml.merges": Of(str, array=True),
    "tokenizer.ggml.scores": Of((int, float), array=True),
    "tokenizer.ggml.token_type": Of(int, array=True),
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.ggml.add_space_prefix": BOOL,
}
_TOKEN_ID = re.compile(r"tokenizer\.ggml\.\w+_token_id")

# "{architecture}.<suffix>" keys.
ARCH_KEYS = {
    "context_length": Int(1),
    "embedding_length": Int(1),
    "block_count": Int(1),
    "feed_forward_length": Int(0),
    "vocab_size": Int(1),
    "leading_dense_block_count": Int(0),
    "attention.head_count": Int(1),
    "attention.head_count_kv": Int(1),
    "attention.key_length": Int(1),
    "attention.value_length": Int(1),
    "attention.key_length_mla": Int(1),
    "attention.value_length_mla": Int(1),
    "attention.q_lora_rank": Int(0),
    "attention.kv_lora_rank": Int(0),
    "attention.sliding_window": Int(0),
    "attention.layer_norm_rms_epsilon": Real(non_negative=True),
    "rope.dimension_count": Int(0),
    "rope.freq_base": Real(positive=True),
    "rope.scaling.type": STR,
    "rope.scaling.factor": Real(positive=True),
    "rope.scaling.original_context_length": Int(1),
    "rope.scaling.yarn_log_multiplier": Real(),
    "rope.scaling.attn_factor": Real(),
    "expert_count": Int(0),
    "expert_used_count": Int(0),
    "expert_feed_forward_length": Int(0),
    "expert_shared_feed_forward_length": Int(0),
    "expert_shared_count": Int(0),
    "expert_group_count": Int(0),
    "expert_group_used_count": Int(0),
    "expert_gating_func": Int(0),
    "expert_weights_scale": Real(),
    "expert_weights_norm": BOOL,
}


def check_metadata(meta: dict[str, Any], path: str, n_tensors: int) -> None:
    """GGUFError naming the first key ktjax reads whose value has the wrong type or range,
    or that disagrees with the file or another key (more layers than tensors, KV heads that
    do not divide the query heads, rotary dims wider than a head, an alignment that is not a
    power of two)."""
    def fail(key: str, why: str):
        raise GGUFError(f"{path}: metadata {key} = {_show(meta[key])} {why}")

    for key, value in meta.items():
        rule = GLOBAL_KEYS.get(key) or (Int() if _TOKEN_ID.fullmatch(key) else None)
        if rule is not None and (why := rule.problem(value)):
            fail(key, why)
    align = meta.get("general.alignment")
    if align is not None and align & (align - 1):
        fail("general.alignment", "must be a power of two")
    arch = meta.get("general.architecture")
    if arch is None:
        return
    for suffix, rule in ARCH_KEYS.items():
        key = f"{arch}.{suffix}"
        if key in meta and (why := rule.problem(meta[key])):
            fail(key, why)
    # Every layer has tensors of its own: a count beyond the file's tensors is corrupt (and
    # would otherwise build per-layer tables for billions of layers).
    blocks = f"{arch}.block_count"
    if meta.get(blocks, 0) > n_tensors:
        fail(blocks, f"exceeds the {n_tensors} tensors in the file")
    heads, kv_heads = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
    if heads in meta and kv_heads in meta and meta[heads] % meta[kv_heads]:
        fail(kv_heads, f"does not divide the {meta[heads]} query heads ({heads})")
    rope = f"{arch}.rope.dimension_count"
    if rope in meta:
        key_width = meta.get(f"{arch}.attention.key_length")
        if key_width is None and f"{arch}.embedding_length" in meta and \
                f"{arch}.attention.head_count" in meta:
            key_width = meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
        if meta[rope] % 2:
            fail(rope, "must be even (rotary dimensions come in pairs)")
        if key_width is not None and meta[rope] > key_width:
            fail(rope, f"exceeds the {key_width} dimensions of an attention head")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} items]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
