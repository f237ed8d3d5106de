"""specdec.finetune: response-only labels, losses, LoRA/full, KD, resume, 2-process DP, CLI."""

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from specdec import finetune
from specdec.finetune import FinetuneConfig, lr_factor
from specdec.kd import kd_kl
from specdec.train_data import build_example, collate, epoch_batches
from specdec.models import read_manifest
from conftest import save_tiny_chat_model, tiny_chat_tokenizer, write_chat_data


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("draft") / "tiny", seed=1,
                                manifest={"stage": "prune", "target": None})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "d.jsonl", n=8)


def cfg_for(draft, data, out, **kw):
    base = dict(draft=str(draft), data=str(data), out=str(out), max_prompt_tokens=60,
                batch_size=4, micro_batch_size=2, max_steps=4, lr=1e-2, warmup_ratio=0.0,
                lora_rank=4, lora_alpha=8, lora_dropout=0.0, device="cpu", save_every=0)
    base.update(kw)
    return FinetuneConfig(**base)


def weights(path):
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------- labels


@pytest.mark.slow
def test_label_mask_on_the_smollm2_chat_template(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    response = "The capital of France is Paris."
    ex = build_example(tok, "x", prompt, response, {tok.eos_token_id}, max_seq_len=512)
    # the prompt part is exactly what inference feeds the model
    assert ex.input_ids[:ex.n_prompt] == tok.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ex.input_ids[:ex.n_prompt]).endswith("<|im_start|>assistant\n")
    # the loss covers the response and its end-of-turn token, nothing after
    assert tok.decode(ex.input_ids[ex.n_prompt:]) == response + "<|im_end|>"
    input_ids, _, loss_mask, labels = collate([ex, ex], tok.pad_token_id, "cpu")
    assert labels.tolist() == 2 * ex.input_ids[ex.n_prompt:]
    # position j predicts token j + 1: masked positions are the ones before response tokens
    assert input_ids[0, 1:][loss_mask[0, :-1]].tolist() == ex.input_ids[ex.n_prompt:]
    assert build_example(tok, "x", prompt, response, {tok.eos_token_id}, 10) == "too_long"


def test_label_mask_and_prefix_check_on_a_tiny_template():
    tok = tiny_chat_tokenizer()
    prompt = [{"role": "user", "content": "Hi"}]
    ex = build_example(tok, "x", prompt, " Yo! ", {tok.eos_token_id}, 64)
    assert tok.decode(ex.input_ids[:ex.n_prompt]) == "<|user|>Hi</s><|assistant|>"
    assert tok.decode(ex.input_ids[ex.n_prompt:]) == "Yo!</s>"
    assert build_example(tok, "x", prompt, "  ", {tok.eos_token_id}, 64) == "empty_response"
    # a template whose generation prompt is not the start of the assistant turn
    bad = tiny_chat_tokenizer(
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|system|>' }}{% endif %}")
    assert build_example(bad, "x", prompt, "Yo", {bad.eos_token_id}, 64) == "prefix_mismatch"


def test_schedule_batches_and_kl():
    assert lr_factor(0, 10, 2, 0.0) == 0.5 and lr_factor(1, 10, 2, 0.0) == 1.0
    assert lr_factor(2, 10, 2, 0.0) == 1.0 and lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9]
    batches = epoch_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert batches == epoch_batches(lengths, 2, seed=0, epoch=0)
    assert batches != epoch_batches(lengths, 2, seed=0, epoch=1)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    logits = torch.randn(5, 11)
    assert kd_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(logits, torch.randn(5, 11), temperature=2.0).item() > 0


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("method,lr", [("lora", 3e-2), ("full", 3e-3)])
def test_lora_and_full_reduce_the_loss(tmp_path, tiny_draft, tiny_data, method, lr):
    cfg = cfg_for(tiny_draft, tiny_data, tmp_path / "out", method=method, lr=lr,
                  batch_size=8, max_steps=8)  # every step sees the same 8 examples
    result = finetune.run(cfg)
    losses = [c["loss"] for c in result.curve]
    assert losses[-1] < losses[0] - 0.3, losses
    manifest = read_manifest(result.out)
    assert manifest["stage"] == "finetune" and manifest["recipe"]["method"] == method
    assert manifest["examples"] == 8 and len(manifest["loss_curve"]) == 8
    assert manifest["skipped"] == {"no_reference": 1, "not_first_turn": 1, "prompt_too_long": 1}
    assert manifest["data_sha256"] and manifest["parent"] == str(tiny_draft)
    # LoRA is merged: the output is a plain Llama checkpoint with no adapter tensors
    assert not [k for k in weights(result.out) if "lora" in k]
    assert (result.out / "loss_curve.png").stat().st_size > 0
    assert json.loads((result.out / "loss_curve.json").read_text()) == result.curve
    assert not finetune.ckpt_dir(cfg.out).exists()


def test_kd_term_is_zero_when_draft_is_the_target(tmp_path, tiny_draft, tiny_data):
    cfg = cfg_for(tiny_draft, tiny_data, tmp_path / "kd", kd=0.5, kd_temperature=2.0,
                  target=str(tiny_draft), max_steps=2)
    curve = finetune.run(cfg).curve
    assert curve[0]["kd"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert curve[0]["loss"] == pytest.approx(curve[0]["ce"], abs=1e-5)
    assert curve[1]["kd"] > 0  # after one step the draft has moved away


class Stop(RuntimeError):
    pass


def test_resume_gives_the_same_final_weights(tmp_path, tiny_draft, tiny_data):
    kw = dict(max_steps=5, save_every=2, lora_dropout=0.2, batch_size=2, micro_batch_size=1)
    whole = finetune.run(cfg_for(tiny_draft, tiny_data, tmp_path / "whole", **kw))

    def stop_at_3(step, record):
        if step == 3:
            raise Stop()

    cfg = cfg_for(tiny_draft, tiny_data, tmp_path / "cut", **kw)
    with pytest.raises(Stop):
        finetune.run(cfg, on_step=stop_at_3)
    assert (finetune.ckpt_dir(cfg.out) / "state.pt").is_file()
    assert not (tmp_path / "cut").exists()
    resumed = finetune.run(cfg)
    assert resumed.resumed_from == 2
    assert [c["loss"] for c in resumed.curve] == [c["loss"] for c in whole.curve]
    a, b = weights(whole.out), weights(resumed.out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # a finished output with the same recipe is not retrained; another recipe is refused
    assert finetune.run(cfg).curve == resumed.curve
    with pytest.raises(ValueError, match="another recipe"):
        finetune.run(cfg_for(tiny_draft, tiny_data, tmp_path / "cut", **{**kw, "lr": 1e-3}))


def _dp_worker(rank, world_size, init_file, cfg, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        result = finetune.run(cfg)
        if rank == 0:
            result_file.write_text(json.dumps(result.curve))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_data_parallel_matches_one_process(tmp_path, tiny_draft, tiny_data):
    kw = dict(method="full", lr=3e-3, batch_size=4, micro_batch_size=1, max_steps=3)
    one = finetune.run(cfg_for(tiny_draft, tiny_data, tmp_path / "one", **kw))
    cfg = cfg_for(tiny_draft, tiny_data, tmp_path / "two", **kw)
    mp.spawn(_dp_worker, args=(2, tmp_path / "pg", cfg, tmp_path / "curve.json"), nprocs=2,
             join=True)
    two = json.loads((tmp_path / "curve.json").read_text())
    assert read_manifest(tmp_path / "two")["world_size"] == 2
    torch.testing.assert_close(torch.tensor([c["loss"] for c in two]),
                               torch.tensor([c["loss"] for c in one.curve]), rtol=1e-5, atol=1e-5)
    a, b = weights(one.out), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cli_smoke(tmp_path, tiny_draft, tiny_data):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "specdec.finetune", "--draft", str(tiny_draft), "--data",
           str(tiny_data), "--out", str(out), "--full", "--max-steps", "2", "--batch-size", "2",
           "--max-prompt-tokens", "60", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["recipe"]["method"] == "full" and manifest["steps"] == 2
    assert (out / "loss_curve.png").is_file() and "loss first -> last" in proc.stdout


def test_main_reports_bad_data(tmp_path, tiny_draft, capsys):
    code = finetune.main(["--draft", str(tiny_draft), "--data", str(tmp_path / "missing.jsonl"),
                          "--out", str(tmp_path / "x"), "--lora", "--device", "cpu"])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().out
