"""bench/frontier.py: cost measurement and the end-to-end run on tiny models (mechanics, no
timing asserted), the choice of configurations, the recommended settings written into a
draft's specdec.json and picked up by serve and the benchmarks, and the outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, save_tiny_chat_model
from rich.console import Console

from specdec.vocab import DraftVocab, load_draft_vocab

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "bench" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_frontier"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_frontier", None)


def _row(label, method, k, predicted, n=0, c=0.4, tau=1.5, layers=12):
    v = 1.05
    return {"label": label, "method": method, "path": f"/x/{label}", "layers": layers,
            "dtype": "fp32", "n": n, "coverage": 1.0, "k": k, "c": c, "v": v, "tau": tau,
            "top1": 0.4, "predicted": predicted, "tau_for_goal": 1.3 * (k * c + v),
            "tau_for_parity": k * c + v, "draft_forward_ms": 1.0,
            "name": f"{label} fp32 N={n or 'full'} k={k}"}


def test_choice_and_outputs(frontier, tmp_path):
    rows = [_row("sd12", "self-distilled", 1, 0.9), _row("sd12", "self-distilled", 2, 0.95),
            _row("sft12", "SFT", 1, 0.8), _row("sft12", "SFT", 2, 0.7, n=8192),
            _row("p12", "pruned", 1, 0.5)]
    chosen = frontier.choose_e2e(rows, 1)
    # the best predicted overall, plus the best of every other method
    assert chosen[0]["name"] == "sd12 fp32 N=full k=2"
    assert {r["name"] for r in chosen[1:]} == {"p12 fp32 N=full k=1", "sft12 fp32 N=full k=1"}
    assert frontier.choose_e2e(rows, 0) == []
    best = frontier.best_per_draft(rows)
    assert best["sd12"]["k"] == 2 and best["sft12"]["k"] == 1
    rows[1].update(measured_speedup=0.91, tokens_match=True)
    result = {"rows": rows, "target_layers": 30, "answers": 4, "config": {"dtype": "fp32", "new_tokens": 128},
              "target_forward_ms": 50.0, "threads": 1, "machine": "m",
              "load_average": {"start": [1.0, 1, 1], "end": [1.0, 1, 1]}}
    text = frontier.verdict(result)
    assert "sd12" in text and "0.91x" in text and "slowdown" in text and "tau >=" in text
    md = frontier.markdown(result)
    assert md.count("\n") == 2 + 5 and "0.91x" in md
    frontier.plot(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    s = frontier.summary(result, tmp_path / "f.json")
    assert s["best_vs_ours_target"] == 0.91 and s["all_tokens_match"]
    assert s["max_prediction_error"] == pytest.approx(abs(0.91 / 0.95 - 1), abs=1e-3)
    console = Console(record=True, width=220)
    console.print(frontier.table(result))
    assert "sd12*" in console.export_text()
    assert "lossless" not in text
    rows[1]["tokens_match"] = False  # e.g. a bf16 target: the verdict must say so
    result["config"]["dtype"] = "bf16"
    text = frontier.verdict(result)
    assert "Not a lossless figure" in text and "bf16" in text
    assert not frontier.summary(result, tmp_path / "g.json")["all_tokens_match"]


def test_validate_errors(frontier, tmp_path):
    cfg = frontier.FrontierConfig
    with pytest.raises(ValueError, match="no drafts"):
        frontier.validate(cfg())
    draft = str(save_tiny_chat_model(tmp_path / "d"))
    with pytest.raises(ValueError, match="--vocab-data"):
        frontier.validate(cfg(draft=[draft], vocab_n="0,64"))
    with pytest.raises(ValueError, match="--ks"):
        frontier.validate(cfg(draft=[draft], ks="1,x"))
    with pytest.raises(ValueError, match="not a checkpoint dir"):
        frontier.parse_drafts(["sd=/nonexistent"])
    [spec] = frontier.parse_drafts([f"self-distilled:sd={draft}"])
    assert spec == {"label": "sd", "path": draft, "method": "self-distilled"}
    assert frontier.parse_drafts([draft])[0]["method"] == "draft"  # manifest stage "test"
    both = [f"sd={draft}", f"sft={draft}"]
    for bad, why in (("sd", "two different draft labels"), ("sd:sd", "two different"),
                     ("sd:sfft", "no draft labelled sfft")):
        with pytest.raises(ValueError, match=why):
            frontier.validate(cfg(draft=both, versus=[bad]))
    with pytest.raises(ValueError, match="--e2e-best >= 1"):
        frontier.validate(cfg(draft=both, versus=["sd:sft"], e2e_best=0))
    frontier.validate(cfg(draft=both, versus=["sd:sft"]))


def test_versus_is_paired_per_prompt(frontier):
    """A head-to-head ratio pairs each prompt's two runs: a draft 5% faster on every prompt is
    5% faster however much the prompts' own times differ, and the interval says so."""
    prompt_times = [0.5, 2.0, 1.1, 3.3, 0.8, 1.7, 2.6, 0.9]
    a = [t / 1.05 for t in prompt_times]
    h = frontier.head_to_head(a, prompt_times)
    assert h["ratio"] == pytest.approx(1.05) and h["ci95"] == pytest.approx([1.05, 1.05])
    assert (h["a_faster"], h["of"]) == (8, 8)
    noisy = [t * (1.12 if i % 2 else 0.97) for i, t in enumerate(prompt_times)]  # a tie, noisily
    h = frontier.head_to_head(noisy, prompt_times)
    assert h["ci95"][0] < 1 < h["ci95"][1] and h["a_faster"] == 4
    assert frontier.head_to_head(noisy, prompt_times) == h  # seeded: the same interval again
    with pytest.raises(ValueError, match="same, non-zero number"):
        frontier.head_to_head(a, a[:-1])
    # the pair's drafts are measured end to end even when their prediction ranks them low
    rows = [_row("sd", "self-distilled", 1, 0.9), _row("sd2", "self-distilled", 1, 0.95),
            _row("sft", "SFT", 1, 0.8), _row("sft2", "SFT", 1, 0.85)]
    assert {r["label"] for r in frontier.choose_e2e(rows, 1)} == {"sd2", "sft2"}
    chosen = frontier.choose_e2e(rows, 1, must={"sd", "sft"})
    assert {r["label"] for r in chosen} == {"sd2", "sft2", "sd", "sft"}
    [line] = frontier.versus_lines({"versus": [{"a": "sd", "b": "sft", **h}]})
    assert line.startswith("sd vs sft: sft's time / sd's = ") and "faster on 4 of 8 runs" in line


def test_healing_method_reads_the_data_provenance(frontier, tmp_path):
    """A fine-tune on the target's answers is self-distilled whatever its data file is called
    (regenerated answers included); one on the original answers is SFT."""
    draft = save_tiny_chat_model(tmp_path / "d")
    regen, original = tmp_path / "regen.jsonl", tmp_path / "answers-distilled-names.jsonl"
    regen.write_text(json.dumps({"id": "a", "origin": "distilled", "mode": "regenerate"}) + "\n")
    original.write_text(json.dumps({"id": "a", "origin": "original"}) + "\n")

    def method(data, kd=0.0):
        (draft / "specdec.json").write_text(json.dumps(
            {"stage": "finetune", "data": str(data), "recipe": {"kd": kd}}))
        return frontier.healing_method(draft)

    assert method(regen) == "self-distilled"
    assert method(regen, kd=1.0) == "self-distilled + KD"
    assert method(original) == "SFT"
    assert method(tmp_path / "gone-distilled.jsonl") == "self-distilled"  # by name when absent
    assert method(tmp_path / "gone.jsonl") == "SFT"


def test_prediction_counts_the_prefills(frontier):
    """Without prefills the prediction is tau / (k c + v); the draft's prefill lowers it, and
    tau_needed inverts it (None where no tau can reach the speedup)."""
    assert frontier.predict(2.0, 2, 0.25, 1.0, 0.0, 0.0, 128) == pytest.approx(2.0 / 1.5)
    with_prefill = frontier.predict(2.0, 2, 0.25, 1.0, 6.0, 6.0, 128)
    assert with_prefill < 2.0 / 1.5
    assert with_prefill == pytest.approx((6 + 128) / (12 + 128 * 1.5 / 2.0))
    tau = frontier.tau_needed(1.3, 2, 0.25, 1.0, 6.0, 6.0, 128)
    assert frontier.predict(tau, 2, 0.25, 1.0, 6.0, 6.0, 128) == pytest.approx(1.3)
    assert frontier.tau_needed(1.3, 2, 0.25, 1.0, 6.0, 200.0, 128) is None
    assert frontier._tau(None) == "unreachable"


def test_costs_and_e2e_on_tiny_models(frontier):
    target = make_tiny_llama(seed=0)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    draft = make_tiny_llama(seed=5, num_layers=2)
    prompt = [1, 5, 9, 13, 2, 40]
    v = frontier.verify_costs(target, prompt, [1, 3], reps=2)
    assert set(v["v"]) == {1, 3} and all(x > 0 for x in v["v"].values())
    vocab = DraftVocab(torch.arange(0, 97, 2), 97)
    cost = frontier.draft_cost(target, draft, prompt, reps=2, vocab=vocab)
    assert cost["c"] > 0
    assert frontier.prefill_seconds(draft, prompt, reps=2) > 0
    cfg = frontier.FrontierConfig(draft=["x"], new_tokens=6, repeats=1)
    configs = [{"label": "d", "dtype": "fp32", "k": 2, "n": 48, "name": "d fp32 N=48 k=2"}]
    out = frontier.e2e(target, configs, {("d", "fp32"): draft}, {48: vocab}, [prompt, prompt[:3]],
                       cfg, Console(quiet=True))
    assert out["d fp32 N=48 k=2"]["tokens_match"] is True  # lossless with the trimmed head
    assert out["d fp32 N=48 k=2"]["speedup"] > 0
    assert len(out["d fp32 N=48 k=2"]["seconds"]) == 2  # one run per prompt, for --versus


def test_recommended_settings_are_written_and_picked_up(frontier, tmp_path, monkeypatch):
    from specdec.recommend import recommended, recommended_k
    from specdec.serve.config import ServeConfig

    draft = save_tiny_chat_model(tmp_path / "sd")
    vocab_size = json.loads((draft / "config.json").read_text())["vocab_size"]
    vocab = DraftVocab(torch.tensor([2, 10, 11, 12]), vocab_size)
    rows = [dict(_row("sd", "self-distilled", 3, 1.1, n=4), path=str(draft), dtype="bf16"),
            dict(_row("sd", "self-distilled", 1, 0.9, n=0), path=str(draft))]
    cfg = frontier.FrontierConfig(draft=[f"sd={draft}"])
    frontier.write_recommendations(rows, {0: None, 4: vocab}, cfg)
    rec = recommended(draft)
    assert rec["k"] == 3 and rec["draft_vocab_n"] == 4 and rec["draft_dtype"] == "bfloat16"
    assert load_draft_vocab(draft, vocab_size).ids.tolist() == [2, 10, 11, 12]
    # consumers default to it; an explicit value wins
    assert recommended_k(draft) == 3 and recommended_k(tmp_path / "nothing") == 4
    assert ServeConfig(draft=str(draft)).k == 3
    assert ServeConfig(draft=str(draft), k=2).k == 2
    spec = importlib.util.spec_from_file_location("bench_latency2", ROOT / "bench" / "latency.py")
    latency = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_latency2", latency)
    spec.loader.exec_module(latency)
    resolved = latency.resolve_defaults(latency.LatencyConfig(draft=str(draft)))
    assert resolved.ks == "3" and resolved.draft_dtype == "bf16"
    assert latency.resolve_defaults(latency.LatencyConfig(draft=str(draft), ks="1,2")).ks == "1,2"
    # the full vocabulary winning later removes the sidecar
    frontier.write_recommendations([dict(_row("sd", "self-distilled", 2, 1.2), path=str(draft))],
                                   {0: None}, cfg)
    assert load_draft_vocab(draft, vocab_size) is None and recommended(draft)["k"] == 2


def test_int8_recommendation_is_picked_up_by_serve_and_latency(frontier, tmp_path, monkeypatch):
    """An int8 draft recorded by the frontier: serve loads the draft quantized, latency.py's
    defaults and validation take int8, the weights on disk stay as they were."""
    from specdec.quant import Int8Linear
    from specdec.recommend import recommended
    from specdec.serve.config import ServeConfig, build_engine

    target = save_tiny_chat_model(tmp_path / "target")
    draft = save_tiny_chat_model(tmp_path / "sd", seed=1, num_layers=1)
    rows = [dict(_row("sd", "self-distilled", 2, 1.1), path=str(draft), dtype="int8")]
    frontier.write_recommendations(rows, {0: None}, frontier.FrontierConfig(draft=[str(draft)]))
    assert recommended(draft)["draft_dtype"] == "int8"
    monkeypatch.setattr("specdec.quant.calibration_ids", lambda tokenizer: [[1, 2, 3, 4]])
    engine, _ = build_engine(ServeConfig(target=str(target), draft=str(draft), device="cpu"))
    assert isinstance(engine.draft.model.layers[0].self_attn.q_proj, Int8Linear)
    assert engine.k_max == 2
    engine, _ = build_engine(ServeConfig(target=str(target), draft=str(draft), device="cpu",
                                         draft_dtype="float32"))  # an explicit value wins
    assert type(engine.draft.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="draft_dtype must be one of"):
        ServeConfig(target=str(target), draft=str(draft), draft_dtype="int4")
    spec = importlib.util.spec_from_file_location("bench_latency3", ROOT / "bench" / "latency.py")
    latency = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_latency3", latency)
    spec.loader.exec_module(latency)
    resolved = latency.resolve_defaults(latency.LatencyConfig(draft=str(draft)))
    assert resolved.draft_dtype == "int8"
    latency.validate(resolved)
    with pytest.raises(ValueError, match="--draft-dtype must be one of"):
        latency.validate(latency.LatencyConfig(draft=str(draft), draft_dtype="int4"))
