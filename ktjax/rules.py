"""Placement rules: which tensors live on the device (XLA) and which on the host (native
kernels through FFI), and in which format.

A rules file (YAML) is a list under `rules:`; each rule matches GGUF tensor names by regular
expression (`match`, full match), optionally only for some architectures (`architecture`: a
name or a list), and sets `placement` (device | host) and `format` (keep | bf16 | f32 | int8 |
int8_row | int4). First match wins.
`optional: true` lets a rule match nothing (profiles shared by several families).

What may go where follows the tensor's kind, which the family's table declares
(`TensorSpec.kind`): matrices and routed experts run on the device or in the host kernels;
embeddings, vectors and per-head weights (MLA's absorbed up-projections) only on the device.

Formats: `keep` = the GGUF blocks as they are (host: repacked losslessly; device: on a GPU a
matrix stays in its quantization, repacked losslessly into ktjax.device_quant's layout, and
other tensors, or any tensor in CPU programs, are dequantized to the engine's dtype);
bf16 / f32 = dense; int8 / int4 = requantized (quantized GGUF tensors are dequantized first):
the host kernels' packed formats, or device matrices as codes and group scales dequantized
inside the step's matmuls; int8_row = host only, one scale per row, which lets AMX accumulate
all of K in its tiles. Vectors (norms, biases) are always float32 on the device. A tied
output head is placed by the rule matching `output.weight`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ktjax.errors import RulesError
from ktjax.gguf.reader import GGUFFile
from ktjax.models.base import TensorSpec

PLACEMENTS = ("device", "host")
FORMATS = ("keep", "bf16", "f32", "int8", "int8_row", "int4")
HOST_ONLY_FORMATS = ("int8_row",)
# Formats the device holds only for matrices (ktjax.device_quant's QuantMatrix).
DEVICE_MATRIX_FORMATS = ("int8", "int4")
# Device platforms whose programs can call the host kernels (GPU: through the CUDA bridge).
HOST_KERNEL_PLATFORMS = ("cpu", "gpu")
# The tensor kinds (TensorSpec.kind) the host kernels run: the linear and the fused MoE kernel.
HOST_KINDS = ("matrix", "experts")
_RULE_KEYS = {"name", "match", "architecture", "placement", "format", "optional"}
_DIR_CANDIDATES = (Path(__file__).parent / "_rules",          # installed wheel
                   Path(__file__).resolve().parents[1] / "rules")  # source checkout


@dataclass(frozen=True)
class Rule:
    source: str
    index: int
    name: str
    pattern: re.Pattern
    architectures: tuple[str, ...] | None
    placement: str
    format: str
    optional: bool

    def __str__(self) -> str:
        return f"{self.source} rule {self.index} ({self.name!r})"


@dataclass(frozen=True)
class Decision:
    placement: str
    format: str
    rule: Rule


def rules_dir() -> Path:
    for d in _DIR_CANDIDATES:
        if d.is_dir():
            return d
    raise RulesError("the rules/ directory is not installed")


def rules_path(name_or_path: str | Path) -> Path:
    """A rules file path, or a profile name from rules/ ('cpu', 'device', 'qwen3moe', ...)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RulesError(f"rules file {p} does not exist")
        return p
    q = rules_dir() / f"{name_or_path}.yaml"
    if not q.is_file():
        names = sorted(x.stem for x in rules_dir().glob("*.yaml"))
        raise RulesError(f"no rules profile {name_or_path!r}; profiles: {', '.join(names)}")
    return q


def profiles() -> list[tuple[str, str]]:
    """(name, description) of every profile in rules/."""
    out = []
    for path in sorted(rules_dir().glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RulesError(f"{path}: not valid YAML: {e}") from e
        about = doc.get("description", "") if isinstance(doc, dict) else ""
        out.append((path.stem, " ".join(str(about).split())))
    return out


def rules_for(architecture: str, platform: str, rules: str | os.PathLike | None = None,
              host_linears: bool | None = None) -> Path:
    """The rules file that places a model: `rules` (a file or profile name) when given; the
    shorthand `host_linears` (True: the CPU-only profile, False: all on the device); else
    the default: on CPU the CPU-only profile, elsewhere the family's profile or all-device."""
    if rules is not None and host_linears is not None:
        raise RulesError("pass either rules or host_linears, not both")
    if rules is not None:
        return rules_path(rules)
    if host_linears is not None:
        return rules_path("cpu" if host_linears else "device")
    if platform == "cpu":
        return rules_path("cpu")
    family = rules_dir() / f"{architecture}.yaml"
    return family if family.is_file() else rules_path("device")


def place(f: GGUFFile, table: dict[str, TensorSpec], n_layers: int,
          rules: str | os.PathLike, platform: str) -> dict[str, Decision]:
    """Table path -> Decision for every tensor of the model, by a rules file or profile."""
    return resolve(load_rules(rules), f, table, n_layers, platform)


def load_rules(name_or_path: str | Path) -> list[Rule]:
    path = rules_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RulesError(f"{path}: not valid YAML: {e}") from e
    # `experts:` splits host experts with the device (read by ktjax.hybrid_experts)
    if not isinstance(doc, dict) or set(doc) - {"description", "rules", "experts"} or \
            not isinstance(doc.get("rules"), list):
        raise RulesError(f"{path}: expected a mapping with a `rules:` list "
                         "(and optionally `description:` and `experts:`)")
    return [_parse_rule(str(path), i, r) for i, r in enumerate(doc["rules"])]


def _parse_rule(source: str, index: int, r) -> Rule:
    where = f"{source} rule {index}"
    if not isinstance(r, dict):
        raise RulesError(f"{where}: expected a mapping, got {r!r}")
    where += f" ({r.get('name', r.get('match'))!r})"
    unknown = set(r) - _RULE_KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(_RULE_KEYS))}")
    for key in ("match", "placement", "format"):
        if key not in r:
            raise RulesError(f"{where}: missing `{key}`")
    if r["placement"] not in PLACEMENTS:
        raise RulesError(f"{where}: placement {r['placement']!r} is not one of {PLACEMENTS}")
    if r["format"] not in FORMATS:
        raise RulesError(f"{where}: format {r['format']!r} is not one of {FORMATS}")
    try:
        pattern = re.compile(str(r["match"]))
    except re.error as e:
        raise RulesError(f"{where}: bad regular expression {r['match']!r}: {e}") from e
    arch = r.get("architecture")
    return Rule(source, index, str(r.get("name", r["match"])), pattern,
                None if arch is None else tuple([arch] if isinstance(arch, str) else arch),
                r["placement"], r["format"], bool(r.get("optional", False)))


def resolve(rules: list[Rule], f: GGUFFile, table: dict[str, TensorSpec], n_layers: int,
            platform: str) -> dict[str, Decision]:
    """Table path -> Decision for every tensor of the model (first matching rule), checked:
    every tensor placed, every non-optional rule used, placements possible on `platform`,
    one decision for all layers of a parameter and for the expert matrices of a stack (the
    loader packs them as one expert set)."""
    rules = [r for r in rules if r.architectures is None or f.architecture in r.architectures]
    used: set[Rule] = set()
    out: dict[str, Decision] = {}
    for path, spec in table.items():
        names = spec.names(n_layers)
        names = [n for n in names if n in f.tensors or path == "output"]  # tied head
        if not names:
            continue
        chosen: dict[Rule, str] = {}
        for name in names:
            rule = next((r for r in rules if r.pattern.fullmatch(name)), None)
            if rule is None:
                raise RulesError(f"tensor {name!r} is placed nowhere: no rule of "
                                 f"{rules[0].source if rules else 'the rules'} matches it")
            chosen.setdefault(rule, name)
        if len(chosen) > 1:
            (r1, n1), (r2, n2) = list(chosen.items())[:2]
            raise RulesError(f"{path}: {n1!r} is placed by {r1} but {n2!r} by {r2}; every "
                             "layer of a parameter needs the same placement and format")
        rule = next(iter(chosen))
        used.add(rule)
        out[path] = _decide(rule, spec.kind, names[0], platform)
    for stack in {p.rpartition(".")[0] for p in out if table[p].kind == "experts"}:
        experts = [p for p in out if table[p].kind == "experts" and p.startswith(stack + ".")]
        if len({(out[p].placement, out[p].format) for p in experts}) > 1:
            raise RulesError("the routed experts' gate, up and down matrices must share one "
                             "placement and format: " +
                             ", ".join(f"{p} by {out[p].rule}" for p in experts))
    for r in rules:
        if r not in used and not r.optional and not any(
                r.pattern.fullmatch(n) for n in f.tensors):
            raise RulesError(f"{r} matches no tensor of this {f.architecture} model "
                             "(mark it `optional: true` if that is intended)")
    return out


def _decide(rule: Rule, kind: str, name: str, platform: str) -> Decision:
    if rule.placement == "host" and kind not in HOST_KINDS:
        raise RulesError(f"{rule} places {name!r} ({kind}) on the host, which has no kernel "
                         f"for it; only matrices and routed experts run on the host")
    if rule.placement == "host" and platform not in HOST_KERNEL_PLATFORMS:
        raise RulesError(f"{rule} places {name!r} on the host, but host kernels are reached "
                         f"only from CPU and CUDA GPU programs (device platform: {platform})")
    if rule.placement == "host" and rule.format == "f32":
        raise RulesError(f"{rule}: the host kernels hold keep, bf16, int8, int8_row or int4, "
                         "not f32")
    if rule.placement == "device" and rule.format in HOST_ONLY_FORMATS and kind != "vector":
        raise RulesError(f"{rule}: format {rule.format} needs the host kernels; device "
                         "tensors are keep, bf16, f32, or int8 / int4 for matrices")
    if rule.placement == "device" and rule.format in DEVICE_MATRIX_FORMATS and \
            kind not in ("matrix", "vector"):
        raise RulesError(f"{rule} places {name!r} ({kind}) on the device in {rule.format}, "
                         "which the device holds only for matrices; place it keep, bf16 "
                         "or f32 (a rule before this one)")
    return Decision(rule.placement, rule.format, rule)
