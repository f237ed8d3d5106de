"""specdec.vllm: the draft/target check, speculative_config and `vllm serve` line on tiny
checkpoints (no vLLM needed), the schedule replay, and `make vllm-check` when .venv-vllm exists."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

from specdec import vllm as sv
from specdec.models import ModelError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["user", "assistant", "system"] + [f"w{i}" for i in range(90)]  # 4 + 93 = vocab 97


def _tokenizer(words=WORDS, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos,
                                   pad_token="<pad>", unk_token="<unk>")


def _drop_layers(model, keep: int):
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:keep])
    model.config.num_hidden_layers = keep
    return model


@pytest.fixture
def pair(tmp_path):
    """(target dir, draft dir): a tiny 4-layer target and a 2-layer draft cut from it."""
    target = save_checkpoint(make_tiny_llama(0), _tokenizer(), tmp_path / "target",
                             {"stage": "test"})
    draft = save_checkpoint(_drop_layers(make_tiny_llama(0), 2), _tokenizer(),
                            tmp_path / "draft", {"stage": "prune", "target": str(target)})
    return target, draft


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _failed(check) -> list[str]:
    return [r.name for r in check.rows if r.ok is False]


def test_config_prints_speculative_config_and_serve_line(pair, capsys):
    target, draft = pair
    assert sv.main(["config", "--draft", str(draft), "--k", "5"]) == 0  # target from manifest
    lines = capsys.readouterr().out.splitlines()
    spec = json.loads(next(line for line in lines if line.startswith("{")))
    assert spec == {"method": "draft_model", "model": str(draft.resolve()),
                    "num_speculative_tokens": 5}
    argv = shlex.split(next(line for line in lines if line.startswith("vllm serve")))
    assert argv[:3] == ["vllm", "serve", str(target.resolve())]
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == spec
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--max-model-len" not in argv


def test_config_json_output_lists_every_check(pair, capsys):
    target, draft = pair
    assert sv.main(["config", "--draft", str(draft), "--target", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["problems"] == []
    names = {c["name"] for c in out["checks"]}
    assert {"vocab_size (config)", "tokenizer vocab+merges", "EOS ids", "draft architecture",
            "max_position_embeddings"} <= names
    assert out["vllm_serve"].startswith("vllm serve ")


def test_vocab_size_mismatch_fails_naming_the_fix(tmp_path, pair, capsys):
    target, _ = pair
    draft = save_checkpoint(make_tiny_llama(1, num_layers=2, vocab_size=101), _tokenizer(),
                            tmp_path / "wide", {"stage": "prune", "target": str(target)})
    check = sv.check_draft(draft)
    assert not check.ok and _failed(check) == ["vocab_size (config)"]
    with pytest.raises(sv.DraftMismatchError, match="specdec.prune"):
        check.raise_if_failed()
    assert sv.main(["config", "--draft", str(draft)]) == 1
    err = capsys.readouterr().err
    assert "vocab_size" in err and "Fix:" in err


def test_other_tokenizer_with_the_same_size_fails(tmp_path, pair):
    target, _ = pair
    shuffled = list(reversed(WORDS))  # same size, other token -> id map
    draft = save_checkpoint(make_tiny_llama(1, num_layers=2), _tokenizer(shuffled),
                            tmp_path / "other", {"stage": "prune"})
    check = sv.check_draft(draft, str(target))
    assert _failed(check) == ["tokenizer vocab+merges"]
    assert "target's tokenizer" in check.problems[0]


def test_special_token_and_eos_mismatches_fail(pair):
    target, draft = pair
    _edit_json(draft / "generation_config.json", eos_token_id=[2, 3])
    _edit_json(draft / "tokenizer_config.json", eos_token="<unk>")
    check = sv.check_draft(draft, str(target))
    assert set(_failed(check)) == {"EOS ids", "tokenizer eos_token"}
    assert any("generation_config.json" in p for p in check.problems)


def test_unsupported_architecture_fails(pair):
    target, draft = pair
    _edit_json(draft / "config.json", architectures=["GPT2LMHeadModel"])
    check = sv.check_draft(draft, str(target))
    assert _failed(check) == ["draft architecture"]
    assert "LlamaForCausalLM" in check.problems[0]


def test_short_draft_context_fails_until_max_model_len_fits(pair, capsys):
    target, draft = pair
    _edit_json(draft / "config.json", max_position_embeddings=256)  # target: 512
    check = sv.check_draft(draft, str(target))
    assert _failed(check) == ["max_position_embeddings"]
    assert "--max-model-len 256" in check.problems[0]
    assert sv.main(["config", "--draft", str(draft), "--max-model-len", "256"]) == 0
    argv = shlex.split(next(line for line in capsys.readouterr().out.splitlines()
                            if line.startswith("vllm serve")))
    assert argv[argv.index("--max-model-len") + 1] == "256"
    too_long = sv.check_draft(draft, str(target), max_model_len=1024)
    assert _failed(too_long) == ["max_position_embeddings"]
    assert "exceeds the target's 512" in too_long.problems[0]


def test_missing_weights_fail(pair):
    target, draft = pair
    (draft / "model.safetensors").unlink()
    assert "draft weights" in _failed(sv.check_draft(draft, str(target)))


def test_unknown_target_and_bad_arguments_are_clear_errors(tmp_path, pair, capsys):
    target, draft = pair
    orphan = save_checkpoint(_drop_layers(make_tiny_llama(0), 2), _tokenizer(),
                             tmp_path / "orphan", {"stage": "prune"})
    with pytest.raises(ModelError, match="--target"):
        sv.check_draft(orphan)
    assert sv.main(["config", "--draft", str(orphan)]) == 2
    assert "--target" in capsys.readouterr().err
    with pytest.raises(ValueError, match="k"):
        sv.check_draft(draft, str(target), k=0)
    with pytest.raises(ValueError, match="is the target itself"):
        sv.check_draft(target, str(target))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        sv.speculative_config(draft, 0)


def test_target_follows_parent_links(tmp_path, pair):
    target, draft = pair
    tuned = save_checkpoint(_drop_layers(make_tiny_llama(0), 2), _tokenizer(), tmp_path / "sft",
                            {"stage": "finetune", "parent": str(draft)})
    assert sv.target_of(tuned) == str(target)
    assert sv.check_draft(tuned).target == target


def test_vllm_model_name_uses_hub_ids_for_hub_models(tmp_path):
    assert sv.vllm_model_name("llama-3.1-8b-instruct", tmp_path) == \
        "meta-llama/Llama-3.1-8B-Instruct"
    assert sv.vllm_model_name("org/model", tmp_path) == "org/model"
    assert sv.vllm_model_name(str(tmp_path), tmp_path) == str(tmp_path.resolve())


def test_simulate_vllm_steps():
    # all agree: 1 token from prefill, then 4 + 1 per step; the last step runs past n = 10
    assert sv.simulate_vllm_steps([True] * 13, 10, 4) == [4, 4]
    assert sv.simulate_vllm_steps([False] * 8, 5, 4) == [0, 0, 0, 0]
    # position 0 (the prefill token) is never drafted; runs stop at the first disagreement
    agree = [False, True, True, False, True, True, True, True, True, True]
    assert sv.simulate_vllm_steps(agree, 7, 4) == [2, 4]
    assert sv.simulate_vllm_steps([True], 1, 4) == []  # one token: prefill only
    with pytest.raises(ValueError, match="continue the output"):
        sv.simulate_vllm_steps([True] * 10, 10, 4)
    with pytest.raises(ValueError, match="k must be"):
        sv.simulate_vllm_steps([True] * 10, 5, 0)


def test_spec_totals_match_vllm_counter_definitions():
    totals = sv.spec_totals([[4, 0], [2]], k=4)
    assert totals["num_drafts"] == 3 and totals["num_draft_tokens"] == 12
    assert totals["num_accepted_tokens"] == 6 and totals["accepted_per_pos"] == [2, 2, 1, 1]
    assert totals["mean_acceptance_length"] == pytest.approx(3.0)


def test_read_spec_metrics_sums_engines():
    metrics = [SimpleNamespace(name="vllm:spec_decode_num_drafts", value=3),
               SimpleNamespace(name="vllm:spec_decode_num_drafts", value=2),
               SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=7),
               SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos",
                               values=[4, 3]),
               SimpleNamespace(name="vllm:num_requests_running", value=1)]
    assert sv.read_spec_metrics(metrics) == {"num_drafts": 5, "num_accepted_tokens": 7,
                                             "accepted_per_pos": [4, 3]}
    assert sv.read_spec_metrics([]) is None


def test_serve_builds_the_vllm_serve_line_from_a_serve_config(pair, capsys, monkeypatch):
    target, draft = pair
    monkeypatch.setattr(sv, "vllm_python", lambda: None)
    cfg = SimpleNamespace(target=str(target), draft=str(draft), k=3, host="127.0.0.1", port=8123,
                          api_key="secret", max_model_len=None, dtype="float32",
                          served_model_name="tiny", device="cpu")
    assert sv.serve(cfg, execute=False) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[:3] == ["vllm", "serve", str(target.resolve())]
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["num_speculative_tokens"] == 3
    for flag, value in (("--port", "8123"), ("--api-key", "secret"),
                        ("--served-model-name", "tiny"), ("--dtype", "float32"),
                        ("--kv-cache-memory-bytes", str(1 << 30))):
        assert argv[argv.index(flag) + 1] == value
    with pytest.raises(ModelError, match="install_vllm.sh"):
        sv.serve(cfg)  # no vLLM anywhere: a clear error, not a traceback


def test_generate_without_vllm_names_the_install_script(monkeypatch):
    monkeypatch.setattr(sv.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sv, "vllm_python", lambda: None)
    with pytest.raises(ModelError, match="install_vllm.sh"):
        sv.generate(sv.GenerateConfig())
    with pytest.raises(ValueError, match="max-model-len"):
        sv.GenerateConfig(max_tokens=4096, max_model_len=2048)
    with pytest.raises(ValueError, match="continue-tokens"):
        sv.GenerateConfig(continue_tokens=-1)


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                    reason="make vllm-check's environment .venv-vllm is missing (create it with "
                           "bash scripts/install_vllm.sh); the vLLM integration check is skipped")
def test_vllm_check_passes(tmp_path):
    """The real check, smaller: vLLM twice (about 2 minutes each on 2 CPU cores)."""
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "scripts" / "vllm_check.py"),
                           "-n", "3", "--max-tokens", "32", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["identical_outputs"] and report["acceptance_matches_prediction"]
    assert report["vllm"]["num_drafts"] > 0
