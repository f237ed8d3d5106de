"""specdec.data: formats, malformed records, truncation, splits, the real sources."""

import json
import subprocess
import sys

import pytest

from specdec.data import (DataError, LoadReport, chat_ids, iter_json_array, load_records,
                          split_of)

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
SHAREGPT = {"id": "abc_0", "conversations": [{"from": "human", "value": "Hi"},
                                             {"from": "gpt", "value": "Hello!"}]}
OPENAI = {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4"}]}


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_three_forms_in_one_file(tmp_path, suffix):
    path = tmp_path / f"mixed{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([ALPACA, SHAREGPT, OPENAI], indent=2))
    else:
        write_jsonl(path, [ALPACA, SHAREGPT, OPENAI])
    alpaca, share, openai = load_records(str(path))
    assert alpaca.messages[0] == {"role": "user", "content": "Add the numbers.\n\n2 and 3"}
    assert alpaca.reference == "5"
    assert share.id == "abc_0" and share.messages[1]["role"] == "assistant"
    assert share.reference == "Hello!"
    assert openai.prompt() == OPENAI["messages"][:2] and openai.reference == "4"


def test_malformed_record_names_file_line_and_field(tmp_path):
    bad = {"conversations": [{"from": "human", "value": 3}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA, bad, OPENAI])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: conversations\[0\]\.value must be a string"):
        load_records(str(path))
    report = LoadReport()
    kept = load_records(str(path), skip_bad=True, report=report)
    assert [r.reference for r in kept] == ["5", "4"]
    assert report.skipped == 1 and report.read == 3


@pytest.mark.parametrize("obj, field", [
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role"),
    ({"instruction": ""}, "instruction"),
    ({"foo": 1}, "unknown record form"),
    ([1, 2], "expected a JSON object"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn"),
])
def test_error_paths(tmp_path, obj, field):
    path = write_jsonl(tmp_path / "e.jsonl", [obj])
    with pytest.raises(DataError, match=field):
        load_records(str(path))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n{not json\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        load_records(str(path))


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="neither a built-in source"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        load_records(str(tmp_path / "a.csv"))


def test_truncated_array_keeps_complete_records(tmp_path):
    records = [dict(SHAREGPT, id=f"r{i}_0") for i in range(50)]
    text = json.dumps(records, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: int(len(text) * 0.7)])
    report = LoadReport()
    # a tiny chunk size exercises records that straddle chunk boundaries
    objs = [o for o, _ in iter_json_array(path, report, chunk_size=97)]
    assert report.truncated
    assert [o["id"] for o in objs] == [r["id"] for r in records[: len(objs)]]
    assert 30 <= len(objs) < 50


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, ALPACA, {"instruction": 5}], indent=2))
    with pytest.raises(DataError, match=r"a\.json:12: field 'instruction'"):
        load_records(str(path))


def test_split_is_deterministic_disjoint_and_groups_conversation_parts(tmp_path):
    objs = [dict(SHAREGPT, id=f"conv{i}_{part}") for i in range(300) for part in range(2)]
    path = write_jsonl(tmp_path / "s.jsonl", objs)
    train = {r.id for r in load_records(str(path), split="train", test_fraction=0.2)}
    test = {r.id for r in load_records(str(path), split="test", test_fraction=0.2)}
    assert train and test and not train & test and len(train | test) == 600
    assert 60 < len(test) < 180
    assert split_of("conv1_0", "sharegpt", 0.5) == split_of("conv1_7", "sharegpt", 0.5)
    assert [split_of(f"x{i}") for i in range(50)] == [split_of(f"x{i}") for i in range(50)]


def test_mt_bench_is_the_80_two_turn_questions():
    records = load_records("mt-bench")
    assert len(records) == 80
    assert all(len(r.followups) == 1 and r.messages[0]["role"] == "user" for r in records)
    assert len({r.category for r in records}) == 8


def test_sharegpt_streams_the_first_records_and_reports_truncation():
    report = LoadReport()
    first = load_records("sharegpt", n=5, report=report)
    assert len(first) == 5 and all(r.reference for r in first[:1])
    assert report.read < 20, "n=5 must not parse the whole file"


@pytest.mark.slow
def test_sharegpt_whole_file_is_truncated_not_fatal():
    report = LoadReport()
    count = sum(1 for _ in __import__("specdec.data").data.iter_records("sharegpt", report=report))
    assert report.truncated and 17_000 < report.read < 18_000 and count == report.kept


@pytest.mark.slow
def test_chat_ids_use_the_tokenizers_template(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = chat_ids(tok, [{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_cli_show(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, OPENAI])
    out = subprocess.run([sys.executable, "-m", "specdec.data", "show", str(path), "-n", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "Add the numbers." in out and "Be brief." in out
    bad = write_jsonl(tmp_path / "b.jsonl", [{"foo": 1}])
    proc = subprocess.run([sys.executable, "-m", "specdec.data", "show", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown record form" in proc.stdout
