"""Batch evaluation: shared-context scoring, multiple-choice metrics and formats, `ktjax batch`
(order, errors, resuming), perplexity's protocol."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ktjax import SamplingParams
from ktjax.errors import RequestError
from ktjax.evaluate import choices as mc
from ktjax.evaluate.batch import run_batch
from ktjax.evaluate.formats import DataError, Item, read_items
from ktjax.evaluate.loglik import ContextRequest, score_continuations
from ktjax.evaluate.perplexity import perplexity

SAMPLE = Path(__file__).parent / "data" / "choices_sample.jsonl"


def _one_by_one(llm, req: ContextRequest) -> list[float]:
    """Today's way: each context + continuation scored as a sequence of its own."""
    return [float(llm.score(req.context + c)[-len(c):].sum()) for c in req.continuations]


def test_shared_context_scores_match_scoring_each_sequence(tiny_llm):
    """Contexts around page boundaries (16-token pages: 1, 16, 17, 33 tokens) and one longer
    than a prefill chunk (600 > 512) give each continuation the log-likelihood of scoring
    context + continuation alone; every KV page goes back to the pool."""
    engine = tiny_llm.engine
    rng = np.random.default_rng(0)
    vocab = tiny_llm.config.vocab_size
    shapes = [(1, [1, 4]), (16, [2, 2, 9]), (17, [5]), (33, [30, 1, 7, 3]), (600, [3, 6])]
    reqs = [ContextRequest(rng.integers(0, vocab, n).tolist(),
                           [rng.integers(0, vocab, m).tolist() for m in ms]) for n, ms in shapes]
    free = engine.pool.free_pages
    got = score_continuations(engine, reqs)
    assert engine.pool.free_pages == free
    for req, values in zip(reqs, got):
        np.testing.assert_allclose(values, _one_by_one(tiny_llm, req), rtol=1e-5, atol=1e-4)


def test_choices_of_a_context_share_one_prefill_and_one_scoring_step(tiny_llm, monkeypatch):
    """Four continuations of a 40-token context: one prefill step writes the context's two
    whole pages, one scoring step scores all four rows (not four sequences)."""
    programs = tiny_llm.engine.programs
    calls = []

    def counting(kind, get):
        def wrapped(bucket, *args):
            program = get(bucket, *args)
            return lambda *xs: (calls.append((kind, bucket.rows)), program(*xs))[1]
        return wrapped

    monkeypatch.setattr(programs, "step", counting("prefill", programs.step))
    monkeypatch.setattr(programs, "scorer", counting("score", programs.scorer))
    req = ContextRequest(list(range(3, 43)), [[5, 6], [7], [8, 9, 10], [11]])
    score_continuations(tiny_llm.engine, [req])
    assert calls == [("prefill", 1), ("score", 4)]


def test_scoring_refuses_bad_requests_and_leaves_the_engine_usable(tiny_llm):
    engine = tiny_llm.engine
    free = engine.pool.free_pages
    with pytest.raises(RequestError, match="vocabulary"):
        score_continuations(engine, [ContextRequest([1, 2], [[10 ** 6]])])
    with pytest.raises(RequestError, match="non-empty"):
        score_continuations(engine, [ContextRequest([1, 2], [[]])])
    with pytest.raises(RequestError, match="max_model_len"):
        score_continuations(engine, [ContextRequest([1] * 1020, [[2] * 10])])
    assert engine.pool.free_pages == free
    assert score_continuations(engine, [ContextRequest([1, 2], [[3]])])[0][0] < 0


def test_acc_and_acc_norm_as_lm_evaluation_harness(tiny_llm, monkeypatch):
    """acc: argmax of the summed log-likelihoods; acc_norm: argmax of log-likelihood per
    character of the choice (without the delimiter)."""
    items = [Item("a", "Q", ["xx", "yyyyyy"], 1), Item("b", "Q", ["x", "yyyy"], 0)]
    lls = [[-4.0, -6.0], [-1.0, -3.0]]   # per char: [-2, -1], [-1, -0.75]
    monkeypatch.setattr(mc, "score_continuations", lambda engine, reqs, cb: lls)
    report = mc.evaluate(tiny_llm, items)
    assert [(r.pred, r.pred_norm) for r in report.items] == [(0, 1), (0, 1)]
    assert report.acc == 0.5 and report.acc_norm == 0.5
    assert report.stderr(0.5) == pytest.approx(math.sqrt(0.25))


def test_encode_pair_moves_trailing_spaces_and_prefixes_an_empty_context(tiny_llm):
    tok = tiny_llm.tokenizer
    ctx, cont = mc.encode_pair(tok, "The sky is ", "blue")
    assert ctx == tok.encode("The sky is") and ctx + cont == tok.encode("The sky is blue")
    ctx, cont = mc.encode_pair(tok, "", " blue")
    assert ctx == [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    assert cont == tok.encode(" blue", add_bos=False)


def test_score_gives_the_greedy_token_of_each_position(tiny_llm):
    """score(with_greedy=True): at each position the token greedy decoding from that prefix
    picks; across a prefill chunk's end (600 > 512 tokens) too."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, tiny_llm.config.vocab_size, 600).tolist()
    logprobs, greedy = tiny_llm.score(ids, with_greedy=True)
    np.testing.assert_array_equal(logprobs, tiny_llm.score(ids))
    assert greedy.shape == logprobs.shape == (599,)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in (0, 9, 511, 512, 598):
        assert tiny_llm.generate([ids[:i + 1]], one)[0].token_ids == [int(greedy[i])], i


def test_sample_set_scores_the_same_batched_and_one_by_one(tiny_llm):
    items = read_items(SAMPLE)
    assert len(items) == 20 and sorted({i.gold for i in items}) == [0, 1, 2, 3]
    report = mc.evaluate(tiny_llm, items[:6])
    reqs = mc.requests_for(tiny_llm, items[:6])
    for r, req in zip(report.items, reqs):
        np.testing.assert_allclose(r.loglik, _one_by_one(tiny_llm, req), rtol=1e-5, atol=1e-4)
    assert report.continuations == 24


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_hellaswag_arc_mmlu_records_get_the_harness_prompts(tmp_path):
    hs = {"activity_label": "Baking cookies", "ctx_a": "A man mixes flour.",
          "ctx_b": "he", "endings": ["puts the tray in the oven [title] Done.", "sings."],
          "label": "0"}
    [item] = read_items(_write(tmp_path / "hs.jsonl", [hs]), "hellaswag")
    assert item.context == "Baking cookies: A man mixes flour. He"
    assert item.choices == ["puts the tray in the oven. Done.", "sings."] and item.gold == 0
    arc_hf = {"question": "What melts ice?", "answerKey": "B",
              "choices": {"text": ["cold", "heat"], "label": ["A", "B"]}}
    arc_ai2 = {"question": {"stem": "What melts ice?", "choices": [
        {"text": "cold", "label": "1"}, {"text": "heat", "label": "2"}]}, "answerKey": "2"}
    a, b = read_items(_write(tmp_path / "arc.jsonl", [arc_hf, arc_ai2]), "arc")
    assert a.context == b.context == "Question: What melts ice?\nAnswer:"
    assert a.choices == b.choices == ["cold", "heat"] and a.gold == b.gold == 1
    mmlu = {"question": "2 + 2 = ?", "subject": "elementary_mathematics",
            "choices": ["3", "4", "5", "6"], "answer": 1}
    [m] = read_items(_write(tmp_path / "mmlu.jsonl", [mmlu]), "mmlu")
    assert m.context == ("The following are multiple choice questions (with answers) about "
                         "elementary mathematics.\n\n2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert m.choices == ["A", "B", "C", "D"] and m.gold == 1
    csv = tmp_path / "elementary_mathematics_test.csv"
    csv.write_text('"2 + 2 = ?",3,4,5,6,B\n')
    [c] = read_items(csv, "mmlu")
    assert (c.context, c.gold) == (m.context, 1)


def test_bad_records_name_the_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["x"], "gold": 0},
                                           {"context": "a", "choices": ["x", "y"], "gold": 2}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: gold must index the 2 choices"):
        read_items(path)
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a hellaswag record"):
        read_items(path, "hellaswag")
    with pytest.raises(DataError, match=r"no such file"):
        read_items(tmp_path / "missing.jsonl")


def test_batch_writes_results_in_order_and_records_bad_lines(tiny_llm, tmp_path):
    inp = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "hello", "max_tokens": 3},
        {"prompt": "second, no id", "max_tokens": 6, "temperature": 0},
        "{not json",
        {"id": "c", "prompt": "x", "temperature": -1},
        {"id": "d", "prompt": "x", "colour": "red"},
        {"id": "e", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        {"id": "f", "prompt": "y" * 2000},
        {"id": "a", "prompt": "again"},
    ])
    out = tmp_path / "out.jsonl"
    defaults = SamplingParams(max_tokens=4, temperature=0)
    summary = run_batch(tiny_llm, inp, out, defaults, progress=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 2, 3, "c", "d", "e", "f", "a"]
    assert summary.done == 8 and summary.errors == 5
    errors = {x["id"]: x["error"] for x in lines if "error" in x}
    assert "not JSON" in errors[3] and "temperature" in errors["c"]
    assert "colour" in errors["d"] and "context holds" in errors["f"]
    assert "used by an earlier line" in errors["a"]
    expect = tiny_llm.generate(["hello", "second, no id"],
                               [SamplingParams(max_tokens=3, temperature=0),
                                SamplingParams(max_tokens=6, temperature=0)])
    chat = tiny_llm.chat([{"role": "user", "content": "hi"}],
                         SamplingParams(max_tokens=2, temperature=0))
    for line, ref in zip([lines[0], lines[1], lines[5]], [*expect, chat]):
        assert line["text"] == ref.text and line["completion_tokens"] == len(ref.token_ids)
        assert line["finish_reason"] == ref.finish_reason
    assert not tiny_llm.engine.has_work()


def test_batch_resumes_where_an_interrupted_run_stopped(tiny_llm, tmp_path):
    """Ctrl-C after two steps: what is finished stays written; running again skips those
    ids and the file ends as one uninterrupted run writes it."""
    records = [{"id": i, "prompt": f"prompt {i}", "max_tokens": 2 + 3 * (i % 3)}
               for i in range(6)]
    inp = _write(tmp_path / "in.jsonl", records)
    defaults = SamplingParams(temperature=0)
    whole = tmp_path / "whole.jsonl"
    run_batch(tiny_llm, inp, whole, defaults, progress=False)
    out = tmp_path / "out.jsonl"
    steps = []

    def interrupt():
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(tiny_llm, inp, out, defaults, progress=False, on_step=interrupt)
    first = out.read_text().splitlines()
    assert 0 < len(first) < 6 and not tiny_llm.engine.has_work()
    with out.open("a") as f:
        f.write('{"id": 99, "te')          # a line cut off by a killed process
    summary = run_batch(tiny_llm, inp, out, defaults, progress=False)
    assert summary.skipped == len(first)
    assert out.read_text() == whole.read_text()


class _FakeLLM:
    """A tokenizer and a score() that records the chunks it gets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chunks = tokenizer, []

    def score(self, ids):
        self.chunks.append(list(ids))
        return -np.arange(1, len(ids), dtype=np.float64) / len(ids)


def test_perplexity_follows_llama_perplexity_protocol(tiny_llm):
    """Chunks of ctx tokens, each starting with BOS, only the second half scored."""
    tok = copy.copy(tiny_llm.tokenizer)
    tok.add_bos = True                       # as most models' files ask
    fake = _FakeLLM(tok)
    text = "some words to score " * 40
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    ppl, n = perplexity(fake, text, 32)
    assert n == len(ids) // 32 == len(fake.chunks)
    bos = tok.bos_id
    for i, chunk in enumerate(fake.chunks):
        assert chunk == [bos] + ids[i * 32 + 1:(i + 1) * 32]
    scored = np.arange(1, 32)[16:31] / 32
    assert ppl == pytest.approx(math.exp(scored.mean()))
    with pytest.raises(RequestError, match="at least 4096 tokens"):
        perplexity(fake, text, 4096)
