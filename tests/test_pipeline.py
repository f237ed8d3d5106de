"""The main job end to end on a tiny target: every stage runs, then every stage is skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import make_tiny_llama
from specdec.models import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_smoke_runs_then_resumes(tmp_path, smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    target = save_checkpoint(make_tiny_llama(seed=0, vocab_size=49152, num_layers=3), tokenizer,
                             tmp_path / "tiny-target", {"stage": "test"})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "specdec.pipeline", "--preset", "smoke", "--target", str(target),
           "--run", str(run)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                           env={**__import__("os").environ, "COLUMNS": "200"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("pruned", "sft", "sd", "sd-kd"):
        manifest = json.loads((run / "drop1" / stage / "specdec.json").read_text())
        assert manifest["num_layers"] == 2
    assert len((run / "distilled.jsonl").read_text().splitlines()) == 4
    assert len((run / "original.jsonl").read_text().splitlines()) == 4
    result = json.loads((run / "drop1" / "bench" / "acceptance.json").read_text())
    assert [q["draft"] for q in result["quality"]] == ["pruned", "sft", "sd", "sd-kd"]
    assert all(c["agree"] for c in result["engine_check"].values())
    report = (run / "report.md").read_text()
    assert "## drop1" in report and "Fastest draft:" in report
    assert (run / "distilled.logits" / "manifest.json").is_file()  # KD from the logit cache
    kd = json.loads((run / "drop1" / "sd-kd" / "specdec.json").read_text())
    assert kd["recipe"]["kd_cache"] == str(run / "distilled.logits")
    frontier = json.loads((run / "drop1" / "frontier" / "frontier.json").read_text())
    assert frontier["verdict"].startswith("Fastest draft")
    assert all(r.get("tokens_match", True) for r in frontier["rows"])
    # every draft now records its recommended settings
    rec = json.loads((run / "drop1" / "sd" / "specdec.json").read_text())["recommended"]
    assert rec["k"] in (1, 2) and "predicted_speedup" in rec
    assert "Fastest draft" in first.stdout.strip().splitlines()[-1]  # the run ends with it

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**__import__("os").environ, "COLUMNS": "200"})
    assert again.returncode == 0, again.stderr[-3000:]
    # prune, distill, original, logit cache, 3 finetunes, bench, frontier
    assert again.stdout.count("done already, skipped") == 9


def test_pipeline_rejects_unknown_cuts_and_engines(tmp_path):
    from specdec.pipeline import PipelineConfig, run

    with pytest.raises(ValueError, match="preset 'paper' has cuts drop6, keep12"):
        run(PipelineConfig(preset="paper", run=str(tmp_path), cuts=("drop7",)))
    with pytest.raises(ValueError, match="choose one of auto, transformers, vllm"):
        run(PipelineConfig(preset="paper", run=str(tmp_path), distill_engine="tgi"))
    assert not any(tmp_path.iterdir())  # nothing written before the config is checked


def test_jsonl_ids_keep_records_whose_text_holds_unicode_line_separators(tmp_path):
    from specdec.pipeline import jsonl_ids

    path = tmp_path / "d.jsonl"
    rows = [{"id": "a", "text": "one\u2028two\x85three\u2029"}, {"id": "b", "text": "x"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    assert jsonl_ids(path) == ["a", "b"]
