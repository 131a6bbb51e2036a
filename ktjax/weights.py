"""Where a weight lives, behind the calls a block makes on it.

A block computes `linear(w, x)`, `per_head_linear(w, x)`, `experts(w, x, route)` and
`as_array(w)` without knowing what runs them; that follows the weight's type, which the loader
picks from the placement decision (ktjax.rules):

- a device array: XLA;
- `LayerStack` (device, CPU programs): XLA, few-row matmuls read in place by the host kernel;
- `HostWeight` / `HostExperts`: the native host kernels through FFI (in CPU programs, and
  through the CUDA bridge in GPU programs);
- `DeviceExperts`: routed experts as grouped matmuls (ragged_dot) in XLA;
- `HybridExperts` (ktjax.hybrid_experts): routed experts split between a device pool and the
  host, the host part stream-ordered in GPU programs.
- `QuantMatrix` (ktjax.device_quant): codes and scales on the device, dequantized inside the
  step's fusions.

Per-layer handles ride through the scan over layers; `bind_layer` gives each the scanned
layer index.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import device_quant, pytree
from ktjax.device_quant import QuantMatrix
from ktjax.host.linear import linear_layered
from ktjax.host.moe import moe_layered
from ktjax.host.stacked import stacked_matvec


def _layer_or_zero(layer: jax.Array | None) -> jax.Array:
    return jnp.zeros((), jnp.int32) if layer is None else layer


@pytree.dataclass
class HostWeight:
    """A linear weight in the native host store.

    `handles` has one store handle per layer (one for a non-layer weight). The node has no
    array leaves, so it rides through `lax.scan` unchanged; `at_layer` binds the traced layer
    index, which the FFI call receives as an operand to pick the handle. A fused weight
    (several projections of one input) has the rows of each in `splits`.
    """

    handles: tuple[int, ...] = pytree.field(pytree_node=False)
    out_features: int = pytree.field(pytree_node=False)
    layer: jax.Array | None = None
    splits: tuple[int, ...] = pytree.field(pytree_node=False, default=())

    def at_layer(self, layer: jax.Array) -> "HostWeight":
        return self.replace(layer=layer)


@pytree.dataclass
class HostExperts:
    """A stack's routed experts in the native host store (one expert set per layer), run by
    the fused MoE kernel; a leafless scan passenger like HostWeight."""

    handles: tuple[int, ...] = pytree.field(pytree_node=False)
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> "HostExperts":
        return self.replace(layer=layer)


def hybrid_types() -> tuple[type, ...]:
    """(HybridExperts,) once ktjax.hybrid_experts is imported, else (): no params node can be
    one before (the loader imports it to make one). Not imported here: dense models never
    need it, nor the rules parser and device-quant code it brings (~20 ms of a start)."""
    module = sys.modules.get("ktjax.hybrid_experts")
    return (module.HybridExperts,) if module is not None else ()


def expert_carry(whole: dict, x: jax.Array):
    """hybrid_experts.ExpertCarry.of_stack(whole, x): None while that module is not imported,
    since no stack holds HybridExperts before."""
    module = sys.modules.get("ktjax.hybrid_experts")
    return None if module is None else module.ExpertCarry.of_stack(whole, x)


def _host_nodes() -> tuple[type, ...]:
    """The params node types whose weights live in the native host store."""
    return (HostWeight, HostExperts, *hybrid_types())

@pytree.dataclass
class LayerStack:
    """A per-layer float matrix kept whole, [L, ...], through the scan over layers, for CPU
    programs: inside a scan XLA copies each layer's slice of a scanned weight before using it
    (a dynamic slice), which for MoE routers and MLA up-projections costs more than the
    matmul. `layer` is bound like HostWeight's; matmuls read the slice in place through the
    host kernel (one kernel for every row count, so a row's result does not depend on the
    step's size), anything else takes the slice."""

    stack: jax.Array
    layer: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> "LayerStack":
        return self.replace(layer=layer)


@pytree.dataclass
class DeviceExperts:
    """Routed experts on the device: gate and up [E, inter, hidden], down [E, hidden, inter]
    (stacked per layer, [L, E, ...], until the scan slices them)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array


class Route(NamedTuple):
    """The experts each token runs: ids int32 [N, k] and their weights float32 [N, k]."""

    ids: jax.Array
    weights: jax.Array


def _is_bound(node) -> bool:
    """Nodes the scan's layer index is bound into: host weights, and the stacks that ride it
    whole (split_scanned: a stack's params are one flat dict, so every device matrix in it
    rides whole)."""
    return isinstance(node, (*_host_nodes(), LayerStack, QuantMatrix))


def split_scanned(params: dict) -> tuple[dict, dict]:
    """(weights that ride the scan over layers whole: LayerStacks, hybrid experts and device
    matrices, read in place at the bound layer; the rest: sliced per layer)."""
    whole = {k: v for k, v in params.items()
             if isinstance(v, (LayerStack, QuantMatrix, *hybrid_types()))}
    return whole, {k: v for k, v in params.items() if k not in whole}


def bind_layer(tree, layer: jax.Array):
    """Bind the scanned layer index into every host weight and layer stack of a layer's
    params."""
    return jax.tree.map(lambda w: w.at_layer(layer) if _is_bound(w) else w, tree,
                        is_leaf=_is_bound)


def host_handles(params) -> Iterator[int]:
    """Every native store handle in a tree of params (to release them)."""
    nodes = _host_nodes()
    for w in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, nodes)):
        if isinstance(w, nodes):
            yield from w.handles


def as_array(w) -> jax.Array:
    """A device weight as an array (a LayerStack's current layer)."""
    return w.stack[w.layer] if isinstance(w, LayerStack) else w


def per_head_linear(w, x: jax.Array) -> jax.Array:
    """y [..., G, N] = x [..., G, K] . w [G, N, K] per group (head) G, in float32; w may be a
    LayerStack of [L, G, N, K]."""
    lead = x.shape[:-2]
    rows = int(np.prod(lead))
    if isinstance(w, LayerStack):
        y = stacked_matvec(x.reshape(rows, *x.shape[-2:]), w.stack, w.layer)
        return y.reshape(*lead, *y.shape[-2:])
    w = as_array(w)
    return jnp.einsum("...gk,gnk->...gn", x.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def linear(w, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """y = x @ w.T (+ bias) for a GGUF-oriented weight w [out, in]; accumulates in float32,
    returns x's dtype."""
    if isinstance(w, HostWeight):
        y = linear_layered(x.astype(jnp.float32), _layer_or_zero(w.layer), w.handles,
                           w.out_features)
    elif isinstance(w, LayerStack):
        y = per_head_linear(LayerStack(w.stack[:, None], w.layer), x[..., None, :])[..., 0, :]
    elif isinstance(w, QuantMatrix):
        y = device_quant.linear(w, x)
    else:
        y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# Projections of one input that the loader may fuse into one host weight (one kernel call,
# one pass over x) when their GGUF tensors share a quant type.
FUSIBLE_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def fused_name(names: tuple[str, ...]) -> str:
    return "+".join(names)


def project(lp: dict, names: tuple[str, ...], x: jax.Array) -> list[jax.Array]:
    """[x @ W.T (+ bias) for each named weight of a layer's params], from the fused weight
    when the loader made one."""
    fused = lp.get(fused_name(names))
    if fused is not None:
        ys = jnp.split(linear(fused, x), np.cumsum(fused.splits)[:-1].tolist(), axis=-1)
    else:
        ys = [linear(lp[n], x) for n in names]
    return [y if lp.get(f"{n}_bias") is None else y + lp[f"{n}_bias"].astype(y.dtype)
            for n, y in zip(names, ys)]


_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # x [M, in] . w [E, out, in] over `in`
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _experts_ragged(w: DeviceExperts, x: jax.Array, route: Route) -> jax.Array:
    """Grouped matmuls: the N*k (token, expert) pairs sorted by expert, one ragged_dot per
    matrix over the contiguous groups, weighted and summed back per token."""
    n, k = route.ids.shape
    flat = route.ids.reshape(-1)
    order = jnp.argsort(flat)
    token = order // k
    sizes = jnp.bincount(flat, length=w.gate.shape[0]).astype(jnp.int32)

    def mm(a, m):
        return jax.lax.ragged_dot_general(a.astype(m.dtype), m, sizes, _RAGGED,
                                          preferred_element_type=jnp.float32)

    xs = x[token]
    y = mm(jax.nn.silu(mm(xs, w.gate)) * mm(xs, w.up), w.down)
    y = y * route.weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y)


def experts(w: HostExperts | DeviceExperts, x: jax.Array, route: Route) -> jax.Array:
    """The routed experts' SiLU-gated FFN of tokens x [N, H] (a host set: the activation and
    biases stored with it), weighted by `route` and summed per token: float32 [N, H]."""
    if isinstance(w, HostExperts):
        return moe_layered(x.astype(jnp.float32), route.ids, route.weights,
                           _layer_or_zero(w.layer), w.handles)
    return _experts_ragged(w, x, route)


def experts_plus(w, x: jax.Array, route: Route, extra: Callable[[jax.Array], jax.Array] | None
                 ) -> jax.Array:
    """experts(w, x, route) + extra(x) in float32; `extra` (the shared experts) runs on the
    device while the host runs the routed experts of a HybridExperts."""
    if isinstance(w, hybrid_types()):
        return w.with_extra(x, route, extra)
    y = experts(w, x, route)
    return y if extra is None else y + extra(x).astype(jnp.float32)
