"""Tokenizer metadata for GGUF files that ktjax writes itself (tests' tiny random models and
the benchmarks' synthetic models of real shapes): a GPT-2 byte-level vocabulary, enough for
`ktjax.LLM` to load the file and round-trip any text."""
from __future__ import annotations

import gguf

MERGES = ["Ġ t", "h e"]
MERGED = ["Ġt", "he"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab(pad_to: int | None = None) -> tuple[list[str], list[int]]:
    """Chat specials, the 256 byte tokens and two merged tokens; with `pad_to`, plain filler
    tokens up to that vocabulary size. Returns (tokens, token types)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = SPECIALS + [chr(c) for _, c in sorted(zip(bs, cs))] + MERGED
    if pad_to is not None:
        tokens += [f"<pad{i}>" for i in range(pad_to - len(tokens))]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def add_byte_level_tokenizer(w: gguf.GGUFWriter, pad_to: int | None = None,
                             eos_id: int = 2) -> None:
    tokens, types = byte_level_vocab(pad_to)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(False)
