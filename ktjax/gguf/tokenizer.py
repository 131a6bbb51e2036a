"""Tokenizers built from GGUF metadata, giving the same token ids as llama.cpp.

Two model types are supported: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and
SentencePiece-style BPE with scores and byte fallback (``"llama"``). The BPE merging itself
runs in the ``tokenizers`` library; everything around it follows llama.cpp's
``llama-vocab.cpp``: special-token partitioning, pre-tokenizer regexes, the space prefix,
token attributes and the end-of-generation set.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ktjax.errors import GGUFError, RequestError, UnsupportedModelError
from ktjax.gguf.pretokenizers import PRE_TOKENIZERS, onig_regex

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # SentencePiece's visible space

# Token texts llama.cpp treats as end of generation (and forces to control type). Its
# exception for Gemma 4's </s> is left out: that tokenizer is unsupported.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# Fill-in-the-middle roles llama.cpp detects by text when their id key is absent; all are
# forced to control type, and pad/repo/sep also end generation.
_FIM_TEXTS: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
            "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
            "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
            "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_FIM_EOG = ("pad", "rep", "sep")
_HARMONY_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFError(f"GGUF metadata lacks required key {key!r}")
    return meta[key]


def _token_id(meta: Mapping[str, Any], key: str, n_vocab: int, default: int | None = None) -> int | None:
    value = meta.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < n_vocab:
        raise GGUFError(f"{key} = {value!r} is not a token id (vocabulary has {n_vocab} tokens)")
    return value


def _per_token(meta: Mapping[str, Any], key: str, n_vocab: int, default: Any) -> list:
    if key not in meta:
        return [default] * n_vocab
    values = list(meta[key])
    if len(values) < n_vocab:
        raise GGUFError(f"{key} has {len(values)} entries for {n_vocab} tokens")
    return values[:n_vocab]


class Tokenizer:
    """Encodes text to token ids and back, as llama.cpp does for the same GGUF file."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_ids: frozenset[int]
    chat_template: str | None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], hf_json: str | None = None) -> Tokenizer:
        """hf_json: the `tokenizers` model this metadata builds, as `hf_json()` wrote it for
        the same metadata (exported artifacts keep it: building Gemma's takes seconds)."""
        return cls(meta, hf_json)

    def hf_json(self) -> str:
        """The `tokenizers` model as JSON, its BPE merges as "a b" strings when no token of
        them holds a space: `tokenizers` reads those in half the time of [a, b] pairs
        (SmolLM2's 49k: 0.09 -> 0.05 s a start; Gemma's hold spaces and stay pairs)."""
        model = json.loads(self._hf.to_str())
        merges = model.get("model", {}).get("merges")
        if merges and all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
            model["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        return json.dumps(model, ensure_ascii=False, separators=(",", ":"))

    def __init__(self, meta: Mapping[str, Any], hf_json: str | None = None) -> None:
        model = _require(meta, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer.ggml.model = {model!r} is not supported (supported: 'gpt2', 'llama')")
        self._spm = model == "llama"
        # llama.cpp renames empty token texts so every text maps to exactly one id.
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(_require(meta, "tokenizer.ggml.tokens"))]
        n = self.vocab_size = len(tokens)
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise GGUFError(f"tokenizer.ggml.tokens holds {dup!r} twice (ids {tokens.index(dup)} and {vocab[dup]})")
        types = _per_token(meta, "tokenizer.ggml.token_type", n, NORMAL)

        if self._spm:
            pre_tok, add_bos, space_prefix = None, True, True
            defaults = {"bos": 1, "eos": 2}  # llama.cpp's SentencePiece defaults
        else:
            pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp falls back the same way
            if pre not in PRE_TOKENIZERS:
                raise UnsupportedModelError(
                    f"tokenizer.ggml.pre = {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            pre_tok = PRE_TOKENIZERS[pre]
            add_bos, space_prefix, defaults = pre_tok.add_bos, False, {}
        self._space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", space_prefix))
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        self.bos_id = _token_id(meta, "tokenizer.ggml.bos_token_id", n, defaults.get("bos"))
        self.eos_id = _token_id(meta, "tokenizer.ggml.eos_token_id", n, defaults.get("eos"))
        if self.add_bos and self.bos_id is None:
            raise GGUFError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set")
        self.chat_template = meta.get("tokenizer.chat_template")

        self.stop_ids = self._resolve_special(meta, tokens, types, vocab)
        self._types = types
        self._tokens = tokens
        # Pieces are made on first use (most of a vocabulary never is: 0.1-0.3 s a start);
        # byte tokens are checked now, so a malformed one fails the load, not a request.
        self._pieces: list[bytes | None] = [None] * n
        hidden, specials = [], []
        for i, t in enumerate(types):   # one pass: Gemma's 262k tokens
            if t == NORMAL:
                continue
            if t == BYTE:
                self._piece(i)
            if t in (CONTROL, UNKNOWN):
                hidden.append(i)
            if t in (CONTROL, USER_DEFINED, UNKNOWN):
                specials.append(i)
        self._hidden = frozenset(hidden)
        # llama.cpp matches longer special texts first (by UTF-8 length); ties go by id.
        specials.sort(key=lambda i: (-len(tokens[i].encode()), i))
        self._specials_all = self._index_specials(specials)
        self._specials_user = self._index_specials([i for i in specials if types[i] == USER_DEFINED])
        if hf_json is not None:
            self._hf = HFTokenizer.from_str(hf_json)
        elif pre_tok is None:
            self._hf = self._build_spm(meta, tokens, vocab)
        else:
            self._hf = self._build_bpe(meta, vocab, [onig_regex(r) for r in pre_tok.regexes],
                                       pre_tok.ignore_merges)

    # -- construction -------------------------------------------------------------------

    def _resolve_special(self, meta: Mapping[str, Any], tokens: list[str], types: list[int],
                         vocab: dict[str, int]) -> frozenset[int]:
        """Fix token types the way llama.cpp does and return its end-of-generation set."""
        n = len(tokens)
        eog = {vocab[t] for t in _EOG_TEXTS if t in vocab}
        forced = set(eog)
        for role, texts in _FIM_TEXTS.items():
            tid = _token_id(meta, f"tokenizer.ggml.fim_{role}_token_id", n)
            if tid is None:
                found = [vocab[t] for t in texts if t in vocab]
                if found:
                    tid = min(found)
                    forced.add(tid)
            if tid is not None and role in _FIM_EOG:
                eog.add(tid)
        for key in ("eot", "eom"):
            tid = _token_id(meta, f"tokenizer.ggml.{key}_token_id", n)
            if tid is not None:
                eog.add(tid)
        if self.eos_id is not None:
            eog.add(self.eos_id)
        for i in forced:
            types[i] = CONTROL
        # gpt-oss (o200k_harmony): llama.cpp always renders these, as user-defined tokens ...
        for text in _HARMONY_USER_DEFINED:
            if text in vocab:
                types[vocab[text]] = USER_DEFINED
        # ... and "<|end|>" does not end generation when "<|return|>" and "<|call|>" do (or
        # "<|calls|>" and "<|flush|>", solar-open).
        eog_texts = {tokens[i] for i in eog}
        has_call = bool(eog_texts & {"<|call|>", "<|calls|>"})
        if "<|end|>" in eog_texts and has_call and eog_texts & {"<|return|>", "<|flush|>"}:
            end = vocab["<|end|>"]
            eog.discard(end)
            types[end] = USER_DEFINED
        return frozenset(eog)

    def _piece_bytes(self, i: int) -> bytes:
        """The bytes llama.cpp's token_to_piece gives with special=true."""
        text, kind = self._tokens[i], self._types[i]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode()
        if kind == BYTE:
            if len(text) != 6 or not text.startswith("<0x") or not text.endswith(">"):
                raise GGUFError(f"byte token {i} is {text!r}, not <0xNN>")
            return bytes([int(text[3:5], 16)])
        if kind != NORMAL:
            return b""  # unused / undefined tokens render as nothing
        if self._spm:
            return text.replace(_SPACE, " ").encode()
        return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode() for c in text)

    def _index_specials(self, ids: list[int]) -> list[tuple[str, str, int]]:
        # (first two characters, text, id): a cheap filter before the substring search.
        return [(self._tokens[i][:2], self._tokens[i], i) for i in ids]

    @staticmethod
    def _build_bpe(meta: Mapping[str, Any], vocab: dict[str, int], regexes: Iterable[str],
                   ignore_merges: bool) -> HFTokenizer:
        merges = []
        for m in _require(meta, "tokenizer.ggml.merges"):
            cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            a, b = m[:cut], m[cut + 1:]
            if cut > 0 and a in vocab and b in vocab and a + b in vocab:
                merges.append((a, b))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    @staticmethod
    def _build_spm(meta: Mapping[str, Any], tokens: list[str], vocab: dict[str, int]) -> HFTokenizer:
        # llama.cpp repeatedly merges the adjacent pair whose concatenation is a token with the
        # highest score; as BPE merges that is every split of every token into two tokens,
        # ranked by the score of the whole token. Equal scores go by id here but by position in
        # llama.cpp; Gemma's normal tokens all have distinct scores, so only odd vocabularies differ.
        scores = _per_token(meta, "tokenizer.ggml.scores", len(tokens), 0.0)
        ranked = []
        for i, text in enumerate(tokens):
            for k in range(1, len(text)):
                a, b = text[:k], text[k:]
                if a in vocab and b in vocab:
                    ranked.append((-scores[i], i, k, a, b))
        ranked.sort()
        unk = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens), 0)
        return HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked],
                                      unk_token=tokens[unk] if unk is not None else None,
                                      byte_fallback=True))

    # -- encoding -----------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens as llama.cpp's tokenizer_st_partition does: each special
        text in turn (longest first) is cut out of every remaining raw-text fragment."""
        frags: list[str | int] = [text]
        pairs = {text[i:i + 2] for i in range(len(text))} | set(text)
        for head, piece, tid in self._specials_all if parse_special else self._specials_user:
            if head not in pairs or piece not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or piece not in f:
                    out.append(f)
                    continue
                for j, part in enumerate(f.split(piece)):
                    if j:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; control tokens written in it are recognised only with
        ``parse_special`` (user-defined ones always are, as in llama.cpp)."""
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be a str, not {type(text).__name__}")
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is None:
            raise RequestError("cannot add BOS: the model has no tokenizer.ggml.bos_token_id")
        ids = [self.bos_id] if add_bos else []
        prev_special = True  # SentencePiece adds the space prefix at the start and after specials
        for frag in self._partition(text, parse_special) if text else []:
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            if self._spm:
                if self._space_prefix and prev_special:
                    frag = " " + frag
                frag = frag.replace(" ", _SPACE)
            ids.extend(self._hf.encode(frag, add_special_tokens=False).ids)
            prev_special = False
        return ids

    # -- decoding -----------------------------------------------------------------------

    def _check_id(self, i: int) -> int:
        if not isinstance(i, int) or not 0 <= i < self.vocab_size:
            raise RequestError(f"token id {i!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def token_bytes(self, i: int, skip_special: bool = False) -> bytes:
        """The bytes of one token; may be part of a UTF-8 character."""
        if skip_special and self._check_id(i) in self._hidden:
            return b""
        return self._piece(self._check_id(i))

    def _piece(self, i: int) -> bytes:
        piece = self._pieces[i]
        if piece is None:
            piece = self._pieces[i] = self._piece_bytes(i)
        return piece

    def token_to_piece(self, i: int) -> str:
        """Text of one token for display (specials shown; partial UTF-8 shown as U+FFFD)."""
        return self.token_bytes(i).decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops control and unknown tokens."""
        dec = self.incremental_decoder(skip_special)
        return "".join(dec.push(i) for i in ids) + dec.flush()

    def incremental_decoder(self, skip_special: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special)


class IncrementalDecoder:
    """Turns a stream of token ids into text, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # llama.cpp drops the space prefix that encoding added before the first text.
        self._strip_space = tokenizer._space_prefix

    def push(self, token_id: int) -> str:
        piece = self._tok.token_bytes(token_id, self._skip)
        if self._strip_space and piece:
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Remaining text; an unfinished character at the end becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
