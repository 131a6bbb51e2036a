"""The step and scoring programs an engine configuration can reach, named for files: what
`ktjax export` compiles and writes, and what `LLM(..., precompile=True)` compiles up front.

It follows the scheduler's shape choices (ktjax.engine.scheduler: prefill chunks ending at
multiples of a quarter of the step's token budget, one chunk beside decode rows, context
pages by page_bucket); a program outside the set (speculative verification, top log-prob
variants) still compiles on demand when a step needs it."""
from __future__ import annotations

from dataclasses import dataclass

from ktjax.engine import buckets as bk
from ktjax.engine.programs import Full, Greedy, Sampler
from ktjax.export.kinds import DEFAULT_KINDS, SAMPLER_KINDS

PENALTY_WINDOW = 64  # the engine's smallest penalty window (engine.PENALTY_WINDOW)

Key = tuple  # ("step", StepBucket, Sampler) | ("score", Bucket)


@dataclass(frozen=True)
class ProgramSpec:
    """Which programs to build for a configuration.

    batch: the most sequences that run together (rows of prefill and decode steps).
    kinds: subset of SAMPLER_KINDS: greedy steps, greedy steps with log-probabilities,
      sampling steps (penalty window `windows`), scoring programs (LLM.score).
    max_tokens: the longest sequence (prompt + generated) to plan for; None: max_model_len.
    prompt_tokens: the one prompt length to plan prefill for (a command that knows its
      prompt); None: every prompt length.
    windows: penalty windows of sampling steps (longer windows, for penalty_last_n > 64,
      compile on demand).
    """

    batch: int = 1
    kinds: tuple[str, ...] = DEFAULT_KINDS
    max_tokens: int | None = None
    prompt_tokens: int | None = None
    windows: tuple[int, ...] = (PENALTY_WINDOW,)

    def __post_init__(self):
        unknown = set(self.kinds) - set(SAMPLER_KINDS)
        if unknown:
            raise ValueError(f"unknown program kind(s) {sorted(unknown)}; "
                             f"expected some of {SAMPLER_KINDS}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")


def _samplers(kinds: tuple[str, ...], windows: tuple[int, ...]) -> list[Sampler]:
    out: list[Sampler] = []
    if "greedy" in kinds:
        out.append(Greedy(False))
    if "greedy-logprobs" in kinds:
        out.append(Greedy(True))
    if "sample" in kinds:
        out += [Full(w) for w in windows]
    return out


def _rows(choices: tuple[int, ...], most: int) -> list[int]:
    return sorted({bk.round_up(choices, r) for r in range(1, most + 1)})


def reachable(spec: ProgramSpec, max_model_len: int, page_size: int,
              max_step_tokens: int = 512) -> list[Key]:
    """Every program key a run within `spec` can ask for, in a stable order (the scheduler's
    choices: ktjax.engine.scheduler, Engine._bucket)."""
    max_pages = -(-max_model_len // page_size)
    longest = min(spec.max_tokens or max_model_len, max_model_len)
    pages = lambda cached: bk.page_bucket(-(-cached // page_size), max_pages)  # noqa: E731
    unit = max([t for t in bk.PREFILL_TOKENS if t <= max_step_tokens // 4] or
               [bk.PREFILL_TOKENS[0]])  # Scheduler.chunk_unit: chunks end at its multiples
    prompt = min(spec.prompt_tokens or longest - 1, longest - 1, max_model_len - 1)
    starts = range(0, max(prompt, 1), unit)
    if spec.prompt_tokens:
        pieces = {min(prompt - s, unit) for s in starts}
    else:
        pieces = set(range(1, min(prompt, unit) + 1))
    token_buckets = sorted({bk.round_up(bk.PREFILL_TOKENS, n) for n in pieces})
    samplers = _samplers(spec.kinds, spec.windows)
    keys: set[Key] = set()
    # a prefill step with no row finishing its prompt samples nothing: forward alone
    unfinished = {pages(s) for s in starts if s + unit < prompt}
    prefill_pages = {pages(s) for s in starts}
    for tokens in token_buckets:
        most = max(1, min(spec.batch, bk.PREFILL_ROWS[-1], max_step_tokens // tokens))
        for rows in _rows(bk.PREFILL_ROWS, most):
            for p in prefill_pages:
                bucket = bk.StepBucket(0, rows, tokens, p)
                keys.update(("step", bucket, s) for s in samplers)
                if tokens == unit and p in unfinished:
                    keys.add(("step", bucket, None))
    decode_pages = {pages(n) for n in range(0, longest, page_size)}
    for rows in _rows(bk.DECODE_ROWS, min(spec.batch, bk.DECODE_ROWS[-1])):
        for p in decode_pages:
            keys.update(("step", bk.StepBucket(rows, 0, 0, p), s) for s in samplers)
            if rows < spec.batch:  # a decode step beside one prefill chunk of another request
                for tokens in token_buckets:
                    if rows + tokens <= max_step_tokens:
                        keys.update(("step", bk.StepBucket(rows, 1, tokens, p), s)
                                    for s in samplers)
    if "score" in spec.kinds:
        chunk = bk.PREFILL_TOKENS[-1]  # Engine.score's chunks
        for start in range(0, max(longest - 1, 1), chunk):
            for tokens in {bk.round_up(bk.PREFILL_TOKENS, n)
                           for n in range(1, min(longest - 1 - start, chunk) + 1)}:
                keys.add(("score", bk.Bucket(1, tokens, pages(start), tokens)))
    return sorted(keys, key=key_name)


def sampler_name(sampler: Sampler) -> str:
    if sampler is None:
        return "logits"
    if isinstance(sampler, Greedy):
        return "greedy-logprobs" if sampler.logprobs else "greedy"
    return f"sample-w{sampler.window}"


def key_name(key: Key) -> str:
    """A file-safe name: step-D1x1-C0x0-P8-greedy, score-B1-T64-P8-R64."""
    b = key[1]
    if key[0] == "score":
        return f"score-B{b.rows}-T{b.tokens}-P{b.pages}-R{b.logit_rows}"
    shape = f"D{b.decode}x{b.verify}-C{b.chunk_rows}x{b.chunk_tokens}-P{b.pages}"
    return f"step-{shape}-{sampler_name(key[2])}"
