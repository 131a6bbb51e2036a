"""Record llama.cpp's token ids for pre-tokenizer types that its tokenizer suite has no
vocabulary file of (deepseek-v3, kimi-k2, glm4, gpt-4o, tekken, ...).

Each type is tried on the suite's llama-bpe vocabulary (ggml-vocab-llama-bpe.gguf from the
llama-cpp-python sdist, see ../shared/peers/build_llamacpp.sh) with `tokenizer.ggml.pre`
rewritten to that type, so only the pre-tokenizer (and the flags llama.cpp ties to its name)
differ. `llama-tokenize` encodes every text (no BOS, specials not parsed, as the suite's
test-tokenizer-0); the ids go to tests/data/llama_vocab_pre_fixtures.json, which
tests/test_tokenizer_vocab_suite.py compares against when the vocabulary file is present.

    python scripts/make_vocab_pre_fixtures.py --llama-tokenize .peers/llama.cpp/build/bin/llama-tokenize \
        --vocab-dir .peers/llama.cpp/models
    # the MIT gpt-2 vocabulary (copied into tests/data, so CI checks these types too):
    python scripts/make_vocab_pre_fixtures.py ... --base ggml-vocab-gpt-2.gguf \
        --pre deepseek-v3 kimi-k2 glm4 gpt-4o tekken --out tests/data/llama_vocab_pre_fixtures_gpt2.json
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "llama_vocab_pre_fixtures.json"
BASE_VOCAB = "ggml-vocab-llama-bpe.gguf"
SEP = "\n__ggml_vocab_test__\n"
# One name per distinct regex set / flag combination of llama.cpp's table.
PRE_TYPES = ["deepseek-v3", "kimi-k2", "glm4", "chatglm-bpe", "gpt-4o", "tekken", "smaug-bpe",
             "bailingmoe", "seed-coder", "minicpm5", "laguna", "ufakzeka", "viking", "bloom",
             "falcon3", "grok-2"]
EXTRA_TEXTS = [
    "Café déjà vu, naïve façade — Ünïcödé ñ ß ø å Ω Ж",
    "e\u0301 (combining) vs é (precomposed), ﬁ ligature",
    "中文测试，日本語のテキスト、한국어 텍스트。",
    "汉字English混合123测试ABCdef",
    "CamelCaseWords and UPPERlower MiXeD ÀÉÎõü ΑλφαΒήτα",
    "I'm can't we'll they've she'd IT'S you're Don'T",
    "0 12 345 6789 12345678901 3.14159 -2.5e-10 1,000,000",
    "path/to/file.py\n\n\tdef f(x):\r\n        return x//2",
    "مرحبا بالعالم नमस्ते दुनिया สวัสดีชาวโลก",
    " \n\t \u00a0 nbsp \u3000 ideographic space   trailing   ",
    "!!!???... ===== ----- ***** ##### 'quoted' \"double\"",
    "emoji 🦙🤷🏽‍♀️ and 𝑥² + 𝑦² ≤ ∞",
    # texts whose ids tell the types apart on this vocabulary (case runs, Han and kana
    # runs after a space, combining marks)
    "HTTPServerError parseJSONString iPhone macOS",
    "我 爱 你 中文 测试",
    "a 中文 b 日本 語",
    " かな カタカナ ひらがな",
    "word 漢字word かなword",
    "x\u0301y\u0301 caf\u00e9\u0301",
]


def texts(vocab_dir: Path, base: str = BASE_VOCAB) -> list[str]:
    suite = (vocab_dir / (base + ".inp")).read_text(encoding="utf-8").split(SEP)
    return suite + EXTRA_TEXTS


def with_pre(src: Path, pre: str, dst: Path) -> None:
    """A copy of a vocabulary-only GGUF file with tokenizer.ggml.pre set to `pre`."""
    data = src.read_bytes()
    key = b"tokenizer.ggml.pre"
    at = data.index(struct.pack("<Q", len(key)) + key)
    start = at + 8 + len(key) + 4                     # past the key and its value type
    (old_len,) = struct.unpack_from("<Q", data, start)
    value = pre.encode()
    dst.write_bytes(data[:start] + struct.pack("<Q", len(value)) + value +
                    data[start + 8 + old_len:])


def tokenize(binary: str, model: Path, text: str) -> list[int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as f:
        f.write(text.encode())
        f.flush()
        out = subprocess.run([binary, "-m", str(model), "-f", f.name, "--ids", "--log-disable",
                              "--no-bos", "--no-parse-special"],
                             capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("[")]
    if len(lines) != 1:
        raise RuntimeError(f"unexpected llama-tokenize output for {text!r}: {out!r}")
    return json.loads(lines[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-tokenize", required=True)
    ap.add_argument("--vocab-dir", type=Path, required=True)
    ap.add_argument("--base", default=BASE_VOCAB, help="the suite's vocabulary file to rewrite")
    ap.add_argument("--pre", nargs="*", default=PRE_TYPES, help="the types to record")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args()
    cases = texts(args.vocab_dir, args.base)
    out = {"base_vocab": args.base, "texts": cases, "ids": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in args.pre:
            model = Path(tmp) / f"{pre}.gguf"
            with_pre(args.vocab_dir / args.base, pre, model)
            out["ids"][pre] = [tokenize(args.llama_tokenize, model, t) for t in cases]
            print(pre, "done", flush=True)
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n")


if __name__ == "__main__":
    main()
