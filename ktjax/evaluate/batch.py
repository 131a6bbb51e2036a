"""`ktjax batch`: every request of a JSONL file through continuous batching, results in order.

A request line is a JSON object with `prompt` (text) or `messages` (a chat, rendered with the
model's template), optionally `id` (default: the line number) and any SamplingParams field
(the command's sampling options are the defaults). A result line is
`{"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}` (with `logprobs` when
asked), or `{"id", "error"}` for a request that could not run: a bad line is recorded, never
fatal. Results are written in input order as soon as every earlier one is done, so a run cut
short is resumed by running it again: ids already in the output are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from tqdm.auto import tqdm

from ktjax.engine.interrupts import deferred_interrupts
from ktjax.engine.sequence import Sequence
from ktjax.errors import KtjaxError, RequestError
from ktjax.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_FIELDS = {"id", "prompt", "messages"} | _SAMPLING_FIELDS


@dataclass
class Summary:
    done: int = 0             # results written this run (errors included)
    errors: int = 0
    skipped: int = 0          # ids already in the output
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Pending:
    """One input line on its way to the output: an error already, or a running request."""

    id: object
    error: str | None = None
    seq: Sequence | None = None

    @property
    def ready(self) -> bool:
        return self.error is not None or (self.seq is not None and self.seq.finished)

    def record(self) -> dict:
        if self.error is not None:
            return {"id": self.id, "error": self.error}
        s = self.seq
        if s.finish_reason == "abort":
            return {"id": self.id, "error": "the request was aborted (a failed step)"}
        out = {"id": self.id, "text": s.text, "finish_reason": s.finish_reason,
               "prompt_tokens": len(s.prompt_ids), "completion_tokens": len(s.output_ids)}
        if s.params.logprobs:
            out["logprobs"] = list(s.logprobs)
        return out


def done_ids(out_path: Path) -> set:
    """Ids of the results already in `out_path`. A last line cut off mid-write (the run was
    killed) is dropped from the file, so appending continues on a line of its own."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with out_path.open("r+b") as f:
            f.truncate(len(data))
    ids = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            ids.add(_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KtjaxError(f"{out_path}:{n}: not a result line of ktjax batch ({e}); "
                             "use another output file") from e
    return ids


def _key(request_id) -> str:
    """Ids compare by their JSON text, so 7 and "7" stay different requests."""
    return json.dumps(request_id)


def parse_line(llm, line: str, line_no: int, defaults: SamplingParams,
               chat_prompt: Callable[[list[dict]], list[int]]
               ) -> tuple[object, list[int], SamplingParams, str | None]:
    """(id, prompt token ids, params, prompt text) of a request line; RequestError if bad."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise RequestError(f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RequestError("a request line must be a JSON object")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; a request has prompt or "
                           "messages, id, and SamplingParams fields")
    fields = {k: v for k, v in doc.items() if k in _SAMPLING_FIELDS}
    if "stop" in fields and isinstance(fields["stop"], list):
        fields["stop"] = tuple(fields["stop"])
    params = dataclasses.replace(defaults, **fields)
    if ("prompt" in doc) == ("messages" in doc):
        raise RequestError("a request needs exactly one of prompt and messages")
    if "prompt" in doc:
        if not isinstance(doc["prompt"], str) or not doc["prompt"]:
            raise RequestError("prompt must be a non-empty string")
        return doc.get("id", line_no), llm.tokenizer.encode(doc["prompt"]), params, doc["prompt"]
    return doc.get("id", line_no), chat_prompt(doc["messages"]), params, None


def _line_id(line: str, line_no: int) -> object:
    """The id of a request line, even when the rest of it is bad (for its error record)."""
    try:
        doc = json.loads(line)
        return doc.get("id", line_no) if isinstance(doc, dict) else line_no
    except json.JSONDecodeError:
        return line_no


def run_batch(llm, in_path: str | os.PathLike, out_path: str | os.PathLike,
              defaults: SamplingParams, progress: bool = True,
              chat_prompt: Callable[[list[dict]], list[int]] | None = None,
              log: TextIO = sys.stderr, on_step: Callable[[], None] | None = None) -> Summary:
    """Run every request of `in_path` not yet in `out_path`, appending results in input order.
    `chat_prompt` renders a request's messages (default: llm.chat_prompt); `on_step` runs
    after each engine step."""
    chat_prompt = chat_prompt or llm.chat_prompt
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise KtjaxError(f"{in_path}: no such file")
    seen = done_ids(out_path)
    summary = Summary()
    pending: list[_Pending] = []
    ids_this_run = set()
    engine = llm.engine
    with llm._lock:
        with in_path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rid = _line_id(line, n)
                key = _key(rid)
                if key in seen:
                    summary.skipped += 1
                    continue
                if key in ids_this_run:
                    pending.append(_Pending(rid, error=f"line {n}: id {key} is used by an "
                                                       "earlier line"))
                    continue
                ids_this_run.add(key)
                try:
                    rid, ids, params, text = parse_line(llm, line, n, defaults, chat_prompt)
                    with deferred_interrupts():
                        pending.append(_Pending(rid, seq=engine.add_request(ids, params, text)))
                except (KtjaxError, TypeError, ValueError) as e:
                    pending.append(_Pending(rid, error=f"line {n}: {e}"))
        bar = tqdm(total=len(pending), unit="req", desc="batch", file=log, disable=not progress,
                   dynamic_ncols=True)
        if summary.skipped:
            bar.write(f"resuming: {summary.skipped} request(s) already in {out_path}", file=log)
        t0 = time.perf_counter()
        next_out = 0
        try:
            with out_path.open("a", encoding="utf-8") as out:
                engine.precompile()
                while True:
                    while next_out < len(pending) and pending[next_out].ready:
                        record = pending[next_out].record()
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                        summary.done += 1
                        summary.errors += "error" in record
                        summary.completion_tokens += record.get("completion_tokens", 0)
                        next_out += 1
                        bar.update(1)
                    out.flush()
                    if not engine.has_work():
                        break
                    elapsed = time.perf_counter() - t0
                    running = sum(len(s.output_ids) for s in engine.running)
                    bar.set_postfix_str(
                        f"{(summary.completion_tokens + running) / max(elapsed, 1e-9):.1f} tok/s",
                        refresh=False)
                    try:
                        engine.step()
                    except Exception as e:   # the step's requests are aborted; go on
                        bar.write(f"a step failed ({type(e).__name__}: {e}); its requests are "
                                  "recorded as errors", file=log)
                    if on_step:
                        on_step()
        except BaseException:
            engine.abort([p.seq for p in pending if p.seq is not None])
            raise
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - t0
    return summary
