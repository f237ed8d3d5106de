"""specdec.models: registry, conversion of the embedded default, loading, saving, errors."""

import json
import multiprocessing as mp
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from specdec import models
from specdec.models import (MANIFEST, ModelError, load_model, read_manifest, resolve_model,
                            save_checkpoint)


def save_tiny(path, seed=0):
    return save_checkpoint(make_tiny_llama(seed), None, path, {"stage": "test", "seed": seed})


def test_save_checkpoint_writes_plain_dir_with_manifest(tmp_path):
    out = save_tiny(tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    manifest = read_manifest(out)
    assert manifest["stage"] == "test" and manifest["num_layers"] == 4
    assert len(manifest["weights_sha256"]["model.safetensors"]) == 64
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(reloaded(ids).logits, make_tiny_llama(0)(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left"


def test_save_checkpoint_replaces_only_when_complete(tmp_path):
    save_tiny(tmp_path / "ckpt", seed=0)
    save_tiny(tmp_path / "ckpt", seed=1)
    assert read_manifest(tmp_path / "ckpt")["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _save_worker(path, seed):
    save_checkpoint(make_tiny_llama(seed), None, path, {"stage": "race", "seed": seed},
                    exist_ok=True)


def test_concurrent_first_writes_leave_one_valid_checkpoint(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_save_worker, args=(tmp_path / "ckpt", s)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    seed = read_manifest(tmp_path / "ckpt")["seed"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[3, 4]])
    torch.testing.assert_close(reloaded(ids).logits, make_tiny_llama(seed)(ids).logits)


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a checkpoint dir"):
        resolve_model(tmp_path / "empty")


def test_hub_name_offline_fails_fast_listing_offline_names(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelError, match="not reachable.*smollm2-135m-instruct"):
        resolve_model("llama-3.1-8b-instruct")
    with pytest.raises(ModelError, match="offline"):
        resolve_model("some-org/some-model")


def test_unsupported_architecture(tmp_path):
    out = save_tiny(tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="supports LlamaForCausalLM"):
        load_model(out)


def test_corrupt_manifest(tmp_path):
    out = save_tiny(tmp_path / "ckpt")
    (out / MANIFEST).write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_manifest(out)


def test_known_config_needs_no_weights():
    cfg = models.known_config("llama-3.1-8b-instruct")
    assert cfg.num_hidden_layers == 32 and cfg.vocab_size == 128256
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert 8.0e9 < sum(p.numel() for p in model.parameters()) < 8.1e9


@pytest.mark.slow
def test_embedded_default_is_converted_once(smollm2_path, monkeypatch):
    assert (smollm2_path / MANIFEST).is_file()
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (smollm2_path / "chat_template.jinja").is_file()
    assert (smollm2_path / "generation_config.json").is_file()

    def boom(*a, **k):
        raise AssertionError("a second resolve must not fetch or convert")

    monkeypatch.setattr(models, "fetch_source", boom)
    assert resolve_model("smollm2-135m-instruct") == smollm2_path


@pytest.mark.slow
def test_converted_logits_match_gguf_and_answer_paris(smollm2_path):
    from specdec.data import chat_ids
    from specdec.hub import fetch_source

    model, tok = load_model("smollm2-135m-instruct")
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path)  # plain transformers, no specdec
    gguf = fetch_source("smollm2-135m-instruct-gguf")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    ids = torch.tensor([chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    with torch.inference_mode():
        logits = model(ids).logits
        torch.testing.assert_close(logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(ids).logits, logits)
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_cli_info_prints_the_embedded_default(smollm2_path):
    out = subprocess.run([sys.executable, "-m", "specdec.models", "info", "smollm2-135m-instruct"],
                         capture_output=True, text=True, check=True, env={**__import__("os").environ,
                                                                           "COLUMNS": "200"}).stdout
    assert "30" in out and "49152" in out and "134.5M" in out


def test_cli_errors_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specdec.models", "info", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stdout
