"""EngineConfig: how a model is loaded and served, one object the Python API and the CLI (and a
server) build and pass down, instead of loose keyword arguments at each layer."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import jax

from ktjax.kernels import kv_quant

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class EngineConfig:
    """Settings of a loaded model; fields left None take defaults from the model and device
    (`resolve`).

    max_model_len: context per sequence (default: the model's, capped at 4096).
    kv_cache_tokens: size of the shared KV page pool in tokens (default: 4 x max_model_len).
    page_size: tokens per KV page.
    dtype: weights (and by default the KV cache), 'float32' (default on CPU) or 'bfloat16'
      (default on GPU).
    kv_cache_dtype: the KV pages, 'float32', 'bfloat16' or 'int8' (per-token-per-head
      float32 scales beside the pages: about half of bfloat16's bytes); default: dtype.
    attention: 'auto' (on CPU the native host kernel, or the reference for int8 pages; on a
      CUDA GPU the Pallas kernels), 'cpu', 'pallas' or 'reference'.
    rules: a placement rules file or profile name (ktjax.rules; default: the CPU-only profile
      on CPU, the family's profile elsewhere).
    host_linears: shorthand for rules: True = the CPU-only profile (matrices in the host
      kernels, kept in their GGUF quantization), False = all on the device; excludes rules.
    device: the JAX device (default: the first).
    max_step_tokens: new tokens per engine step (decode rows first, prefill chunks fill the
      rest): bounds how long one step, and so every stream's next token, waits on prompts.
    prefix_caching: share the KV pages of equal prompt prefixes between requests.
    speculative: 'ngram' (prompt lookup) or the path of a smaller GGUF with the same
      vocabulary (a draft model); None: no speculative decoding.
    spec_tokens: draft tokens verified per decode row and step.
    """

    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    page_size: int = 16
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    attention: str = "auto"
    rules: str | os.PathLike | None = None
    host_linears: bool | None = None
    device: jax.Device | None = None
    max_step_tokens: int = 512
    prefix_caching: bool = True
    speculative: str | os.PathLike | None = None
    spec_tokens: int = 4

    def resolve(self, context_length: int) -> "EngineConfig":
        """This config with every default filled in, for a model of `context_length`."""
        device = self.device or jax.devices()[0]
        max_model_len = min(self.max_model_len or DEFAULT_MAX_MODEL_LEN, context_length)
        dtype = self.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
        return dataclasses.replace(
            self, device=device, max_model_len=max_model_len,
            kv_cache_tokens=self.kv_cache_tokens or 4 * max_model_len, dtype=dtype,
            kv_cache_dtype=kv_quant.check_dtype(self.kv_cache_dtype or dtype))
