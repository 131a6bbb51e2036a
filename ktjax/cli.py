"""The `ktjax` command.

Each subcommand is one `add_NAME(sub)` function, which declares its arguments and sets
`fn` to the function that runs it; main() builds the parser from COMMANDS. Status lines
(loading, progress bars) go to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata

from ktjax import __version__
from ktjax.errors import KtjaxError
from ktjax import progress
from ktjax.progress import StreamWriter
from ktjax.export import cli as export_cli
from ktjax.sampling_params import SamplingParams

# The command line samples as llama.cpp's tools do by default; the Python API's
# SamplingParams() follows vLLM (temperature 1, no filters). README.md says both.
CLI_SAMPLING = dict(max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)

EPILOG = """\
first steps:
  ktjax generate "The three primary colors are"      # the default model, smollm2-135m
  ktjax chat                                          # type a message, /exit to leave
  ktjax models                                        # models you can name with --model
  ktjax info smollm2-135m                             # what a model is and what it needs
  ktjax batch requests.jsonl -o results.jsonl         # many prompts, continuously batched
  ktjax eval choices questions.jsonl                  # multiple-choice accuracy

Run `ktjax COMMAND --help` for a command's options."""


# ---- shared arguments -------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; wider option column."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)


def _model_args(ap: argparse.ArgumentParser, precompile: bool = False) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, metavar="MODEL",
                   help="GGUF file or catalog name, see `ktjax models` "
                        "(default: smollm2-135m)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length in tokens (default: the model's, at most 4096)")
    g.add_argument("--rules", default=None, metavar="RULES",
                   help="placement rules: a YAML file or a profile from `ktjax rules` "
                        "(default: cpu on a CPU, the family's profile on a GPU)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no status lines or progress bars on stderr")
    _engine_args(g)
    export_cli.add_warm_args(ap, precompile_default=precompile)


# EngineConfig fields the commands set, besides the model options above
ENGINE_OPTIONS = ("kv_cache_dtype", "max_step_tokens", "speculative", "spec_tokens",
                  "prefix_caching")


def _engine_args(g) -> None:
    g.add_argument("--kv-cache-dtype", default=None, choices=("float32", "bfloat16", "int8"),
                   help="KV cache pages (default: the model dtype; int8 halves bfloat16's)")
    g.add_argument("--max-step-tokens", type=int, default=None, metavar="N",
                   help="new tokens per engine step: running decodes first, prefill chunks "
                        "fill the rest (default: 512)")
    g.add_argument("--speculative", default=None, metavar="DRAFT",
                   help="speculative decoding: `ngram` (prompt lookup) or a smaller GGUF with "
                        "the same vocabulary (default: off)")
    g.add_argument("--spec-tokens", type=int, default=None, metavar="K",
                   help="draft tokens verified per step with --speculative (default: 4)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   default=None, help="do not share the KV pages of equal prompt prefixes")


def _engine_settings(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ENGINE_OPTIONS if getattr(a, k, None) is not None}


def _sampling_args(ap: argparse.ArgumentParser) -> None:
    d = CLI_SAMPLING
    g = ap.add_argument_group("sampling (defaults as llama.cpp's)")
    g.add_argument("--max-tokens", "-n", type=int, default=d["max_tokens"], metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", "-t", type=float, default=d["temperature"], metavar="T",
                   help="randomness; 0 = greedy, always the likeliest token "
                        "(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d["top_k"], metavar="K",
                   help="sample among the K likeliest tokens; 0 = all (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d["top_p"], metavar="P",
                   help="sample among the likeliest tokens whose probabilities sum to P; "
                        "1 = all (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=d["min_p"], metavar="P",
                   help="drop tokens less likely than P times the likeliest; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"],
                   metavar="X", help="penalize tokens among the last 64: positive logits "
                                     "divided by X, negative ones multiplied; 1 = off "
                                     "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=d["presence_penalty"],
                   metavar="X", help="subtract X from the logits of tokens in the last 64; "
                                     "0 = off (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=d["frequency_penalty"],
                   metavar="X", help="subtract X per occurrence in the last 64 tokens; "
                                     "0 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed: the same seed and settings give the same text "
                        "(default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the reply at TEXT (repeatable; default: only the model's "
                        "end-of-turn tokens)")


def _chat_template_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                    help="Jinja chat template file, or chatml / gemma, for a model whose file "
                         "has none (default: the model's own)")


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop)


def _status(a: argparse.Namespace, text: str) -> None:
    if not a.quiet:
        print(f"ktjax: {text}", file=sys.stderr, flush=True)


def _model_path(a: argparse.Namespace) -> str:
    from ktjax.models.catalog import resolve_model
    return resolve_model(a.model)


def _llm(a: argparse.Namespace, path: str | None = None, **config):
    """The model of `--model`, with a status line before and after loading (5-6 s for the
    default model on a small CPU, most of it JAX's start-up and weight repacking)."""
    path = path or _model_path(a)
    size = os.path.getsize(path) / 2 ** 30 if os.path.isfile(path) else 0.0
    _status(a, f"loading {os.path.basename(path)} ({size:.2f} GiB)")
    t0 = time.perf_counter()
    from ktjax.api import LLM
    # options, not a whole EngineConfig: with --artifacts, unset fields take the artifacts'
    settings = {k: v for k, v in (("max_model_len", getattr(a, "max_model_len", None)),
                                  ("rules", getattr(a, "rules", None))) if v is not None}
    settings.update(_engine_settings(a))
    settings.update(config)
    warm = export_cli.warm_options(a) if hasattr(a, "artifacts") else {}
    llm = LLM(path, **settings, **warm)
    ec = llm.engine_config
    _status(a, f"loaded in {time.perf_counter() - t0:.1f} s: {llm.config.architecture}, "
               f"context {ec.max_model_len}, {ec.device.platform}")
    return llm


def _chat_template(a: argparse.Namespace, path: str) -> str | None:
    """The template to render chats with: --chat-template, else None for the model's own. A
    model file without one is refused (before loading it): such files are base models, which
    answer junk to a chat format they were not trained on."""
    from ktjax.gguf.chat import CHATML_TEMPLATE, GEMMA_TEMPLATE
    from ktjax.gguf.reader import GGUFFile
    given = a.chat_template
    if given in ("chatml", "gemma"):
        return CHATML_TEMPLATE if given == "chatml" else GEMMA_TEMPLATE
    if given:
        try:
            with open(given, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise KtjaxError(f"cannot read the chat template {given}: {e.strerror}") from e
    if GGUFFile(path).metadata.get("tokenizer.chat_template") is None:
        raise KtjaxError(
            f"{os.path.basename(path)} has no chat template: it is probably a base model, not "
            "tuned for chat. Run without --chat (plain text continuation), or give one with "
            "--chat-template FILE|chatml|gemma")
    return None


def _stream(llm, prompt, params: SamplingParams, writer: StreamWriter) -> str:
    pieces = []
    for piece in llm.stream(prompt, params):
        pieces.append(piece)
        writer.write(piece)
    writer.write("\n")
    return "".join(pieces)


# ---- generate ---------------------------------------------------------------------------------
def cmd_generate(a: argparse.Namespace) -> None:
    params = _params(a)  # validate before the model loads
    path = _model_path(a)
    template = _chat_template(a, path) if a.chat else None
    llm = _llm(a, path)
    if a.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": a.prompt}], template)
    else:
        prompt = a.prompt
    if a.precompile:
        export_cli.precompile_generate(llm, llm._encode(prompt), params)
    _stream(llm, prompt, params, StreamWriter())


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       formatter_class=_Formatter,
                       description="Continue PROMPT (or, with --chat, answer it as a chat "
                                   "message) and stream the text to stdout.")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue (quote it)")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message in the model's chat template")
    _chat_template_arg(p)
    _model_args(p, precompile=True)
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)


# ---- chat -------------------------------------------------------------------------------------
def cmd_chat(a: argparse.Namespace) -> None:
    params = _params(a)
    path = _model_path(a)
    template = _chat_template(a, path)
    llm = _llm(a, path)
    if a.precompile:
        export_cli.precompile_chat(llm, params)
    history = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    writer = StreamWriter()
    _status(a, "type a message and press Enter; /exit (or Ctrl-D) leaves")
    while True:
        if interactive:
            writer.write("> ")
        line = sys.stdin.readline()
        writer.at_line_start()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = _stream(llm, llm.chat_prompt(history, template), params, writer)
        history.append({"role": "assistant", "content": reply})


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat (one line per message; /exit leaves)",
                       formatter_class=_Formatter,
                       description="Chat with the model: each line read from stdin is a user "
                                   "message, the reply is streamed. /exit, /quit or Ctrl-D "
                                   "leaves.")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    _chat_template_arg(p)
    _model_args(p)
    _sampling_args(p)
    p.set_defaults(fn=cmd_chat)


# ---- batch ------------------------------------------------------------------------------------
def cmd_batch(a: argparse.Namespace) -> None:
    from ktjax.evaluate.batch import run_batch
    params = _params(a)
    path = _model_path(a)
    try:
        template, refusal = _chat_template(a, path), None
    except KtjaxError as e:   # only requests with messages need a template
        template, refusal = None, e
    llm = _llm(a, path)

    def chat_prompt(messages: list[dict]) -> list[int]:
        if refusal:
            raise refusal
        return llm.chat_prompt(messages, template)

    s = run_batch(llm, a.input, a.output, params, progress=progress.bars_enabled(),
                  chat_prompt=chat_prompt)
    print(f"{s.done} result(s) written to {a.output} ({s.errors} error(s), {s.skipped} "
          f"already there) in {s.seconds:.1f} s: {s.done / max(s.seconds, 1e-9):.2f} req/s, "
          f"{s.completion_tokens / max(s.seconds, 1e-9):.1f} tok/s")


def add_batch(sub) -> None:
    p = sub.add_parser("batch", help="run a JSONL file of requests, results to a JSONL file",
                       formatter_class=_Formatter,
                       description="Run every request of INPUT through continuous batching and "
                                   "write one result line per request, in input order, to "
                                   "OUTPUT. A request line: {\"id\": ..., \"prompt\": \"...\"} "
                                   "or {\"messages\": [{\"role\": \"user\", \"content\": "
                                   "\"...\"}]}, with any SamplingParams field (max_tokens, "
                                   "temperature, ...) overriding the options below. A result: "
                                   "{\"id\", \"text\", \"finish_reason\", \"prompt_tokens\", "
                                   "\"completion_tokens\"} or {\"id\", \"error\"}. Run again to "
                                   "resume: ids already in OUTPUT are skipped.")
    p.add_argument("input", metavar="INPUT", help="JSONL file of requests")
    p.add_argument("--output", "-o", required=True, metavar="OUTPUT",
                   help="JSONL file of results (appended to)")
    _chat_template_arg(p)
    _model_args(p)
    _sampling_args(p)
    p.set_defaults(fn=cmd_batch)


# ---- eval -------------------------------------------------------------------------------------
def cmd_eval_choices(a: argparse.Namespace) -> None:
    import json

    from tqdm.auto import tqdm

    from ktjax.evaluate.choices import evaluate
    from ktjax.evaluate.formats import read_items
    items = read_items(a.file, a.format, a.limit)
    llm = _llm(a)
    with tqdm(total=sum(len(i.choices) for i in items), unit="seq", desc="scoring",
              disable=not progress.bars_enabled(), file=sys.stderr) as bar:
        report = evaluate(llm, items, a.delimiter, bar.update)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            for r in report.items:
                f.write(json.dumps({"id": r.id, "gold": r.gold, "pred": r.pred,
                                    "pred_norm": r.pred_norm, "loglik": r.loglik}) + "\n")
    n = len(report.items)
    print(f"{n} items, {report.continuations} continuations in {report.seconds:.1f} s "
          f"({report.continuations / max(report.seconds, 1e-9):.1f} seq/s)")
    print(f"acc       {report.acc:.4f} ± {report.stderr(report.acc):.4f}")
    print(f"acc_norm  {report.acc_norm:.4f} ± {report.stderr(report.acc_norm):.4f}")


def cmd_eval_perplexity(a: argparse.Namespace) -> None:
    from ktjax.evaluate.perplexity import perplexity
    try:
        with open(a.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KtjaxError(f"cannot read {a.file}: {e.strerror}") from e
    exact = dict(host_linears=False, dtype="float32") if a.all_device else {}
    llm = _llm(a, max_model_len=a.ctx + 1, kv_cache_tokens=a.ctx + 16, **exact)
    t0 = time.perf_counter()
    ppl, n = perplexity(llm, text, a.ctx, a.chunks,
                        on_chunk=lambda i, p: print(f"[{i}] {p:.4f}", flush=True))
    print(f"{n} chunks of {a.ctx} tokens in {time.perf_counter() - t0:.1f} s")
    print(f"PPL = {ppl:.4f}")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: multiple-choice accuracy, perplexity",
                       formatter_class=_Formatter)
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="{choices,perplexity}")
    c = kinds.add_parser("choices", formatter_class=_Formatter,
                         help="multiple-choice accuracy by log-likelihood (acc, acc_norm)",
                         description="Score each choice as the continuation of its context "
                                     "and report acc (highest log-likelihood is gold) and "
                                     "acc_norm (highest log-likelihood per character), as "
                                     "lm-evaluation-harness does. FILE: JSONL of {\"context\", "
                                     "\"choices\": [...], \"gold\": index}, or HellaSwag / ARC / "
                                     "MMLU records with --format.")
    c.add_argument("file", metavar="FILE", help="JSONL file (MMLU: also its CSV files)")
    c.add_argument("--format", default="choices",
                   choices=("choices", "hellaswag", "arc", "mmlu"),
                   help="record format; hellaswag, arc and mmlu build lm-evaluation-harness's "
                        "prompts (default: %(default)s)")
    c.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N items only")
    c.add_argument("--delimiter", default=" ",
                   help="text between context and choice (default: one space)")
    c.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write each item's log-likelihoods and predictions (JSONL)")
    _model_args(c)
    c.set_defaults(fn=cmd_eval_choices)
    q = kinds.add_parser("perplexity", formatter_class=_Formatter,
                         help="perplexity of a text file, with llama-perplexity's protocol",
                         description="Perplexity of FILE as llama.cpp's llama-perplexity "
                                     "computes it: chunks of --ctx tokens, each starting with "
                                     "BOS, scoring the second half of each chunk.")
    q.add_argument("file", metavar="FILE", help="UTF-8 text file")
    q.add_argument("--ctx", type=int, default=512,
                   help="tokens per chunk (llama-perplexity -c; default: %(default)s)")
    q.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="score at most N chunks (default: all)")
    q.add_argument("--all-device", action="store_true",
                   help="every weight in XLA in float32 (no host kernels, no int8 "
                        "activations): the model's own numbers, to compare with llama.cpp")
    _model_args(q)
    q.set_defaults(fn=cmd_eval_perplexity)


# ---- info, models, rules ----------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> None:
    from ktjax.models.info import describe
    print(describe(a.model_path, a.rules))


def add_info(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, quant mix, memory estimate",
                       formatter_class=_Formatter)
    p.add_argument("model_path", metavar="MODEL", help="GGUF file or catalog name")
    p.add_argument("--rules", default=None, metavar="RULES",
                   help="placement rules file or profile (`ktjax rules`): print where each "
                        "group of tensors goes and the memory each device needs")
    p.set_defaults(fn=cmd_info)


def cmd_models(a: argparse.Namespace) -> None:
    from ktjax.models.catalog import DEFAULT_MODEL, ENTRIES
    for e in ENTRIES:
        state = "installed" if e.installed else f"not installed: {e.install}"
        default = " [default]" if e.name == DEFAULT_MODEL else ""
        print(f"{e.name:<14} {e.about}{default}\n{'':<14} {state}")
    print("Any GGUF file works too: --model path/to/model.gguf")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="models you can name with --model (the catalog)")
    p.set_defaults(fn=cmd_models)


def cmd_rules(a: argparse.Namespace) -> None:
    import textwrap

    from ktjax.rules import profiles
    for name, about in profiles():
        print(textwrap.fill(f"{name:<10} {about}", 92, subsequent_indent=" " * 11))
    print("Use one with --rules NAME, or write your own YAML file (see rules/cpu.yaml).")


def add_rules(sub) -> None:
    p = sub.add_parser("rules", help="placement rule profiles for --rules")
    p.set_defaults(fn=cmd_rules)


def cmd_serve(a: argparse.Namespace) -> None:
    from ktjax.server.app import serve
    serve(a.model_path, host=a.host, port=a.port, api_key=a.api_key or None,
          model_name=a.served_model_name, max_model_len=a.max_model_len,
          kv_cache_tokens=a.kv_cache_tokens, rules=a.rules, **_engine_settings(a))


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (pip install ktjax[serve])",
                       formatter_class=_Formatter)
    s.add_argument("model_path", metavar="MODEL", nargs="?", default=None,
                   help="GGUF path or catalog name (default: smollm2-135m)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--api-key", default=os.environ.get("KTJAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $KTJAX_API_KEY)")
    s.add_argument("--served-model-name", default=None,
                   help="the `model` clients send (default: catalog name or file name)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="context length per request (default: the engine's)")
    s.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool size in tokens, shared by all requests (default: the engine's)")
    s.add_argument("--rules", default=None, help="placement rules file or profile")
    _engine_args(s)
    s.set_defaults(fn=cmd_serve)


COMMANDS = [add_generate, add_chat, add_batch, add_eval, add_info, add_models, add_rules,
            add_serve, export_cli.add_export_parser]


def _version() -> str:
    try:
        jax = f"jax {metadata.version('jax')}, jaxlib {metadata.version('jaxlib')}"
    except metadata.PackageNotFoundError:
        jax = "jax not installed"
    return f"ktjax {__version__} ({jax}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ktjax", formatter_class=_Formatter, epilog=EPILOG,
                                 description="Run GGUF language models with JAX.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if getattr(a, "quiet", False):
        os.environ["KTJAX_NO_PROGRESS"] = "1"
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
