"""Ahead-of-time compiled step programs, one per (bucket, sampler), with JAX's persistent cache
on so a second process reuses the first one's executables."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import jax
import jax.numpy as jnp

from ktjax import progress
from ktjax.engine.buckets import Bucket, StepBucket
from ktjax.engine.sampler import SamplingBatch, sample, sample_greedy, top_alternatives
from ktjax.engine.spec_decode import verify_sample
from ktjax.models.base import Batch, KVCache

_CACHE_DIR = os.environ.get("KTJAX_CACHE_DIR",
                            os.path.join(os.path.expanduser("~"), ".cache", "ktjax", "xla"))


def enable_persistent_cache(path: str = _CACHE_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX's extra XLA caches (GPU autotuning, kernels) put the absolute cache path into the
    # compile options that feed the cache key: a cache moved to another folder or home then
    # misses every entry (docs/kernel-notes.md, "Export and warm reload").
    try:
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    except AttributeError:  # a JAX without the option writes no path into the key
        pass


def batch_spec(b: Bucket | StepBucket) -> Batch:
    i32 = jnp.int32
    if isinstance(b, StepBucket):
        flat = jax.ShapeDtypeStruct((1, b.tokens), i32)
        return Batch(tokens=flat, positions=flat, slots=flat,
                     block_tables=jax.ShapeDtypeStruct((b.rows, b.pages), i32),
                     cache_lens=jax.ShapeDtypeStruct((b.rows,), i32),
                     logits_index=jax.ShapeDtypeStruct((1, b.logit_rows), i32),
                     segments=b.segments)
    return Batch(tokens=jax.ShapeDtypeStruct((b.rows, b.tokens), i32),
                 positions=jax.ShapeDtypeStruct((b.rows, b.tokens), i32),
                 slots=jax.ShapeDtypeStruct((b.rows, b.tokens), i32),
                 block_tables=jax.ShapeDtypeStruct((b.rows, b.pages), i32),
                 cache_lens=jax.ShapeDtypeStruct((b.rows,), i32),
                 logits_index=jax.ShapeDtypeStruct((b.rows, b.logit_rows), i32))


def sampling_spec(rows: int, window: int) -> SamplingBatch:
    f32, i32 = jnp.float32, jnp.int32
    vec = lambda dt: jax.ShapeDtypeStruct((rows,), dt)  # noqa: E731
    return SamplingBatch(temperature=vec(f32), top_k=vec(i32), top_p=vec(f32), min_p=vec(f32),
                         repetition_penalty=vec(f32), presence_penalty=vec(f32),
                         frequency_penalty=vec(f32),
                         seed=jax.ShapeDtypeStruct((rows, 2), jnp.uint32), step=vec(i32),
                         recent=jax.ShapeDtypeStruct((rows, window), i32))


def _spec_of(tree):
    """Shapes, dtypes and placements of a tree of arrays: a program lowered from them is
    built for the arrays' device, not JAX's default backend (an engine on the CPU of a GPU
    host would otherwise compile its host-only FFI calls for CUDA)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


def _placed(tree, sharding):
    """Every ShapeDtypeStruct of `tree` that has no sharding given `sharding`."""
    def put(s):
        if isinstance(s, jax.ShapeDtypeStruct) and s.sharding is None:
            return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
        return s
    return jax.tree.map(put, tree, is_leaf=lambda n: isinstance(n, jax.ShapeDtypeStruct))


@dataclass(frozen=True)
class Greedy:
    """Fused argmax; the log-softmax pass over the vocabulary only when `logprobs`; `top` > 0
    also returns each row's `top` most likely tokens (ids, log-probs)."""

    logprobs: bool
    top: int = 0


@dataclass(frozen=True)
class Full:
    """Fused `sample` with a SamplingBatch operand whose penalty window is `window` tokens;
    `top` as Greedy's."""

    window: int
    top: int = 0


@dataclass(frozen=True)
class Verify:
    """`Full`'s sample of every logit row, plus the speculative-decoding rejection rule
    against one draft token per logit row (spec_decode.verify_sample); `draft_probs`: the
    drafter's distributions [R, V] are an operand (a draft model), else drafts are certain
    (prompt lookup)."""

    window: int
    draft_probs: bool = False


# What a step program does after forward: None returns the logits (a step that samples no
# row, e.g. a prefill chunk that completes no prompt).
Sampler = Greedy | Full | Verify | None


def _sampled_rows(logits: jax.Array, batch: Batch) -> jax.Array:
    """[rows, V]: each row's first logit row, or every logit row of a packed step."""
    return logits[0] if batch.segments is not None else logits[:, 0]


def _scorer(forward: Callable) -> Callable:
    """forward, then the log-probability of each target token and the most likely token
    (lm-evaluation-harness' is_greedy; agreement between programs): [B, R] each instead of
    [B, R, V]."""
    def score(params, kv, batch, targets):
        logits, kv = forward(params, kv, batch)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return target_logprobs, jnp.argmax(logits, axis=-1).astype(jnp.int32), kv
    return score


def _greedy_step(forward: Callable) -> Callable:
    """forward, then sample_greedy of each row's first logit row, in one executable: the
    logits never leave it and the step is one dispatch."""
    def step(params, kv, batch, with_logprobs, top):
        logits, kv = forward(params, kv, batch)
        rows = _sampled_rows(logits, batch)
        top_ = top_alternatives(rows, top) if top else ()
        return *sample_greedy(rows, with_logprobs), *top_, kv
    return step


def _full_step(forward: Callable) -> Callable:
    """forward, then sample of each row's first logit row, in one executable."""
    def step(params, kv, batch, sb, top):
        logits, kv = forward(params, kv, batch)
        rows = _sampled_rows(logits, batch)
        top_ = top_alternatives(rows, top) if top else ()
        return *sample(rows, sb), *top_, kv
    return step


def _verify_step(forward: Callable) -> Callable:
    """forward, then sample and the rejection rule of every logit row, in one executable."""
    def step(params, kv, batch, sb, draft, draft_probs=None):
        logits, kv = forward(params, kv, batch)
        rows = _sampled_rows(logits, batch)
        return (*sample(rows, sb), verify_sample(rows, sb, draft, draft_probs), kv)
    return step


def tqdm(*args, **kwargs):
    """tqdm.auto's bar, imported when a compile first needs one (a start from artifacts
    compiles nothing)."""
    from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)


class ProgramSource(Protocol):
    """Executables made elsewhere (ktjax.export's artifacts), by key: ("step", bucket,
    sampler) | ("score", bucket)."""

    def __call__(self, key: tuple) -> jax.stages.Compiled | None:
        """The executable, or None when this source lacks it (it is then compiled)."""

    def holds(self, key: tuple) -> bool:
        """Whether __call__ would give an executable for `key`."""


class ProgramCache:
    """Compiled executables: step programs keyed by (bucket, sampler) (forward + KV update,
    then the sampler's (tokens [B], logprobs [B]) or, with no sampler, the logits; KV
    donated) and scoring programs keyed by bucket (forward + target log-probs)."""

    def __init__(self, forward: Callable, params: dict, kv: KVCache, vocab: int):
        self.vocab = vocab
        self._forward = jax.jit(forward, donate_argnums=(1,))
        self._greedy = jax.jit(_greedy_step(forward), donate_argnums=(1,), static_argnums=(3, 4))
        self._full = jax.jit(_full_step(forward), donate_argnums=(1,), static_argnums=(4,))
        self._verify = jax.jit(_verify_step(forward), donate_argnums=(1,))
        self._score = jax.jit(_scorer(forward), donate_argnums=(1,))
        self._params_spec = _spec_of(params)
        self._kv_spec = _spec_of(kv)
        # the step's other operands (batch, sampling) go where the KV cache lives
        self._sharding = jax.tree.leaves(kv)[0].sharding
        self._steps: dict[tuple[Bucket | StepBucket, Sampler], jax.stages.Compiled] = {}
        self._scorers: dict[Bucket, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self.compiles = 0
        # Where executables come from before compiling (ktjax.export: loaded artifacts).
        self.source: ProgramSource | None = None

    def sourced(self, key: tuple) -> bool:
        """Whether the source holds the program of `key` (it loads without compiling)."""
        return self.source is not None and self.source.holds(key)

    @property
    def n_step_programs(self) -> int:
        """Step programs compiled so far (the bucket set bounds them)."""
        return len(self._steps)

    def step(self, bucket: Bucket | StepBucket, sampler: Sampler = None
             ) -> jax.stages.Compiled:
        """(params, kv, batch[, SamplingBatch for Full]) -> (tokens, logprobs[, top ids,
        top logprobs when sampler.top], kv), or (logits, kv) with no sampler; Verify: (params,
        kv, batch, SamplingBatch, draft[, draft_probs]) -> (tokens, logprobs, Verdict, kv)."""
        if (bucket, sampler) not in self._steps:
            if self.sourced(("step", bucket, sampler)):   # a load: no compile bar
                self._steps[bucket, sampler] = self._load_or_compile(("step", bucket, sampler))
            else:
                self.compile([(bucket, sampler)])
        return self._steps[bucket, sampler]

    def scorer(self, bucket: Bucket) -> jax.stages.Compiled:
        if bucket not in self._scorers:
            self._scorers[bucket] = self._load_or_compile(("score", bucket))
        return self._scorers[bucket]

    def compile(self, steps: Iterable[tuple[Bucket | StepBucket, Sampler]]) -> None:
        """Compile the missing (bucket, sampler) step programs ahead of time, with a
        progress bar."""
        todo = sorted(set(steps) - self._steps.keys(), key=lambda k: (str(k[0]), repr(k[1])))
        if not todo:
            return
        bar = tqdm(todo, desc="compiling", unit="bucket", leave=False,
                   disable=not progress.bars_enabled())
        for bucket, sampler in bar:
            bar.set_postfix_str(f"{bucket} {sampler}")
            self._steps[bucket, sampler] = self._load_or_compile(("step", bucket, sampler))

    def lower_args(self, key: tuple) -> tuple:
        """Argument specs of the program of `key` (static arguments left out), each placed
        on the engine's device."""
        return _placed(self._unplaced_args(key), self._sharding)

    def _unplaced_args(self, key: tuple) -> tuple:
        bucket = key[1]
        args = (self._params_spec, self._kv_spec, batch_spec(bucket))
        if key[0] == "score":
            return (*args, jax.ShapeDtypeStruct((bucket.rows, bucket.logit_rows), jnp.int32))
        sampler = key[2]
        rows = bucket.logit_rows if isinstance(bucket, StepBucket) else bucket.rows
        if isinstance(sampler, Verify):
            draft = jax.ShapeDtypeStruct((rows,), jnp.int32)
            probs = (jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32),) \
                if sampler.draft_probs else ()
            return (*args, sampling_spec(rows, sampler.window), draft, *probs)
        if isinstance(sampler, Full):
            return (*args, sampling_spec(rows, sampler.window))
        return args

    def lower(self, key: tuple) -> jax.stages.Lowered:
        """The program of `key`: ("step", bucket, sampler) or ("score", bucket)."""
        args = self.lower_args(key)
        if key[0] == "score":
            return self._score.lower(*args)
        sampler = key[2]
        if sampler is None:
            return self._forward.lower(*args)
        if isinstance(sampler, Greedy):
            return self._greedy.lower(*args, sampler.logprobs, sampler.top)
        if isinstance(sampler, Verify):
            return self._verify.lower(*args)
        return self._full.lower(*args, sampler.top)

    def _load_or_compile(self, key: tuple) -> jax.stages.Compiled:
        compiled = self.source(key) if self.source is not None else None
        if compiled is not None:
            return compiled
        t0 = time.perf_counter()
        compiled = self.lower(key).compile()
        self.compile_seconds += time.perf_counter() - t0
        self.compiles += 1
        return compiled
