"""The activation between a routed expert's gate/up and down projections, one description
for every place experts run: the host MoE kernel (stored with the expert set,
cpu_kernels/moe/expert_epilogue.h) and the device's grouped matmuls (`apply`, the jnp
formula, also the reference the host kernel is tested against)."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ktjax.errors import KernelError

KINDS = ("silu", "swiglu_oai")


@dataclass(frozen=True)
class ExpertActivation:
    """`silu`: silu(g) * u. `swiglu_oai` (gpt-oss, llama.cpp's swiglu_oai, transformers'
    GptOssExperts): g' = min(g, limit), u' = clip(u, -limit, limit),
    g' * sigmoid(alpha * g') * (u' + 1)."""

    kind: str = "silu"
    alpha: float = 1.0
    limit: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise KernelError(f"unknown expert activation {self.kind!r}; expected one of {KINDS}")

    def apply(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        if self.kind == "silu":
            return jax.nn.silu(gate) * up
        g = jnp.minimum(gate, self.limit)
        u = jnp.clip(up, -self.limit, self.limit)
        return g * jax.nn.sigmoid(self.alpha * g) * (u + 1.0)


SILU = ExpertActivation()
