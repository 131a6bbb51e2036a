"""manifest.json of an artifact folder: what the artifacts were made from and for (identity
fields), and the files they hold with their sizes and digests. Read as untrusted input:
bounded in size, every field type-checked."""
from __future__ import annotations

import json
import os
from typing import Any

from ktjax.errors import ArtifactError, ArtifactMismatchError

FORMAT = 2   # 2: scoring programs also return the most likely token
NAME = "manifest.json"
MAX_BYTES = 16 << 20

# identity sections compared at load, field by field
IDENTITY = ("model", "placement", "engine", "software", "machine")


def write(folder: str, manifest: dict) -> None:
    tmp = os.path.join(folder, NAME + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, NAME))


def read(folder: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(folder), NAME)
    if not os.path.isfile(path):
        raise ArtifactError(f"{folder}: no {NAME}; not a ktjax artifact folder "
                            "(make one with `ktjax export`)")
    if os.path.getsize(path) > MAX_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {m.get('format') if isinstance(m, dict) else '?'}"
                            f", this ktjax reads format {FORMAT}")
    for key in IDENTITY + ("weights", "programs"):
        if not isinstance(m.get(key), dict):
            raise ArtifactError(f"{path}: the field {key!r} is missing or not an object")
    if not isinstance(m.get("ffi_targets"), list):
        raise ArtifactError(f"{path}: the field 'ffi_targets' is missing or not a list")
    m.setdefault("moe_sites", [])    # [[site, tokens, hidden, top_k, [handles]], ...]
    if not isinstance(m["moe_sites"], list) or not all(
            isinstance(e, list) and len(e) == 5 and isinstance(e[4], list) and
            all(is_int(x) for x in (*e[:4], *e[4])) for e in m["moe_sites"]):
        raise ArtifactError(f"{path}: the field 'moe_sites' is malformed")
    return m


def is_int(v: Any) -> bool:
    """A JSON integer (bool is an int in Python, not in the file)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def mismatches(recorded: dict, current: dict) -> list[str]:
    """'section.field: artifacts X, here Y' for every identity field that differs. CPU
    features: the exported programs may use any recorded feature, so each must be present here
    (more is fine)."""
    out = []
    for section in IDENTITY:
        rec, cur = recorded.get(section, {}), current[section]
        for field in sorted(set(rec) | set(cur)):
            a, b = rec.get(field), cur.get(field)
            if section == "machine" and field == "cpu_features":
                missing = sorted(set(a or []) - set(b or [])) if isinstance(a, list) else a
                if missing:
                    out.append(f"machine.cpu_features: this CPU lacks {_show(missing)}, which the "
                               "exported programs may use")
                continue
            if section == "machine" and field == "isa":
                continue  # follows from cpu_features; kernels dispatch at run time
            if a != b:
                out.append(f"{section}.{field}: artifacts {_show(a)}, here {_show(b)}")
    return out


def check(recorded: dict, current: dict, folder: str) -> None:
    problems = mismatches(recorded, current)
    if problems:
        raise ArtifactMismatchError(
            f"{folder}: the artifacts do not fit this load ({len(problems)} mismatch"
            f"{'es' if len(problems) > 1 else ''}): " + "; ".join(problems)
            + ". Export again (`ktjax export`), or load with fallback='compile'.")
