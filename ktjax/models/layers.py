"""Building blocks shared by the model families: pure functions over arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class HostWeight:
    """A linear weight that lives in the native host store (CPU kernels through XLA FFI).

    `handles` has one store handle per layer (one for a non-layer weight). The node has no
    array leaves, so it rides through `lax.scan` unchanged; `at_layer` binds the traced layer
    index, which the FFI call receives as an operand to pick the handle.
    """

    handles: tuple[int, ...] = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)
    layer: jax.Array | None = None
    splits: tuple[int, ...] = struct.field(pytree_node=False, default=())  # fused: rows each

    def at_layer(self, layer: jax.Array) -> "HostWeight":
        return self.replace(layer=layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        from ktjax.host.linear import linear_layered
        layer = jnp.zeros((), jnp.int32) if self.layer is None else self.layer
        return linear_layered(x.astype(jnp.float32), layer, self.handles, self.out_features)


@struct.dataclass
class HostExperts:
    """A layer's routed experts in the native host store (one expert set per layer), run by
    the fused MoE kernel through XLA FFI; a leafless scan passenger like HostWeight."""

    handles: tuple[int, ...] = struct.field(pytree_node=False)
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> "HostExperts":
        return self.replace(layer=layer)

    def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        from ktjax.host.moe import moe_layered
        layer = jnp.zeros((), jnp.int32) if self.layer is None else self.layer
        return moe_layered(x, ids, weights, layer, self.handles)


HOST_NODES = (HostWeight, HostExperts)



@struct.dataclass
class LayerStack:
    """A per-layer float matrix kept whole, [L, ...], through the scan over layers, for CPU
    programs: inside a scan XLA copies each layer's slice of a scanned weight before using it
    (a dynamic slice), which for MoE routers and MLA up-projections costs more than the
    matmul. `layer` is bound like HostWeight's; matmuls read the slice in place through the
    host kernel (`linear`, `per_head_linear`: one kernel for every row count, so a row's
    result does not depend on the step's size), anything else takes `value()`."""

    stack: jax.Array
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> "LayerStack":
        return self.replace(layer=layer)

    def value(self) -> jax.Array:
        return self.stack[self.layer]


LAYER_BOUND = (*HOST_NODES, LayerStack)


def bind_layer(tree, layer: jax.Array):
    """Bind the scanned layer index into every host weight and layer stack of a layer's
    params."""
    return jax.tree.map(lambda w: w.at_layer(layer) if isinstance(w, LAYER_BOUND) else w, tree,
                        is_leaf=lambda n: isinstance(n, LAYER_BOUND))


def dense(w):
    """A device weight as an array (a LayerStack's current layer)."""
    return w.value() if isinstance(w, LayerStack) else w


def per_head_linear(x: jax.Array, w) -> jax.Array:
    """y [..., G, N] = x [..., G, K] . w [G, N, K] per group (head) G, in float32; w may be a
    LayerStack of [L, G, N, K]."""
    lead = x.shape[:-2]
    rows = int(np.prod(lead))
    if isinstance(w, LayerStack):
        from ktjax.host.stacked import stacked_matvec
        y = stacked_matvec(x.reshape(rows, *x.shape[-2:]), w.stack, w.layer)
        return y.reshape(*lead, *y.shape[-2:])
    w = dense(w)
    return jnp.einsum("...gk,gnk->...gn", x.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32. GGUF stores Gemma's (1 + w) already folded into `weight`.

    On CPU the host kernel runs it (each row summed in order): XLA CPU's reduction order
    follows the array's shape, so a row normalized among 8 rows differed in the last bit
    from the same row alone, and greedy output depended on the batch."""
    x32, w32 = x.astype(jnp.float32), weight.astype(jnp.float32)

    def xla(x32, w32):
        return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w32

    def host(x32, w32):
        from ktjax.host.ffi import rms_norm as host_rms_norm
        return host_rms_norm(x32, w32, eps)

    return jax.lax.platform_dependent(x32, w32, cpu=host, default=xla).astype(x.dtype)


# Projections of one input that the loader may fuse into one host weight (one kernel call,
# one pass over x) when their GGUF tensors share a quant type.
FUSIBLE_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def fused_name(names: tuple[str, ...]) -> str:
    return "+".join(names)


def project(x: jax.Array, lp: dict, names: tuple[str, ...]) -> list[jax.Array]:
    """[x @ W.T (+ bias) for each named weight], from the fused weight when there is one."""
    fused = lp.get(fused_name(names))
    if fused is not None:
        ys = jnp.split(linear(x, fused), np.cumsum(fused.splits)[:-1].tolist(), axis=-1)
    else:
        ys = [linear(x, lp[n]) for n in names]
    return [y if lp.get(f"{n}_bias") is None else y + lp[f"{n}_bias"].astype(y.dtype)
            for n, y in zip(names, ys)]


def linear(x: jax.Array, w: jax.Array | HostWeight | LayerStack,
           bias: jax.Array | None = None) -> jax.Array:
    """y = x @ w.T for a GGUF-oriented weight w [out, in]; accumulates in float32."""
    if isinstance(w, HostWeight):
        y = w(x)
    elif isinstance(w, LayerStack):
        y = per_head_linear(x[..., None, :], LayerStack(w.stack[:, None], w.layer))[..., 0, :]
    else:
        y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(rotary_dim: int, base: float, linear_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2]; `linear_factor` stretches positions."""
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    return (inv / linear_factor).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool) -> jax.Array:
    """Rotary embedding of x [B, T, heads, hd] at positions [B, T].

    neox=True rotates the two halves of the head (GPT-NeoX / HF layout: qwen2/3, gemma3);
    neox=False rotates adjacent pairs (llama.cpp's layout for `llama`, whose q/k weights the
    converter permuted). Dimensions past 2 * len(inv_freq) pass through.
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, T, rot/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xr = x[..., :rot].astype(jnp.float32)
    if neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), x[..., rot:]], axis=-1)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)
