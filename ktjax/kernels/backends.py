"""Attention backends: one interface, chosen per run: `reference` (jnp, any device), `cpu`
(the native host kernel, every step); `auto` picks by platform."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ktjax.errors import KtjaxError
from ktjax.kernels import paged_attention_cpu, paged_attention_ref


@dataclass(frozen=True)
class AttentionBackend:
    """`write(k_cache, v_cache, slots, k, v)` stores all layers' new keys/values after the
    layer loop; `attend(q, k_new, v_new, k_cache, v_cache, layer, block_tables, cache_lens,
    q_positions, *, scale, sliding_window[, values_in_keys])` attends over cache + new keys;
    `values_in_keys` (MLA) is passed only by families with a latent cache. See
    paged_attention_ref for the contract."""

    name: str
    write: Callable
    attend: Callable


REFERENCE = AttentionBackend("reference", paged_attention_ref.write_kv,
                             paged_attention_ref.paged_attention)
CPU = AttentionBackend("cpu", paged_attention_ref.write_kv, paged_attention_cpu.paged_attention)
_BACKENDS = {b.name: b for b in (REFERENCE, CPU)}


def get_backend(name: str, platform: str = "cpu") -> AttentionBackend:
    """The backend called `name`; "auto" is the host kernel on CPU, the reference elsewhere."""
    if name == "auto":
        name = "cpu" if platform == "cpu" else "reference"
    if name not in _BACKENDS:
        raise KtjaxError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
