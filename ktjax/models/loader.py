"""Turn a GGUF file into (config, params) for its family, checking every tensor against the
family's table: missing, unexpected or mis-shaped tensors are load errors naming the tensor."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ktjax import device_quant
from ktjax.errors import TensorError
from ktjax.expert_activation import SILU, ExpertActivation
from ktjax.gguf import quants
from ktjax.gguf.reader import GGUFFile, TensorView
from ktjax.host import linear as host_linear
from ktjax.host import moe as host_moe
from ktjax.models.base import TensorSpec
from ktjax.models.moe import EXPERT_KEYS, EXPERTS
from ktjax.models.registry import family_for
from ktjax.weights import (FUSIBLE_PROJECTIONS, DeviceExperts, HostExperts, HostWeight,
                           LayerStack, fused_name, host_handles)

if TYPE_CHECKING:  # decisions come from ktjax.rules, which reads the family tables
    from ktjax.rules import Decision


@dataclass(frozen=True)
class ModelSpec:
    """What a GGUF file says about its model, before any weight is converted."""

    family: ModuleType
    config: Any
    table: dict[str, TensorSpec]


def inspect(f: GGUFFile) -> ModelSpec:
    family = family_for(f.architecture)
    config = family.CONFIG.from_gguf(f)
    table = family.tensor_table(config)
    # tensors a family knowingly leaves unloaded (multi-token-prediction layers)
    ignored = family.ignored_tensors(config, f) if hasattr(family, "ignored_tensors") else set()
    _check_tensors(f, table, config.n_layers, ignored)
    return ModelSpec(family, config, table)


def _check_tensors(f: GGUFFile, table: dict[str, TensorSpec], n_layers: int,
                   ignored: set[str] = frozenset()) -> None:
    expected: set[str] = set()
    for spec in table.values():
        # Metadata that derives a dimension of 0 or less (a zero FFN width, key_length below
        # the rotary dims) names no real tensor, whatever the file holds.
        if any(not isinstance(d, int) or d <= 0 for d in spec.shape):
            raise TensorError(f"{f.path}: the metadata gives tensor {spec.gguf_name!r} the "
                              f"shape {spec.shape}; every dimension must be positive")
        for name in spec.names(n_layers):
            expected.add(name)
            t = f.tensors.get(name)
            if t is None:
                if spec.optional:
                    continue
                raise TensorError(f"{f.path}: required tensor {name!r} is missing")
            if t.shape != spec.shape:
                raise TensorError(f"{f.path}: tensor {name!r} has shape {t.shape}, "
                                  f"expected {spec.shape} from the metadata")
            if t.qtype not in quants.SUPPORTED_QTYPES:
                raise TensorError(f"{f.path}: tensor {name!r} uses quant type {t.qtype.name}, "
                                  "which ktjax does not support")
    unexpected = sorted(set(f.tensors) - expected - ignored)
    if unexpected:
        raise TensorError(f"{f.path}: unexpected tensor(s) for architecture "
                          f"{f.architecture!r}: {', '.join(unexpected[:5])}")


def _dequantize(t: TensorView, dtype) -> np.ndarray:
    return quants.dequantize(t.data, t.qtype, t.shape, dtype=dtype)


_FLOAT_QTYPES = ("F32", "F16", "BF16")
_DEVICE_DTYPES = {"bf16": jnp.bfloat16, "f32": np.float32}


def _pack_host(f: GGUFFile, names: list[str], fmt: str = "keep") -> HostWeight:
    """Repack GGUF blocks into the native store: `keep` losslessly (float types as int8),
    else converted to `fmt`."""
    def pack(t: TensorView) -> int:
        if fmt == "keep" or t.qtype.name in _FLOAT_QTYPES:
            return host_linear.pack_gguf_weight(t.data, t.qtype, t.shape,
                                                "int8" if fmt == "keep" else fmt)
        return host_linear.pack_float_weight(_dequantize(t, np.float32), fmt)
    return HostWeight(handles=tuple(pack(f.tensors[n]) for n in names),
                      out_features=f.tensors[names[0]].shape[0])


def expert_bias_names(spec: "ModelSpec", stack: str) -> list[list[str] | None]:
    """Per projection (gate, up, down), the per-layer GGUF names of the routed experts'
    biases [E, rows] (table keys `<stack>.ffn_*_exps_bias`, gpt-oss), or None without."""
    n = spec.config.n_layers
    return [spec.table[f"{stack}.{k}_bias"].names(n) if f"{stack}.{k}_bias" in spec.table
            else None for k in EXPERT_KEYS]


def expert_activation(spec: "ModelSpec") -> ExpertActivation:
    """The family's expert activation (its module's EXPERT_ACTIVATION; SiLU by default)."""
    return getattr(spec.family, "EXPERT_ACTIVATION", SILU)


def _pack_experts(f: GGUFFile, spec: "ModelSpec", stack: str, fmt: str) -> HostExperts:
    """One native expert set per layer of `stack` from the layer's ffn_{gate,up,down}_exps,
    with the family's activation and the layer's expert biases stored with it."""
    handles = []
    per_kind = [spec.table[f"{stack}.{k}"].names(spec.config.n_layers) for k in EXPERT_KEYS]
    bias_names = expert_bias_names(spec, stack)
    activation = expert_activation(spec)
    for layer, names in enumerate(zip(*per_kind)):
        ts = [f.tensors[n] for n in names]
        e, inter, hidden = ts[0].shape
        biases = tuple(None if b is None else _dequantize(f.tensors[b[layer]], np.float32)
                       for b in bias_names)
        if fmt == "keep" or all(t.qtype.name in _FLOAT_QTYPES for t in ts):
            handles.append(host_moe.pack_experts_gguf(
                *((t.data, int(t.qtype)) for t in ts), e, hidden, inter,
                "int8" if fmt == "keep" else fmt, activation, biases))
        else:
            handles.append(host_moe.pack_experts_float(
                *(_dequantize(t, np.float32) for t in ts), fmt, activation, biases))
    return HostExperts(handles=tuple(handles))


def _pack_host_fused(f: GGUFFile, per_layer: list[list[str]]) -> HostWeight:
    """Several projections of one input as one weight: their GGUF rows concatenated (same
    quant type, so the blocks concatenate byte for byte)."""
    handles = []
    for names in per_layer:
        ts = [f.tensors[n] for n in names]
        raw = np.concatenate([t.data.reshape(t.shape[0], -1) for t in ts])
        handles.append(host_linear.pack_gguf_weight(raw, ts[0].qtype,
                                                    (raw.shape[0], ts[0].shape[1])))
    splits = tuple(f.tensors[n].shape[0] for n in per_layer[0])
    return HostWeight(handles=tuple(handles), out_features=sum(splits), splits=splits)


def _fusible_groups(f: GGUFFile, spec: ModelSpec, host_keep: set[str]
                    ) -> dict[str, list[list[str]]]:
    """Fused param name -> per-layer GGUF names, for groups whose members share a quant type
    in every layer."""
    groups = {}
    for members in FUSIBLE_PROJECTIONS:
        tspecs = [spec.table.get(f"layers.{m}") for m in members]
        if any(t is None for t in tspecs) or \
                any(f"layers.{m}" not in host_keep for m in members):
            continue
        per_layer = [list(names) for names in
                     zip(*(t.names(spec.config.n_layers) for t in tspecs))]
        if all(len({f.tensors[n].qtype for n in names}) == 1 for names in per_layer):
            groups[fused_name(members)] = per_layer
    return groups


def keeps_quantized(platform: str) -> bool:
    """Whether format `keep` leaves a device matrix in its GGUF quantization (GPUs: the
    default) rather than dequantizing it (CPU programs, whose device matrices are few)."""
    return platform != "cpu"


def device_quantized(f: GGUFFile, names: list[str], fmt: str, keep_quantized: bool) -> bool:
    """Whether a device matrix (all its layers) becomes a QuantMatrix: formats int8 / int4
    always; keep when every layer has one quant type that has a packed layout, or the layers
    mix K-quants (held in their common 8-bit layout); other types are dequantized to the
    engine dtype."""
    if fmt in device_quant.QUANT_FORMATS:
        return True
    qtypes = {f.tensors[n].qtype for n in names}
    return fmt == "keep" and keep_quantized and (
        (len(qtypes) == 1 and next(iter(qtypes)) in device_quant.KEEP_QTYPES) or
        qtypes <= set(device_quant.K_MIX_QTYPES))


def _load_quant(f: GGUFFile, names: list[str], fmt: str, stacked: bool,
                device: jax.Device | None) -> device_quant.QuantMatrix:
    """A device matrix as codes and scales (ktjax.device_quant), layers stacked."""
    mixed = len({f.tensors[n].qtype for n in names}) > 1

    def pack(t: TensorView):
        if fmt == "keep" and mixed:
            return device_quant.widen_to_k8(device_quant.pack_gguf(t.data, t.qtype, t.shape),
                                            *t.shape)
        if fmt == "keep":
            return device_quant.pack_gguf(t.data, t.qtype, t.shape)
        w = _dequantize(t, np.float32)
        return device_quant.quantize_int8(w) if fmt == "int8" else \
            device_quant.quantize_int4(w)
    try:
        return device_quant.stack_to_device([pack(f.tensors[n]) for n in names], fmt, stacked,
                                            device)
    except TensorError as e:
        raise TensorError(f"{f.path}: {names[0]}: {e}") from e


def _fuse_quant_projections(stack: dict) -> None:
    """Projections of one input that are all QuantMatrix of one layout become one (as the
    host weights fuse theirs): one matmul kernel per group in a step instead of several."""
    for members in FUSIBLE_PROJECTIONS:
        mats = [stack.get(m) for m in members]
        if not all(isinstance(m, device_quant.QuantMatrix) for m in mats):
            continue
        fused = device_quant.concat_rows(mats)
        if fused is not None:
            for m in members:
                del stack[m]
            stack[fused_name(members)] = fused


def load_params(f: GGUFFile, spec: ModelSpec, placement: Mapping[str, "Decision"],
                dtype=np.float32, device: jax.Device | None = None,
                keep_quantized: bool | None = None, platform: str | None = None) -> dict:
    """Place every tensor of the table as `placement` (ktjax.rules.place) says: device
    matrices in int8 / int4, or in format keep on a GPU (`keep_quantized`, default: not on
    CPU), as QuantMatrix codes and scales; other device tensors dequantized to `dtype`
    (format keep) or the rule's bf16/f32 (vectors stay float32) on `device`, stacked per
    layer into [n_layers, ...]; host tensors repacked into the native store (HostWeight),
    run by the host kernels through FFI. A stack's routed
    experts become one expert set under moe.EXPERTS (HostExperts or DeviceExperts). A tied
    output head placed on the host, or quantized on the device, is packed from the
    embedding. Release the handles with `release_host_weights`.

    `platform` is the one the step programs are compiled for (default: `device`'s; another
    value lets a CPU-only machine build, and lower, a GPU program's params). It alone decides
    the platform-specific forms: LayerStack (host kernel target, CPU programs only) and the
    stream-ordered HybridExperts (every GPU program's host experts).
    """
    params: dict = {"layers": {}}
    platform = platform or (device or jax.devices()[0]).platform
    if keep_quantized is None:
        keep_quantized = keeps_quantized(platform)
    fused = _fusible_groups(f, spec, {p for p, d in placement.items()
                                      if d.placement == "host" and d.format == "keep"})
    for name, per_layer in fused.items():
        params["layers"][name] = _pack_host_fused(f, per_layer)
    members = {m for name in fused for m in name.split("+")}
    for path, tspec in spec.table.items():
        expected = tspec.names(spec.config.n_layers)
        names = [n for n in expected if n in f.tensors]
        if not names:
            continue  # optional and absent
        stack, _, key = path.rpartition(".")  # per-layer paths are "<stack>.<param>"
        target = params.setdefault(stack, {}) if stack else params
        if stack == "layers" and key in members:
            continue  # packed above as part of a fused weight
        d = placement[path]
        if tspec.kind == "experts":
            if key == EXPERT_KEYS[0]:  # rules gave gate, up and down one decision
                target[EXPERTS] = _pack_experts(f, spec, stack, d.format) \
                    if d.placement == "host" else \
                    DeviceExperts(*(_load_device(f, spec, f"{stack}.{k}", d.format, dtype,
                                                 device) for k in EXPERT_KEYS))
                if d.placement == "host":  # part on the device / stream-ordered on GPUs
                    from ktjax import hybrid_experts  # MoE only (see weights._hybrid)
                    target[EXPERTS] = hybrid_experts.from_host(
                        target[EXPERTS], f, [spec.table[f"{stack}.{k}"].names(
                            spec.config.n_layers) for k in EXPERT_KEYS],
                        d.rule.source, spec.config.n_layers, dtype, device, platform,
                        expert_activation(spec), expert_bias_names(spec, stack))
            continue
        if d.placement == "host":
            target[key] = _pack_host(f, names, d.format)
            continue
        if tspec.kind == "matrix" and device_quantized(f, names, d.format, keep_quantized):
            target[key] = _load_quant(f, names, d.format, tspec.per_layer, device)
            continue
        value = _load_device(f, spec, path, d.format, dtype, device)
        if tspec.per_layer and tspec.kind in ("matrix", "per_head") and platform == "cpu":
            # read in place by the host kernel (ktjax_stacked_matvec: no CUDA handler)
            value = LayerStack(value)
        target[key] = value
    for stack in [v for v in params.values() if isinstance(v, dict)]:
        _fuse_quant_projections(stack)
    head = placement.get("output")
    embd = [spec.table["token_embd"].gguf_name]
    if "output" not in params and head is not None and head.placement == "host":
        params["output"] = _pack_host(f, embd, head.format)
    elif "output" not in params and head is not None and \
            device_quantized(f, embd, head.format, keep_quantized):
        params["output"] = _load_quant(f, embd, head.format, False, device)  # tied head
    return params


def _load_device(f: GGUFFile, spec: ModelSpec, path: str, fmt: str, dtype,
                 device: jax.Device | None) -> jax.Array:
    """A tensor dequantized for the device (vectors float32, matrices `dtype` or the rule's
    bf16/f32), its layers stacked into [n_layers, ...]."""
    tspec = spec.table[path]
    expected = tspec.names(spec.config.n_layers)
    names = [n for n in expected if n in f.tensors]
    want = np.float32 if len(tspec.shape) == 1 else _DEVICE_DTYPES.get(fmt, dtype)
    arrays = [_dequantize(f.tensors[n], want) for n in names]
    if len(arrays) != len(expected):
        raise TensorError(f"{f.path}: {tspec.gguf_name} exists for only "
                          f"{len(arrays)} of {len(expected)} layers")
    return jax.device_put(np.stack(arrays) if tspec.per_layer else arrays[0], device)


def release_host_weights(params: dict) -> None:
    for h in host_handles(params):
        host_linear.release(h)
