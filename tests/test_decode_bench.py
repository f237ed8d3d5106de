"""bench/latency.py on tiny models: its methods decode the same tokens (ours, ours with a draft,
Hugging Face generate, Hugging Face assisted generation), the cost measurement and the alpha
fit are sane, and the table / summary render. Mechanics only; no timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from rich.console import Console

from specdec.flops import expected_tokens_per_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "bench" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_latency", None)


@pytest.fixture(scope="module")
def pair():
    target = make_tiny_llama(seed=0)
    with torch.no_grad():  # spread the logits so greedy decoding does not repeat one token
        for name, p in target.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    draft = make_tiny_llama(seed=5, num_layers=2)
    return target, draft


def test_methods_agree(latency, pair):
    target, draft = pair
    prompt = [1, 5, 9, 13, 2, 40]
    runs = {
        "ours-target": latency.our_method(target, None, 0)(prompt, 12),
        "hf-generate": latency.hf_method(target, None, 0, pad_token_id=0)(prompt, 12),
        "ours k=3": latency.our_method(target, draft, 3)(prompt, 12),
        "hf-assist k=3": latency.hf_method(target, draft, 3, pad_token_id=0)(prompt, 12),
    }
    want = runs["hf-generate"].tokens
    assert len(want) == 12  # EOS ignored: exactly the asked number of tokens
    for name, run in runs.items():
        assert run.tokens == want, name
        assert run.seconds > 0
    assert runs["ours k=3"].steps >= 3 and runs["ours k=3"].drafted == 3 * runs["ours k=3"].steps


def test_costs_and_alpha_fit(latency, pair):
    target, draft = pair
    costs = latency.measure_costs(target, draft, [1, 5, 9, 13], ks=[1, 3], reps=2)
    assert costs["cost_ratio"] > 0 and set(costs["verify_cost"]) == {"1", "3"}
    for alpha in (0.0, 0.3, 0.8, 0.99):
        tau = expected_tokens_per_step(alpha, 4)
        assert latency.alpha_from_tau(tau, 4) == pytest.approx(alpha, abs=1e-6)
    assert latency.alpha_from_tau(5.0, 4) == 1.0
    with pytest.raises(ValueError, match="--ks"):
        latency.validate(latency.LatencyConfig(ks="1,x"))
    with pytest.raises(ValueError, match="--draft"):
        latency.validate(latency.LatencyConfig(draft="/nonexistent/draft"))


def test_table_and_summary(latency, tmp_path):
    rows = [
        {"method": "ours-target", "k": None, "tok_s": 10.0, "tokens_match": 1.0,
         "vs_ours-target": 1.0, "vs_hf-generate": 1.1, "cpu_vs_hf-generate": 1.0},
        {"method": "hf-generate", "k": None, "tok_s": 9.0, "tokens_match": 1.0,
         "vs_ours-target": 0.9, "vs_hf-generate": 1.0},
        {"method": "ours k=2", "k": 2, "tok_s": 12.0, "tokens_match": 1.0, "vs_ours-target": 1.2,
         "vs_hf-generate": 1.3, "vs_hf-assist": 1.1, "cpu_vs_hf-assist": 1.05,
         "acceptance": 0.6, "mal": 2.1,
         "alpha_fit": 0.6, "predicted": 1.3, "predicted_flops": 1.4, "predicted_verify": 1.25},
        {"method": "hf-assist k=2", "k": 2, "tok_s": 11.0, "tokens_match": 1.0,
         "vs_ours-target": 1.1, "vs_hf-generate": 1.2},
    ]
    result = {"config": {"dtype": "fp32", "repeats": 1, "new_tokens": 8}, "machine": "m",
              "threads": 1, "load_average": {"start": [1.0, 1, 1], "end": [2.0, 2, 2]},
              "draft": {"source": "x [not healed]", "layers": 2}, "target_layers": 4,
              "prompts": [5], "rows": rows,
              "costs": {"cost_ratio": 0.5, "draft_forward_s": 0.01, "target_forward_s": 0.02,
                        "verify_cost": {"2": 1.1}}}
    console = Console(record=True, width=220)
    latency.print_table(result, console)
    text = console.export_text()
    assert "ours k=2" in text and "[not healed]" in text and "1.25x" in text
    s = latency.summary(result, tmp_path / "latency.json")
    assert s["best_k"] == 2 and s["ours_vs_hf_assist"] == {"2": 1.1} and s["all_tokens_match"]
    json.dumps(s)
    # the reference is our target alone: Hugging Face parting from it (bf16) is reported apart,
    # one of our runs parting from it is a lossless failure
    rows[1]["tokens_match"] = 0.5
    s = latency.summary(result, tmp_path / "latency.json")
    assert s["all_tokens_match"] and not s["hf_tokens_match"]
    rows[2]["tokens_match"] = 0.5
    assert not latency.summary(result, tmp_path / "latency.json")["all_tokens_match"]


@pytest.mark.slow
def test_concurrent_method(latency, pair, tmp_path):
    """--concurrent: the draft in a worker process, loaded from its dir; same tokens."""
    from conftest import tiny_chat_tokenizer

    from specdec.models import save_checkpoint

    target, draft = pair
    path = save_checkpoint(draft, tiny_chat_tokenizer(), tmp_path / "draft", {"stage": "test"})
    cfg = latency.LatencyConfig(draft=str(path), draft_dtype="fp32", concurrent=True)
    latency.validate(cfg)
    prompt = [1, 5, 9, 13, 2, 40]
    want = latency.our_method(target, None, 0)(prompt, 12).tokens
    two = latency.with_threads(latency.our_method(target, None, 0), 2)
    assert two(prompt, 12).tokens == want and torch.get_num_threads() != 0
    run = latency.concurrent_method(target, str(path), "fp32", "auto", 3)(prompt, 12)
    assert run.tokens == want and run.steps >= 1
    with pytest.raises(ValueError, match="--concurrent"):
        latency.validate(latency.LatencyConfig(concurrent=True))


def test_summary_against_the_faster_target_only_decode(latency, tmp_path):
    """With --concurrent our target alone also runs on 2 threads; the best method's speedup is
    against whichever of the two target-only decodes was faster."""
    rows = [
        {"method": "ours-target", "k": None, "tok_s": 10.0, "tokens_match": 1.0},
        {"method": "ours-target 2 threads", "k": None, "tok_s": 11.0, "tokens_match": 1.0},
        {"method": "ours k=2", "k": 2, "tok_s": 9.0, "tokens_match": 1.0,
         "vs_ours-target": 0.9, "vs_ours-target 2 threads": 0.82, "mal": 1.5},
        {"method": "ours-concurrent k=2", "k": 2, "tok_s": 13.0, "tokens_match": 1.0,
         "vs_ours-target": 1.3, "vs_ours-target 2 threads": 1.18, "mal": 1.6},
    ]
    result = {"config": {"dtype": "fp32"}, "draft": {}, "threads": 1, "rows": rows,
              "load_average": {"start": [1.0, 1, 1]}, "costs": {"cost_ratio": 0.5}}
    s = latency.summary(result, tmp_path / "latency.json")
    assert s["best_method"] == "ours-concurrent k=2" and s["baseline"] == "ours-target 2 threads"
    assert s["best_vs_ours_target"] == 1.18 and s["all_tokens_match"]
