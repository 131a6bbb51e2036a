"""Frozen dataclasses that are JAX pytrees: `@pytree.dataclass`, with `pytree.field(
pytree_node=False)` for static fields (part of the tree's structure, not leaves) and a
`replace(**changes)` method -- the subset of flax.struct ktjax uses, without importing flax,
whose import (linen, rich, pallas) cost a quarter of a warm start's second
(docs/kernel-notes.md, "Start-up from artifacts")."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import jax

T = TypeVar("T")


def field(pytree_node: bool = True, **kwargs: Any) -> Any:
    """A dataclass field; pytree_node=False makes it static metadata of the tree."""
    metadata = {**kwargs.pop("metadata", {}), "pytree_node": pytree_node}
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self, **changes):
    """A copy with `changes` applied (the class is frozen)."""
    return dataclasses.replace(self, **changes)


def dataclass(cls: type[T] | None = None, **kwargs: Any) -> type[T] | Callable[[type[T]], type[T]]:
    """`dataclasses.dataclass(frozen=True, **kwargs)` registered as a pytree whose leaves are
    the fields not marked pytree_node=False."""
    if cls is None:
        return lambda c: dataclass(c, **kwargs)
    kwargs.setdefault("frozen", True)
    cls = dataclasses.dataclass(**kwargs)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if f.metadata.get("pytree_node", True)]
    meta = [f.name for f in fields if not f.metadata.get("pytree_node", True)]
    cls.replace = _replace
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls
