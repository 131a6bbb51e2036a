"""Logits of a GGUF model from ktjax's forward and from transformers loading the same file."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.engine.kv_cache import make_kv_cache
from ktjax.gguf.reader import GGUFFile
from ktjax.kernels.backends import REFERENCE
from ktjax.models import loader
from ktjax.models.base import Batch

PAGE = 4


def ktjax_logits(path, ids: np.ndarray) -> np.ndarray:
    """Logits [T, V] for every position of `ids`, one prefill through the paged forward."""
    f = GGUFFile(path)
    spec = loader.inspect(f)
    cfg = spec.config
    params = loader.load_params(f, spec)
    forward = spec.family.make_forward(cfg, REFERENCE)
    t = len(ids)
    n_pages = -(-t // PAGE)
    # Deliberately scattered, non-contiguous pages: the block table must be honoured.
    pages = np.arange(n_pages, dtype=np.int32)[::-1] * 2 + 1
    kv = make_kv_cache(cfg.n_layers, 2 * n_pages + 1, PAGE, cfg.n_kv_heads, cfg.head_dim,
                       jnp.float32)
    slots = np.array([pages[i // PAGE] * PAGE + i % PAGE for i in range(t)], np.int32)
    batch = Batch(tokens=jnp.asarray(ids[None], jnp.int32),
                  positions=jnp.arange(t, dtype=jnp.int32)[None],
                  slots=jnp.asarray(slots[None]), block_tables=jnp.asarray(pages[None]),
                  cache_lens=jnp.array([0], jnp.int32),
                  logits_index=jnp.arange(t, dtype=jnp.int32)[None])
    # float32 matmuls in full precision on every backend (GPUs default to TF32)
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(forward)(params, kv, batch)
    return np.asarray(logits[0])


def hf_logits(path, ids: np.ndarray) -> np.ndarray:
    """transformers' implementation of the architecture, loading the same GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    f = GGUFFile(path)
    arch = f.architecture
    overrides = {}
    head_dim = f.get(f"{arch}.attention.key_length", None)
    if arch == "qwen3" and head_dim:   # transformers' GGUF mapping ignores key_length
        overrides["head_dim"] = head_dim
    if arch == "gemma3" and head_dim:  # llama.cpp scales queries by head_dim
        overrides["query_pre_attn_scalar"] = head_dim
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, **overrides)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()
