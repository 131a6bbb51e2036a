"""Worker of tests/test_fuzz_gguf.py: loads GGUF files named one per line on stdin with
ktjax.LLM and answers each with one JSON line on stdout: {"outcome": "ok" | "error" |
"untyped", "error": type name, "message": ...}. It runs many cases in one process (one
python + jax start for all); the test restarts it when a case kills it."""
from __future__ import annotations

import faulthandler
import json
import sys
import traceback

from ktjax import LLM
from ktjax.errors import KtjaxError


def load(path: str) -> dict:
    try:
        # LLM's construction parses, checks, packs every host weight and sizes the engine;
        # nothing is compiled before the first request.
        llm = LLM(path, max_model_len=64, kv_cache_tokens=256)
        del llm
    except KtjaxError as e:
        return {"outcome": "error", "error": type(e).__name__, "message": str(e)[:500]}
    except Exception as e:  # noqa: BLE001 - any other type is what the fuzz test reports
        return {"outcome": "untyped", "error": type(e).__name__,
                "message": "".join(traceback.format_exception(e))[-3000:]}
    return {"outcome": "ok"}


def main() -> None:
    faulthandler.enable()  # a fatal signal prints the Python stack to stderr (kept by the test)
    print(json.dumps({"outcome": "ready"}), flush=True)
    for line in sys.stdin:
        print(json.dumps(load(line.strip())), flush=True)


if __name__ == "__main__":
    main()
