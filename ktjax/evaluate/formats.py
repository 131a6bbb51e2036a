"""Multiple-choice data sets read into one form, with lm-evaluation-harness's prompts.

Each reader turns a record of a published file into an Item: the context, the choices (each
scored as `context + " " + choice`), the index of the right one. The prompts are the
harness's default tasks (hellaswag, arc_easy / arc_challenge, mmlu zero-shot), so scores
compare with its numbers for the same model.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ktjax.errors import KtjaxError

FORMATS = ("choices", "hellaswag", "arc", "mmlu")


class DataError(KtjaxError):
    """A record of an evaluation file that cannot be read (names the file and line)."""


@dataclass
class Item:
    id: str
    context: str
    choices: list[str]
    gold: int


def _native(doc: dict) -> tuple[str, list[str], int]:
    return doc["context"], doc["choices"], doc["gold"]


def _hellaswag_text(text: str) -> str:
    # the harness's preprocess: WikiHow's "[title]" markers become sentence ends, other
    # bracketed tags go
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> tuple[str, list[str], int]:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return (_hellaswag_text(doc["activity_label"] + ": " + ctx),
            [_hellaswag_text(e) for e in doc["endings"]], int(doc["label"]))


def _arc(doc: dict) -> tuple[str, list[str], int]:
    q = doc["question"]
    if isinstance(q, dict):   # AI2's own files: {"question": {"stem", "choices": [...]}}
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
        q = q["stem"]
    else:                     # Hugging Face's allenai/ai2_arc: choices {"text": [], "label": []}
        texts, labels = doc["choices"]["text"], doc["choices"]["label"]
    return f"Question: {q}\nAnswer:", texts, labels.index(doc["answerKey"])


def _mmlu(doc: dict) -> tuple[str, list[str], int]:
    subject = doc.get("subject", "").replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    options = "".join(f"{letter}. {c.strip()}\n" for letter, c in zip("ABCD", doc["choices"]))
    answer = doc["answer"]
    gold = "ABCD".index(answer) if isinstance(answer, str) else int(answer)
    return f"{head}{doc['question'].strip()}\n{options}Answer:", ["A", "B", "C", "D"], gold


_READERS: dict[str, Callable[[dict], tuple[str, list[str], int]]] = {
    "choices": _native, "hellaswag": _hellaswag, "arc": _arc, "mmlu": _mmlu}


def _mmlu_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """The original MMLU files: `question,A,B,C,D,answer` rows, the subject in the file name
    (`abstract_algebra_test.csv`)."""
    subject = re.sub(r"_(test|val|dev)$", "", path.stem)
    with path.open(newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise DataError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, "
                                f"answer), got {len(row)}")
            yield n, {"question": row[0], "choices": row[1:5], "answer": row[5].strip(),
                      "subject": subject}


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON: {e}") from e
            if not isinstance(doc, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            yield n, doc


def read_items(path: str | Path, fmt: str = "choices", limit: int | None = None) -> list[Item]:
    """The items of a JSONL file (or, for mmlu, also the original CSV) in format `fmt`."""
    if fmt not in _READERS:
        raise DataError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = _mmlu_csv(path) if fmt == "mmlu" and path.suffix == ".csv" else _jsonl(path)
    items = []
    for n, doc in records:
        try:
            context, choices, gold = _READERS[fmt](doc)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}:{n}: not a {fmt} record ({type(e).__name__}: {e})") from e
        if not isinstance(context, str) or not isinstance(choices, list) or \
                not choices or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{path}:{n}: needs a string context and a list of non-empty "
                            "string choices")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{path}:{n}: gold must index the {len(choices)} choices, "
                            f"got {gold!r}")
        items.append(Item(str(doc.get("id", n)), context, choices, gold))
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no records")
    return items
