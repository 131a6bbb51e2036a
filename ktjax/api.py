"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, `.stream`, `.chat`."""
from __future__ import annotations

import os
import threading
import weakref
from typing import Iterator, Sequence

import numpy as np

from ktjax import rules as placement_rules
from ktjax.engine.config import EngineConfig
from ktjax.engine.drafters import make_drafter
from ktjax.engine.engine import Engine
from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.programs import enable_persistent_cache
from ktjax.errors import KtjaxError, RequestError
from ktjax.export import warm
from ktjax.export.program_set import ProgramSpec
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import get_backend
from ktjax.models import loader
from ktjax.models.catalog import resolve_model
from ktjax.outputs import RequestOutput
from ktjax.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def _file_identity(path: str | os.PathLike) -> bytes:
    """The model file as the prefix cache's keys see it: path, size and modification time."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()


class LLM:
    """A loaded model with its engine.

    model: a GGUF path, a catalog name ('smollm2-135m', 'gemma3-270m') or None for the default.
    config: an EngineConfig (context, KV pool, dtype, attention, placement rules, device);
      keyword arguments set its fields (`LLM(path, max_model_len=512, rules="cpu")`).
    artifacts: a folder `ktjax export` wrote: packed weights and compiled programs are loaded
      from it (its engine settings are the defaults); artifacts made for another model,
      rules, settings, software or machine raise ArtifactMismatchError naming the fields,
      or with fallback="compile" warn and load and compile as without them. A program
      the folder lacks compiles when first needed (logged on "ktjax.export").
    precompile: compile (or load) every program a ProgramSpec reaches now (True: one
      sequence at a time, greedy and sampled), so none compiles mid-stream.

    One LLM may be shared by threads: its calls are serialized (generate() holds the engine
    for the whole call, stream() for each step), so they wait for each other. An exception or
    Ctrl-C inside a call ends that call's requests and leaves the LLM usable.
    """

    def __init__(self, model: str | os.PathLike | None = None,
                 config: EngineConfig | None = None, *,
                 artifacts: str | os.PathLike | None = None, fallback: str = "error",
                 precompile: bool | ProgramSpec = False, **options):
        enable_persistent_cache()
        self.artifacts = warm.open_artifacts(artifacts, fallback)
        self.model_path = resolve_model(model)
        gguf_file = GGUFFile(self.model_path)
        self.spec = loader.inspect(gguf_file)
        self.config = self.spec.config
        self.tokenizer = warm.tokenizer(self.artifacts, fallback, gguf_file)
        self.engine_config = warm.engine_config(self.artifacts, config, options).resolve(
            self.config.context_length)
        ec = self.engine_config
        # The rules check refuses host placement outside CPU and CUDA programs (naming the rule).
        self.rules_file = placement_rules.rules_for(self.config.architecture, ec.device.platform,
                                                    ec.rules, ec.host_linears)
        self.placement = placement_rules.place(gguf_file, self.spec.table, self.config.n_layers,
                                               self.rules_file, ec.device.platform)
        params, self.artifacts = warm.load_params(self.artifacts, fallback, gguf_file, self.spec,
                                                  self.placement, self.rules_file, ec)
        weakref.finalize(self, loader.release_host_weights, params)
        backend = get_backend(ec.attention, ec.device.platform, ec.kv_cache_dtype)
        forward = self.spec.family.make_forward(self.config, backend)
        self.engine = Engine(forward, params, cache=self.config.cache_spec,
                             vocab_size=self.config.vocab_size, tokenizer=self.tokenizer,
                             config=ec, identity=_file_identity(self.model_path),
                             drafter=make_drafter(ec, self.config.vocab_size))
        warm.attach(self.engine.programs, self.artifacts, ec, precompile)
        # One caller drives the engine at a time: generate/stream/score here, or the engine
        # loop thread behind submit() between its steps. Not reentrant: a stream closed by the
        # garbage collector inside a call only requests its abort (Engine.request_abort)
        # instead of changing the engine mid-step.
        self._lock = threading.Lock()
        self._engine_loop = None

    # ---- concurrent submission -------------------------------------------------------------
    def engine_loop(self):
        """The thread that steps the engine for submit() and AsyncLLM (started on first use)."""
        from ktjax.serving.engine_loop import EngineLoop
        with self._lock:
            if self._engine_loop is None:
                self._engine_loop = EngineLoop(self.engine, self._lock)
            return self._engine_loop

    def submit(self, prompt: Prompt, params: SamplingParams | None = None):
        """Queue one request from any thread and return its RequestHandle at once: iterate it
        for Deltas (new token ids, text, finish_reason), `.result()` for the RequestOutput,
        `.abort()` to end it. Requests submitted together share the engine's steps."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be SamplingParams")
        return self.engine_loop().submit(self._encode(prompt), params,
                                         prompt if isinstance(prompt, str) else None)

    # ---- generation -------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for all prompts together (one batch); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        params = list(params) if isinstance(params, (list, tuple)) else \
            [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError("params must be SamplingParams")
        with self._lock:
            encoded = [self._encode(p) for p in prompts]
            for ids, p in zip(encoded, params):
                self.engine.validate(ids, p)  # reject bad requests before any work starts
            seqs = []
            try:
                with deferred_interrupts():  # every request added is in `seqs`
                    for prompt, ids, p in zip(prompts, encoded, params):
                        seqs.append(self.engine.add_request(
                            ids, p, prompt if isinstance(prompt, str) else None))
                self.engine.precompile()
                for _ in self.engine.run_until_done():
                    pass
            except BaseException:
                self.engine.abort(seqs)
                raise
        return [s.output() for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens are sampled. Closing the
        generator early (breaking out of a for loop over it) aborts the request."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be SamplingParams")
        seq = None
        try:
            with self._lock:
                ids = self._encode(prompt)
                with deferred_interrupts():  # `seq` is set once the request is added
                    seq = self.engine.add_request(ids, params,
                                                  prompt if isinstance(prompt, str) else None)
                self.engine.precompile()
            while not seq.finished:
                with self._lock:
                    if not seq.finished:  # another caller's steps may have finished it
                        self.engine.step()
                piece = seq.take_new_text()
                if piece:
                    yield piece
            rest = seq.take_new_text()
            if rest:
                yield rest
            if seq.finish_reason == "abort":
                raise KtjaxError("the request was aborted: a step with it failed in another call")
        finally:
            if seq is not None:
                self._end(seq)

    def _end(self, seq) -> None:
        """Abort `seq` unless it finished: now when the engine is free, else at its next step
        (a stream closed from inside another call, by the garbage collector)."""
        with deferred_interrupts():
            if seq.finished:
                return
            self.engine.request_abort(seq)
            if self._lock.acquire(blocking=False):
                try:
                    self.engine.apply_abort_requests()
                finally:
                    self._lock.release()

    def score(self, prompt: Prompt, with_greedy: bool = False
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Log-probability of each token of `prompt` given the ones before it ([n - 1]);
        with_greedy: also the most likely token at each of those positions."""
        with self._lock:
            return self.engine.score(self._encode(prompt), with_greedy)

    def chat_prompt(self, messages: list[dict], template: str | None = None) -> list[int]:
        """Token ids of `messages` rendered with `template` (Jinja text), else the model's
        chat template; a model file without one (a base model, usually) gets ChatML, or
        Gemma's turn format for Gemma models, which base models follow poorly (the
        command line refuses them instead: `--chat-template`)."""
        from ktjax.gguf.chat import default_template, render_chat  # jinja2: not on every start
        tok = self.tokenizer
        template = template or tok.chat_template or default_template(self.config.architecture)
        text = render_chat(template, messages,
                           bos_token=tok.token_to_piece(tok.bos_id) if tok.bos_id is not None
                           else "",
                           eos_token=tok.token_to_piece(tok.eos_id) if tok.eos_id is not None
                           else "")
        # Templates write BOS themselves where the model wants it (as HF's apply_chat_template).
        return tok.encode(text, add_bos=False, parse_special=True)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.chat_prompt(messages)], params)[0]
