#!/usr/bin/env python
"""Perplexity with llama.cpp's protocol: a wrapper of `ktjax eval perplexity`.

  python scripts/perplexity.py smollm2-135m /usr/share/common-licenses/Apache-2.0 --ctx 256
"""
import sys

from ktjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "perplexity", *sys.argv[1:]]))
