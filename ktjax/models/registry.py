"""GGUF `general.architecture` -> model family (config class, tensor table, forward)."""
from __future__ import annotations

from types import ModuleType

from ktjax.errors import UnsupportedModelError
from ktjax.models import deepseek2, gemma3, glm4moe, gpt_oss, llama

_FAMILIES: dict[str, ModuleType] = {arch: m for m in (llama, gemma3, deepseek2, glm4moe, gpt_oss) for arch in m.ARCHITECTURES}


def family_for(architecture: str) -> ModuleType:
    """The module implementing `architecture`: it has CONFIG (a dataclass with `from_gguf`
    and `cache_spec`, its KVCacheSpec), `tensor_table(cfg)` (TensorSpecs declaring each
    tensor's kind) and `make_forward(cfg, backend)`."""
    if architecture not in _FAMILIES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} (general.architecture) is not supported; "
            f"supported: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[architecture]

