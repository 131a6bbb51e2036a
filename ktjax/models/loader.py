"""Turn a GGUF file into (config, params) for its family, checking every tensor against the
family's table: missing, unexpected or mis-shaped tensors are load errors naming the tensor."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax
import numpy as np

from ktjax.errors import TensorError
from ktjax.gguf import quants
from ktjax.gguf.reader import GGUFFile, TensorView
from ktjax.host import linear as host_linear
from ktjax.models.base import TensorSpec
from ktjax.models.layers import HostWeight
from ktjax.models.registry import family_for


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
    _check_tensors(f, table, config.n_layers)
    return ModelSpec(family, config, table)


def _names(spec: TensorSpec, n_layers: int) -> list[str]:
    if spec.per_layer:
        return [spec.gguf_name.format(i) for i in range(n_layers)]
    return [spec.gguf_name]


def _check_tensors(f: GGUFFile, table: dict[str, TensorSpec], n_layers: int) -> None:
    expected: set[str] = set()
    for spec in table.values():
        for name in _names(spec, n_layers):
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
    unexpected = sorted(set(f.tensors) - expected)
    if unexpected:
        raise TensorError(f"{f.path}: unexpected tensor(s) for architecture "
                          f"{f.architecture!r}: {', '.join(unexpected[:5])}")


def _dequantize(t: TensorView, dtype) -> np.ndarray:
    return quants.dequantize(t.data, t.qtype, t.shape, dtype=dtype)


def _pack_host(f: GGUFFile, names: list[str]) -> HostWeight:
    """Repack GGUF blocks into the native store (losslessly for quantized types)."""
    handles = tuple(host_linear.pack_gguf_weight(f.tensors[n].data, f.tensors[n].qtype,
                                                 f.tensors[n].shape) for n in names)
    return HostWeight(handles=handles, out_features=f.tensors[names[0]].shape[0])


def load_params(f: GGUFFile, spec: ModelSpec, dtype=np.float32,
                device: jax.Device | None = None, host_linears: bool = False) -> dict:
    """Dequantize every tensor of the table to `dtype` (norms and biases stay float32) and
    place it on `device`. Per-layer tensors are stacked into [n_layers, ...].

    host_linears=True (CPU runs) keeps every matmul weight in the native store instead, run by
    the host kernels; the embedding table stays dense for the lookup and, when tied, is also
    packed as the output head. Release the handles with `release_host_weights(params)`.
    """
    params: dict = {"layers": {}}
    for path, tspec in spec.table.items():
        names = [n for n in _names(tspec, spec.config.n_layers) if n in f.tensors]
        if not names:
            continue  # optional and absent
        target = params["layers"] if path.startswith("layers.") else params
        key = path.split(".", 1)[-1]
        if host_linears and len(tspec.shape) == 2 and key != "token_embd":
            target[key] = _pack_host(f, names)
            continue
        want = dtype if len(tspec.shape) >= 2 else np.float32
        arrays = [_dequantize(f.tensors[n], want) for n in names]
        value = np.stack(arrays) if tspec.per_layer else arrays[0]
        if tspec.per_layer and len(arrays) != spec.config.n_layers:
            raise TensorError(f"{f.path}: {tspec.gguf_name} exists for only "
                              f"{len(arrays)} of {spec.config.n_layers} layers")
        target[key] = jax.device_put(value, device)
    if host_linears and "output" not in params:
        params["output"] = _pack_host(f, [spec.table["token_embd"].gguf_name])
    return params


def release_host_weights(params: dict) -> None:
    for w in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, HostWeight)):
        if isinstance(w, HostWeight):
            for h in w.handles:
                host_linear.release(h)
