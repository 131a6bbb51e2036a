#!/usr/bin/env python
"""Perplexity with llama.cpp's protocol: `ktjax eval perplexity` under its old command line.

  python scripts/perplexity.py smollm2-135m /usr/share/common-licenses/Apache-2.0 --ctx 256
  (= ktjax eval perplexity /usr/share/common-licenses/Apache-2.0 --model smollm2-135m --ctx 256)
"""
import sys

from ktjax.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    model, *rest = sys.argv[1:]
    sys.exit(main(["eval", "perplexity", *rest, "--model", model]))
