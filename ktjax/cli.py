"""The `ktjax` command: generate, chat, info."""
from __future__ import annotations

import argparse
import sys

from ktjax.errors import KtjaxError
from ktjax.sampling_params import SamplingParams


def _sampling_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--model", "-m", default=None,
                    help="GGUF path or catalog name (default: smollm2-135m)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--rules", default=None,
                    help="placement rules file or profile (default: by device and family)")
    ap.add_argument("--kv-cache-dtype", default=None, choices=("float32", "bfloat16", "int8"),
                    help="KV cache pages (default: the model dtype; int8 halves bfloat16's)")


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop)


def _llm(a: argparse.Namespace):
    from ktjax.api import LLM
    from ktjax.engine.config import EngineConfig
    return LLM(a.model, EngineConfig(max_model_len=a.max_model_len, rules=a.rules,
                                     kv_cache_dtype=a.kv_cache_dtype))


def cmd_generate(a: argparse.Namespace) -> None:
    params = _params(a)  # validate before the model loads
    llm = _llm(a)
    prompt = llm.chat_prompt([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a: argparse.Namespace) -> None:
    params = _params(a)
    llm = _llm(a)
    history = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for piece in llm.stream(llm.chat_prompt(history), params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(a: argparse.Namespace) -> None:
    from ktjax.models.info import describe
    print(describe(a.model_path, a.rules))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ktjax", description="Run GGUF language models with JAX.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system message")
    _sampling_args(c)
    c.set_defaults(fn=cmd_chat)
    i = sub.add_parser("info", help="architecture, parameters, quant mix, memory estimate")
    i.add_argument("model_path", metavar="MODEL", help="GGUF path or catalog name")
    i.add_argument("--rules", default=None,
                   help="placement rules file or profile: print each group's placement")
    i.set_defaults(fn=cmd_info)
    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except KtjaxError as e:
        print(f"ktjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
