"""Ahead-of-time compiled step programs, one per bucket, with JAX's persistent cache on so a
second process reuses the first one's executables."""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from ktjax.engine.buckets import Bucket
from ktjax.engine.sampler import SamplingBatch, sample, sample_greedy
from ktjax.models.base import Batch, KVCache

_CACHE_DIR = os.environ.get("KTJAX_CACHE_DIR",
                            os.path.join(os.path.expanduser("~"), ".cache", "ktjax", "xla"))


def enable_persistent_cache(path: str = _CACHE_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def batch_spec(b: Bucket) -> Batch:
    i32 = jnp.int32
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
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _scorer(forward: Callable) -> Callable:
    """forward, then the log-probability of each target token: [B, R] instead of [B, R, V]."""
    def score(params, kv, batch, targets):
        logits, kv = forward(params, kv, batch)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0], kv
    return score


class ProgramCache:
    """Compiled executables keyed by bucket: step programs (forward + KV update, KV donated),
    scoring programs (forward + target log-probs) and samplers (rows, penalty window)."""

    def __init__(self, forward: Callable, params: dict, kv: KVCache, vocab: int):
        self.vocab = vocab
        self._forward = jax.jit(forward, donate_argnums=(1,))
        self._score = jax.jit(_scorer(forward), donate_argnums=(1,))
        self._sample = jax.jit(sample)
        self._sample_greedy = jax.jit(sample_greedy, static_argnums=(1,))
        self._params_spec = _spec_of(params)
        self._kv_spec = _spec_of(kv)
        self._steps: dict[Bucket, jax.stages.Compiled] = {}
        self._scorers: dict[Bucket, jax.stages.Compiled] = {}
        self._samplers: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._greedy: dict[tuple[int, bool], jax.stages.Compiled] = {}
        self.compile_seconds = 0.0

    def step(self, bucket: Bucket):
        if bucket not in self._steps:
            self.compile([bucket])
        return self._steps[bucket]

    def scorer(self, bucket: Bucket):
        if bucket not in self._scorers:
            targets = jax.ShapeDtypeStruct((bucket.rows, bucket.logit_rows), jnp.int32)
            self._scorers[bucket] = self._timed(
                lambda: self._score.lower(self._params_spec, self._kv_spec, batch_spec(bucket),
                                          targets).compile())
        return self._scorers[bucket]

    def greedy_sampler(self, rows: int, with_logprobs: bool):
        key = (rows, with_logprobs)
        if key not in self._greedy:
            self._greedy[key] = self._timed(lambda: self._sample_greedy.lower(
                jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32), with_logprobs).compile())
        return self._greedy[key]

    def sampler(self, rows: int, window: int):
        key = (rows, window)
        if key not in self._samplers:
            self._samplers[key] = self._timed(
                lambda: self._sample.lower(jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32),
                                           sampling_spec(rows, window)).compile())
        return self._samplers[key]

    def compile(self, buckets: Iterable[Bucket]) -> None:
        """Compile the missing buckets ahead of time, with a progress bar."""
        todo = sorted(b for b in set(buckets) if b not in self._steps)
        if not todo:
            return
        bar = tqdm(todo, desc="compiling", unit="bucket", leave=False,
                   disable=os.environ.get("KTJAX_NO_PROGRESS") == "1")
        for b in bar:
            bar.set_postfix_str(str(b))
            self._steps[b] = self._timed(
                lambda: self._forward.lower(self._params_spec, self._kv_spec,
                                            batch_spec(b)).compile())

    def _timed(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.compile_seconds += time.perf_counter() - t0
        return out
