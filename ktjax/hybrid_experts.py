"""Routed experts split between the device and the host, with one combined output.

A rules file whose routed-experts rule places them on the host may add an `experts:` section
that moves some of them to the device (XLA):

    experts:
      n_cpu_moe: 20        # llama.cpp's --n-cpu-moe: the experts of blocks 0..19 stay on the
                           # host, every later block's experts go to the device
      device_blocks: [0, 5]          # or name the blocks whose experts all go to the device
      hot: {12: [3, 17, 40]}         # per block, experts on the device (the frequent ones:
                                     # scripts/expert_placement.py measures them)
      defer: 2             # KTransformers' expert deferral: each token's 2 lowest-weighted
                           # host experts of a layer join the next layer's output (below)
      device_prefill_min_tokens: 256   # steps of >= 256 tokens run every routed expert on
                           # the device, the layer's weights streamed from host memory (below)

Every layer keeps its full expert set on the host (what the host runs is chosen per token);
the device experts live in one pool [S, ...], contiguous per layer, in the file's
quantization where the device has a layout for it (QuantMatrix codes, as `keep` device
matrices: a Q4_K pool takes 0.58 byte per weight, not bf16's 2), with `slots` [L, E]
mapping each (layer, expert) to its pool slot or -1. A layer's tokens are routed as usual;
the pairs whose expert has a slot run on the device, the others on the host (their ids in
the host call are the skip id), and the two sums add up. A family's expert activation and
biases (gpt-oss) hold on both sides: stored with the host sets, gathered into the pool.

In GPU programs the host part is stream-ordered work (ktjax.host.moe_async): it starts
before, and is waited for after, the device part and the shared experts, which the device
computes meanwhile. Without an `experts:` section, host experts in GPU programs take this
path with an empty pool; CPU programs keep HostExperts unless the section asks for a split.

Expert deferral (`defer: N`): of each token's top-k experts that run on the host, the N with
the lowest routing weights are a second host job, submitted after the layer's own and waited
for in the next layer, whose output they join (the last layer's after the scan): the host
computes them while the device runs the next layer's attention. The next layer's input lacks
them, which is the accuracy cost (docs/kernel-notes.md, "hybrid"). The job's token is state
carried by the scan over layers (`ExpertCarry`).

Prefill on the device (`device_prefill_min_tokens: M`, llama.cpp offloads batches of 32+
tokens, KTransformers has gpu-prefill-token-threshold): every layer's experts are also held in
host memory (the `pinned_host` memory space, GGUF blocks kept as QuantMatrix codes), and a
step program of M tokens or more (the choice is static: the bucket's token count) copies each
layer's experts to the device and runs them there as grouped matmuls. The copy of layer i+1
is issued at the top of layer i and carried by the scan (double buffering): it depends on
nothing layer i computes, so XLA's scheduler may run it as an async copy under layer i's
work. Smaller steps (decode) run the host experts. 0 (the default) never streams: the host
copy takes as much memory again as the experts' file bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ktjax import _native, device_quant, pytree
from ktjax.device_quant import QuantMatrix
from ktjax.errors import RulesError
from ktjax.expert_activation import SILU, ExpertActivation
from ktjax.gguf import quants
from ktjax.host.moe_async import SKIP, moe_after, moe_submit, moe_wait, reserve_site

# Up to this many (token, expert) pairs on the device, each pair's expert is gathered from the
# pool (decode reads only the experts it runs); above, the layer's window of the pool runs as
# grouped matmuls (prefill, where most of the layer's device experts have tokens).
GATHER_PAIRS = 64
_KEYS = {"n_cpu_moe", "device_blocks", "hot", "defer", "device_prefill_min_tokens"}


@dataclass(frozen=True)
class ExpertPlacement:
    """Per block (GGUF block index), the experts placed on the device; `defer`: host experts
    per token deferred to the next layer; `prefill_min_tokens`: steps of at least this many
    tokens stream every layer's experts to the device (0: never)."""

    device: dict[int, tuple[int, ...]]
    defer: int = 0
    prefill_min_tokens: int = 0

    def for_block(self, block: int) -> tuple[int, ...]:
        return self.device.get(block, ())


def read_placement(rules_file: str | Path, n_blocks: int, n_experts: int,
                   moe_blocks: list[int]) -> ExpertPlacement | None:
    """The `experts:` section of a rules file, checked (None if it has none)."""
    doc = yaml.safe_load(Path(rules_file).read_text()) or {}
    section = doc.get("experts") if isinstance(doc, dict) else None
    if section is None:
        return None
    where = f"{rules_file}: experts"
    if not isinstance(section, dict):
        raise RulesError(f"{where}: expected a mapping with {', '.join(sorted(_KEYS))}")
    unknown = set(section) - _KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"allowed: {', '.join(sorted(_KEYS))}")
    if "n_cpu_moe" in section and "device_blocks" in section:
        raise RulesError(f"{where}: give n_cpu_moe or device_blocks, not both")

    def block(b, what: str) -> int:
        if not isinstance(b, int) or isinstance(b, bool) or b not in moe_blocks:
            raise RulesError(f"{where}.{what}: block {b!r} is not one of the {len(moe_blocks)} "
                             f"blocks with routed experts ({moe_blocks[0]}..{moe_blocks[-1]})")
        return b

    device: dict[int, set[int]] = {}
    if "n_cpu_moe" in section:
        n = section["n_cpu_moe"]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= n_blocks:
            raise RulesError(f"{where}.n_cpu_moe: expected 0..{n_blocks} blocks, got {n!r}")
        for b in moe_blocks:
            if b >= n:
                device[b] = set(range(n_experts))
    blocks = section.get("device_blocks", [])
    if not isinstance(blocks, list):
        raise RulesError(f"{where}.device_blocks: expected a list of block indices, got {blocks!r}")
    for b in blocks:
        device[block(b, "device_blocks")] = set(range(n_experts))
    hot = section.get("hot", {}) or {}
    if not isinstance(hot, dict):
        raise RulesError(f"{where}.hot: expected a mapping block -> expert ids, got {hot!r}")
    for b, ids in hot.items():
        b = block(int(b) if isinstance(b, str) and b.isdigit() else b, "hot")
        if not isinstance(ids, list) or not all(
                isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n_experts for e in ids):
            raise RulesError(f"{where}.hot[{b}]: expected a list of expert ids in "
                             f"[0, {n_experts}), got {ids!r}")
        device.setdefault(b, set()).update(ids)
    counts = {}
    for key, what in (("defer", "experts"), ("device_prefill_min_tokens", "tokens")):
        v = section.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RulesError(f"{where}.{key}: expected a number of {what} >= 0, got {v!r}")
        counts[key] = v
    return ExpertPlacement({b: tuple(sorted(e)) for b, e in device.items() if e},
                           counts["defer"], counts["device_prefill_min_tokens"])


@pytree.dataclass
class HybridExperts:
    """A stack's routed experts: full expert sets on the host (`handles`, one per layer) and
    a device pool of some of them (gate, up [S, I, H], down [S, H, I]); `slots` [L, E] is
    each expert's pool slot or -1, `pool_start` [L] the first slot of each layer's window of
    `window` slots. Rides the scan over layers whole (scan_whole); `layer` is bound per step.
    `activation` and the pool's expert biases (gate/up [S, I], down [S, H], or None) are the
    family's (gpt-oss); the host sets hold their own."""

    handles: tuple[int, ...] = pytree.field(pytree_node=False)
    window: int = pytree.field(pytree_node=False)
    activation: ExpertActivation = pytree.field(pytree_node=False, default=SILU)
    slots: jax.Array | None = None
    pool_start: jax.Array | None = None
    gate: jax.Array | None = None
    up: jax.Array | None = None
    down: jax.Array | None = None
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None
    layer: jax.Array | None = None
    defer: int = pytree.field(pytree_node=False, default=0)
    # every layer's (gate, up, down) in host memory, [L, E * out, in] (QuantMatrix or
    # arrays), streamed to the device by steps of >= prefill_min_tokens tokens
    stream: tuple | None = None
    prefill_min_tokens: int = pytree.field(pytree_node=False, default=0)
    device_memory: jax.sharding.Sharding | None = pytree.field(pytree_node=False, default=None)
    n_experts: int = pytree.field(pytree_node=False, default=0)
    dtype: str = pytree.field(pytree_node=False, default="float32")
    # bound per layer by ExpertCarry.bind: the state the previous layer handed on (its
    # deferred job's token, or this layer's streamed weights) and the carry to hand on to
    carried: Any = None
    carry: "ExpertCarry | None" = pytree.field(pytree_node=False, default=None)
    scan_whole: ClassVar[bool] = True

    def at_layer(self, layer: jax.Array) -> "HybridExperts":
        return self.replace(layer=layer)

    def streams(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens (static: its bucket's) runs every expert on the
        device from streamed weights."""
        return self.stream is not None and 0 < self.prefill_min_tokens <= tokens

    def fetch(self, layer: jax.Array):
        """Layer `layer`'s streamed (gate, up, down, and their biases), copied to device memory."""
        n = jax.tree.leaves(self.stream)[0].shape[0]
        i = jnp.minimum(layer, n - 1)
        return jax.tree.map(lambda a: jax.device_put(
            jax.lax.dynamic_index_in_dim(a, i, keepdims=False), self.device_memory),
            self.stream)

    def with_extra(self, x: jax.Array, route, extra: Callable[[jax.Array], jax.Array] | None
                   ) -> jax.Array:
        """Routed experts of x [N, H] (+ extra(x), the shared experts, computed while the host
        works): float32 [N, H]."""
        n, hidden = x.shape
        if self.carry is not None and self.carry.streaming:
            y = self._streamed_part(x, route)
            return y if extra is None else y + extra(x).astype(jnp.float32)
        layer = jnp.zeros((), jnp.int32) if self.layer is None else self.layer
        ids = route.ids
        on_device = None
        if self.window:
            slot = self.slots[layer][ids]                       # [N, k]
            on_device = slot >= 0
            ids = jnp.where(on_device, SKIP, ids)
        deferred = None
        if self.carry is not None:
            ids, deferred = _split_lowest(ids, route.weights, self.defer)
        token, site = moe_submit(x.astype(jnp.float32), ids, route.weights, layer, self.handles)
        # The device's work reads x through the submit's token: it is ordered after the
        # submit, so the host starts first and both run at once.
        xd = moe_after(x, token)
        parts = []
        if on_device is not None:
            parts.append(self._device_part(xd, route, slot, on_device, layer))
        if extra is not None:
            parts.append(extra(xd).astype(jnp.float32))
        if not parts:
            y = moe_wait(token, site, x, n, hidden)
        else:
            done = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            y = moe_wait(token, site, done, n, hidden) + done
        if deferred is not None:
            y = y + self.carry.hand_on(self, x, y, deferred, layer)
        return y

    def _streamed_part(self, x: jax.Array, route) -> jax.Array:
        """Every routed expert on the device, from this layer's streamed weights."""
        mats = []
        for m in self.carried[:3]:
            w = device_quant.dequantize(m, self.dtype) if isinstance(m, QuantMatrix) else m
            mats.append(w.astype(self.dtype).reshape(self.n_experts, -1, w.shape[-1]))
        return _grouped(mats, x, route.ids, route.weights, self.n_experts, self.carried[3:],
                        self.activation)

    def _device_part(self, x, route, slot, on_device, layer) -> jax.Array:
        n, k = slot.shape
        w = jnp.where(on_device, route.weights, 0.0)
        if n * k <= GATHER_PAIRS:
            s = jnp.where(on_device, slot, 0).reshape(-1)
            xs = jnp.repeat(x, k, axis=0)                                # pair p = token p // k
            biased = lambda v, b: v if b is None else v + b[s]  # noqa: E731
            g = _pair_matvec(self.gate, s, xs)
            u = _pair_matvec(self.up, s, xs)
            a = self.activation.apply(biased(g, self.gate_bias), biased(u, self.up_bias))
            y = biased(_pair_matvec(self.down, s, a), self.down_bias)
            y = jnp.where(on_device.reshape(-1, 1), y, 0.0) * w.reshape(-1, 1)
            return y.reshape(n, k, -1).sum(axis=1)
        total = jax.tree.leaves(self.gate)[0].shape[0]
        start = jnp.minimum(self.pool_start[layer], total - self.window)   # window in bounds
        local = jnp.where(on_device, slot - start, self.window)            # off-device: last
        pool = [_values(_window(m, start, self.window), self.dtype)
                for m in (self.gate, self.up, self.down)]
        biases = [_window(b, start, self.window)
                  for b in (self.gate_bias, self.up_bias, self.down_bias)]
        return _grouped(pool, x, local, w, self.window, biases, self.activation)


def _pair_matvec(pool: jax.Array | QuantMatrix, slots: jax.Array, v: jax.Array) -> jax.Array:
    """Each pair's expert (pool slot slots[p], [out, in]) times its vector v[p], float32
    [P, out]. A quantized pool: the Pallas gathered GEMV where KTJAX_QUANT_KERNEL asks for it
    (each expert's codes read in place), else one XLA reduction over the gathered codes
    (read once, as device_quant.linear's reduction form)."""
    if not isinstance(pool, QuantMatrix):
        return jnp.einsum("pi,poi->po", v.astype(pool.dtype), pool[slots],
                          preferred_element_type=jnp.float32)
    from ktjax.kernels import quant_matmul   # Pallas: imported by programs that use it
    pairs = v.shape[0]
    if device_quant.use_pallas_kernel(pairs) and quant_matmul.gathered_supported(pool, pairs):
        return quant_matmul.gathered_gemv(pool, slots, v,
                                          interpret=jax.default_backend() != "gpu")
    m = _take(pool, slots)
    return jnp.sum(device_quant.dequantize(m) * v.astype(jnp.float32)[:, None, :], -1)


def _split_lowest(ids: jax.Array, w: jax.Array, defer: int
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(ids with each token's `defer` lowest-weighted host slots SKIP, (those slots' ids
    [N, defer], weights [N, defer])). Slots already SKIP (device pairs) rank lowest, so a
    token defers only host experts and defers fewer when fewer run on the host."""
    rank = jnp.where(ids == SKIP, -jnp.inf, w)
    order = jnp.argsort(-rank, axis=1, stable=True)
    last = order[:, ids.shape[1] - defer:]
    later = jnp.take_along_axis(ids, last, axis=1), jnp.take_along_axis(w, last, axis=1)
    now = jnp.where(jnp.any(jnp.arange(ids.shape[1])[None, :, None] == last[:, None, :], -1),
                    SKIP, ids)
    return now, later


class ExpertCarry:
    """What the scan over a stack's layers carries for its routed experts, one per traced scan
    (so per program): in a step that streams (HybridExperts.streams), the weights of the
    layer about to run, the next layer's copy issued as each layer starts; otherwise, with
    deferral, the token of the deferred host job of the previous layer (before the first
    layer a zero job, on a site of the program's own). `bind` gives a layer the carried state,
    the layer sets `next`, `finish` ends the scan."""

    def __init__(self, experts: HybridExperts, x: jax.Array):
        n, hidden = x.shape
        self.shape = (n, hidden)
        self.streaming = experts.streams(n)
        self.next = None
        if self.streaming:
            self.initial = experts.fetch(jnp.zeros((), jnp.int32))
            return
        self.site = reserve_site(n, hidden, experts.defer, experts.handles)
        self.initial, _ = moe_submit(jnp.zeros((n, hidden), jnp.float32),
                                     jnp.full((n, experts.defer), SKIP, jnp.int32),
                                     jnp.zeros((n, experts.defer), jnp.float32),
                                     jnp.zeros((), jnp.int32), experts.handles, site=self.site)

    @staticmethod
    def of_stack(whole: dict, x: jax.Array) -> tuple[str, "ExpertCarry"] | None:
        """(params key, ExpertCarry) for a stack whose routed experts carry state in a step
        of x's tokens, else None."""
        tokens = x.reshape(-1, x.shape[-1])
        for key, w in whole.items():
            if isinstance(w, HybridExperts) and (w.defer or w.streams(tokens.shape[0])):
                return key, ExpertCarry(w, tokens)
        return None

    def bind(self, experts: HybridExperts, state, layer: jax.Array) -> HybridExperts:
        """`experts` for stack layer `layer`, given the state the previous one handed on."""
        self.next = experts.fetch(layer + 1) if self.streaming else None
        return experts.replace(carried=state, carry=self)

    def hand_on(self, experts: HybridExperts, x: jax.Array, after: jax.Array,
                deferred: tuple[jax.Array, jax.Array], layer: jax.Array) -> jax.Array:
        """The previous layer's deferred result (waited for once `after`, this layer's own
        experts, is done), and this layer's deferred pairs submitted (after that wait: they
        reuse the site's buffers)."""
        prev = moe_wait(experts.carried, self.site, after, *self.shape)
        ids, w = deferred
        self.next, _ = moe_submit(x.astype(jnp.float32), ids, w, layer, experts.handles,
                                  site=self.site, after=prev)
        return prev

    def take_next(self):
        if self.next is None:
            raise RuntimeError("a layer with carried expert state ran no routed experts")
        return self.next

    def finish(self, state, x: jax.Array) -> jax.Array:
        """x after the scan: plus the last layer's deferred result when deferring."""
        if self.streaming:
            return x
        last = moe_wait(state, self.site, x, *self.shape)
        return x + last.reshape(x.shape).astype(x.dtype)


_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # x [M, in] . w [G, out, in] over `in`
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _grouped(pool, x, local, w, groups: int, biases=(None, None, None),
             activation: ExpertActivation = SILU) -> jax.Array:
    """Grouped matmuls over `groups` pool experts: pairs sorted by local slot (off-device
    pairs, slot == groups, last and outside every group), masked out of the sum."""
    gate, up, down = pool
    n, k = local.shape
    flat = local.reshape(-1)
    order = jnp.argsort(flat)
    token = order // k
    sizes = jnp.bincount(flat, length=groups + 1)[:groups].astype(jnp.int32)
    pair_slot = jnp.minimum(flat[order], groups - 1)  # off-device pairs: any row, masked below

    def mm(a, m, b):
        y = jax.lax.ragged_dot_general(a.astype(m.dtype), m, sizes, _RAGGED,
                                       preferred_element_type=jnp.float32)
        return y if b is None else y + b[pair_slot]

    xs = x[token]
    bg, bu, bd = biases
    y = mm(activation.apply(mm(xs, gate, bg), mm(xs, up, bu)), down, bd)
    keep = (flat[order] < groups)[:, None]
    y = jnp.where(keep, y, 0.0) * w.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y)


def _block_of(name: str) -> int:
    return int(name.split(".")[1])  # blk.N.ffn_gate_exps.weight


def build(handles: tuple[int, ...], f, names: list[tuple[str, str, str]], rules_file: str,
          n_blocks: int, dtype, device: jax.Device | None, force: bool,
          activation: ExpertActivation = SILU,
          bias_names: list[list[str] | None] = (None, None, None)) -> HybridExperts | None:
    """The hybrid expert set of a stack whose per-layer GGUF (gate, up, down) names are
    `names`, host sets `handles` already packed; None when the rules ask for no split and
    `force` is off (CPU programs keep HostExperts). `bias_names`: per projection, the
    per-layer names of the experts' biases [E, rows] (or None), gathered into the pool as
    float32."""
    e = f.tensors[names[0][0]].shape[0]
    blocks = [_block_of(g) for g, _, _ in names]
    placement = read_placement(rules_file, n_blocks, e, blocks)
    if placement is None and not force:
        return None
    per_layer = [placement.for_block(b) if placement else () for b in blocks]
    window = max((len(p) for p in per_layer), default=0)
    defer = placement.defer if placement else 0
    k = int(f.get(f"{f.architecture}.expert_used_count"))
    if defer >= k:
        raise RulesError(f"{rules_file}: experts.defer: {defer} of the {k} experts a token "
                         f"uses leaves none for its own layer (expected 0..{k - 1})")
    min_tokens = placement.prefill_min_tokens if placement else 0
    where = device or jax.devices()[0]
    common = dict(handles=handles, defer=defer, n_experts=e, dtype=jnp.dtype(dtype).name,
                  prefill_min_tokens=min_tokens,
                  stream=_host_stream(f, names, dtype, where, bias_names) if min_tokens else None,
                  device_memory=jax.sharding.SingleDeviceSharding(where, memory_kind="device"))
    if window == 0:
        return HybridExperts(window=0, activation=activation, **common)
    slots = np.full((len(blocks), e), -1, np.int32)
    start, mats, biases = [], [[], [], []], [[], [], []]
    forms = [_stream_form([f.tensors[ns[i]] for ns in names]) for i in range(3)]
    used = 0
    for j, (experts, layer_names) in enumerate(zip(per_layer, names)):
        start.append(used)
        for i, name in enumerate(layer_names):
            t = f.tensors[name]
            if experts:
                mats[i].append(_pool_part(t, list(experts), forms[i], dtype))
                if bias_names[i] is not None:
                    b = f.tensors[bias_names[i][j]]
                    biases[i].append(quants.dequantize(b.data, b.qtype, b.shape,
                                                       dtype=np.float32)[list(experts)])
        slots[j, list(experts)] = np.arange(used, used + len(experts), dtype=np.int32)
        used += len(experts)
    put = (lambda a: jax.device_put(a, device))
    gate, up, down = (_stack_pool(m, device) for m in mats)
    gate_b, up_b, down_b = (put(np.concatenate(b)) if b else None for b in biases)
    return HybridExperts(window=window, activation=activation, slots=put(slots),
                         pool_start=put(np.asarray(start, np.int32)), gate=gate, up=up, down=down,
                         gate_bias=gate_b, up_bias=up_b, down_bias=down_b, **common)


def _host_stream(f, names: list[tuple[str, str, str]], dtype, device: jax.Device,
                 bias_names: list[list[str] | None]) -> tuple:
    """Every layer's (gate, up, down) as [L, E * out, in] in host memory (`pinned_host`, which
    the device copies from without staging): GGUF blocks kept as QuantMatrix codes where the
    device has a layout for the type (dequantized inside the step), else dequantized to
    `dtype`; then the three projections' biases, float32 [L, E, out] (None where the family
    has none)."""
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    out: list = []
    for per_layer in zip(*names):                 # gate names, up names, down names
        ts = [f.tensors[n] for n in per_layer]
        e, rows, cols = ts[0].shape
        form = _stream_form(ts)
        if form == "dequantized":
            out.append(jax.device_put(np.stack([quants.dequantize(
                t.data, t.qtype, t.shape, dtype=dtype).reshape(e * rows, cols) for t in ts]),
                host))
            continue
        packed = [_pack_rows(np.asarray(t.data), t.qtype, e * rows, cols, form) for t in ts]
        qm = device_quant.stack_to_device(packed, "keep", True, None)
        out.append(jax.tree.map(lambda a: jax.device_put(a, host), qm))
    for per_layer in bias_names:
        out.append(None if per_layer is None else jax.device_put(np.stack([quants.dequantize(
            f.tensors[n].data, f.tensors[n].qtype, f.tensors[n].shape, dtype=np.float32)
            for n in per_layer]), host))
    return tuple(out)


def _stream_form(ts) -> str:
    """How one matrix kind's layers are held for streaming, as the loader holds device
    matrices: GGUF codes ("keep": one packable type; "k_mixed": K-quants of several types,
    widened to their common layout) or "dequantized"."""
    qtypes = {t.qtype for t in ts}
    if len(qtypes) == 1 and next(iter(qtypes)) in device_quant.KEEP_QTYPES:
        return "keep"
    return "k_mixed" if qtypes <= set(device_quant.K_MIX_QTYPES) else "dequantized"


def _pool_part(t, experts: list[int], form: str, dtype):
    """Some experts of one layer's [E, out, in] tensor for the device pool: packed arrays
    and layout of their QuantMatrix ([n, out, ...]) in forms keep / k_mixed, else the
    dequantized array [n, out, in]."""
    _, rows, cols = t.shape
    raw = np.asarray(t.data).reshape(t.shape[0], -1)[experts]
    if form == "dequantized":
        return quants.dequantize(raw, t.qtype, (len(experts), rows, cols), dtype=dtype)
    arrays, statics = _pack_rows(raw, t.qtype, len(experts) * rows, cols, form)
    return {k: v.reshape(len(experts), rows, -1) for k, v in arrays.items()}, statics


def _pack_rows(raw: np.ndarray, qtype, n: int, cols: int, form: str) -> tuple[dict, dict]:
    """GGUF blocks of an [n, cols] matrix as `keep` device arrays (form keep), or in the
    layout mixed K-quants share (form k_mixed)."""
    packed = device_quant.pack_gguf(raw, qtype, (n, cols))
    return device_quant.widen_to_k8(packed, n, cols) if form == "k_mixed" else packed


def _stack_pool(parts: list, device) -> jax.Array | QuantMatrix:
    """The pool of one projection: its layers' parts concatenated along the slots."""
    if not isinstance(parts[0], tuple):
        return jax.device_put(np.concatenate(parts), device)
    arrays = {k: np.concatenate([a[k] for a, _ in parts]) for k in parts[0][0]}
    return device_quant.stack_to_device([(arrays, parts[0][1])], "keep", False, device)


def _take(m: jax.Array | QuantMatrix, index: jax.Array) -> jax.Array | QuantMatrix:
    """Pool slots `index` of a projection (each array's leading axis)."""
    return jax.tree.map(lambda a: a[index], m) if isinstance(m, QuantMatrix) else m[index]


def _window(m: jax.Array | QuantMatrix | None, start: jax.Array, size: int):
    """`size` pool slots from `start` (each array's leading axis)."""
    return None if m is None else jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), m)


def _values(m: jax.Array | QuantMatrix, dtype) -> jax.Array:
    """A pool part's weights as an array of `dtype` (quantized parts dequantized)."""
    return device_quant.dequantize(m, dtype) if isinstance(m, QuantMatrix) else m


def stream_host_bytes(f, names: list[tuple[str, str, str]], rules_file: str, n_blocks: int,
                      itemsize: int) -> int:
    """Host memory the streamed copy of a stack's experts takes (`device_prefill_min_tokens`;
    0 without it): what `ktjax info --rules` adds to the host's."""
    e = f.tensors[names[0][0]].shape[0]
    placement = read_placement(rules_file, n_blocks, e, [_block_of(g) for g, _, _ in names])
    if placement is None or not placement.prefill_min_tokens:
        return 0
    total = 0
    for per_layer in zip(*names):
        ts = [f.tensors[n] for n in per_layer]
        form = _stream_form(ts)
        for t in ts:
            shape = (t.shape[0] * t.shape[1], t.shape[2])
            total += t.n_elements * itemsize if form == "dequantized" else \
                device_quant.packed_nbytes(t.qtype, shape, "keep", k_mixed=form == "k_mixed")
    return total


def device_expert_bytes(f, names: list[tuple[str, str, str]], rules_file: str, n_blocks: int,
                        itemsize: int) -> int:
    """Device memory the `experts:` section of a rules file takes for one stack (0 without)."""
    e = f.tensors[names[0][0]].shape[0]
    placement = read_placement(rules_file, n_blocks, e, [_block_of(g) for g, _, _ in names])
    if placement is None:
        return 0
    forms = [_stream_form([f.tensors[ns[i]] for ns in names]) for i in range(3)]
    total = 0
    for gate_up_down in names:
        n = len(placement.for_block(_block_of(gate_up_down[0])))
        for m, form in zip(gate_up_down, forms):
            t = f.tensors[m]
            total += n * (t.n_elements // e * itemsize if form == "dequantized" else
                          device_quant.packed_nbytes(t.qtype, t.shape[1:], "keep",
                                                     k_mixed=form == "k_mixed"))
    return total


def relax_batch_invariance(device: jax.Device) -> None:
    """Let the host kernels take their size-dependent formula (on AMX: the tiles for every
    weight format from 16 tokens, 2.4x faster Q4_K experts at 256 tokens; docs/kernel-notes.md,
    "AMX cost of the batch-invariant default") when the step programs run on a GPU: XLA's
    GPU kernels are chosen by shape, so such a step is not batch-invariant anyway. An explicit
    KTJAX_BATCH_INVARIANT decides instead. The switch is process-wide (README)."""
    if device.platform == "gpu" and "KTJAX_BATCH_INVARIANT" not in os.environ:
        _native.set_batch_invariant(False)


def from_host(host, f, per_kind: list[list[str]], rules_file: str, n_blocks: int, dtype,
              device: jax.Device | None, platform: str, activation: ExpertActivation = SILU,
              bias_names: list[list[str] | None] = (None, None, None)):
    """The loader's hook for a stack's host experts (`host`: HostExperts; `per_kind`: the
    per-layer GGUF names of gate, up and down; the family's expert activation and bias names,
    as build takes them): a HybridExperts in GPU programs (`platform` "gpu") or where the
    rules file has an `experts:` section, else `host` unchanged."""
    # KTJAX_HOST_MOE_SYNC=1: the synchronous CUDA bridge instead (for before/after figures)
    sync = os.environ.get("KTJAX_HOST_MOE_SYNC", "0") == "1"
    relax_batch_invariance(device or jax.devices()[0])
    hybrid = build(host.handles, f, list(zip(*per_kind)), rules_file, n_blocks, dtype, device,
                   force=platform == "gpu" and not sync, activation=activation,
                   bias_names=bias_names)
    return host if hybrid is None else hybrid
