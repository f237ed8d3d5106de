"""specdec.kd: KL and TV on the full vocabulary and on the top-k partition; freezing in finetune."""

import pytest
import torch
from safetensors.torch import load_file

from specdec import finetune
from specdec.finetune import FinetuneConfig
from specdec.kd import kd_kl, kd_losses, topk_of
from specdec.models import load_model, read_manifest
from conftest import make_tiny_llama, save_tiny_chat_model, write_chat_data


def test_topk_partition_is_a_distribution():
    logits = torch.randn(6, 37) * 3
    top = topk_of(logits, 5, temperature=1.5)
    assert top.ids.shape == (6, 5) and top.residual.shape == (6,)
    total = top.logprobs.exp().sum(-1) + top.residual.exp()
    torch.testing.assert_close(total, torch.ones(6), rtol=0, atol=1e-6)
    full = torch.log_softmax(logits / 1.5, -1)
    torch.testing.assert_close(top.logprobs, full.gather(-1, top.ids))
    assert topk_of(logits, 1000, 1.0).k == 36  # the residual bucket keeps at least one id


def test_identical_distributions_have_zero_kl_and_tv():
    logits = torch.randn(5, 11)
    for target in (logits, topk_of(logits, 3)):
        kl, tv = kd_losses(logits, target)
        assert kl.item() == pytest.approx(0.0, abs=1e-6)
        assert tv.item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_partition_losses_bound_the_full_ones_and_tv_is_in_range():
    draft, target = torch.randn(8, 50), torch.randn(8, 50) * 2
    kl_full, tv_full = kd_losses(draft, target, temperature=1.3)
    torch.testing.assert_close(kl_full, kd_kl(draft, target, temperature=1.3))
    for k in (1, 4, 16):
        kl_k, tv_k = kd_losses(draft, topk_of(target, k, 1.3), temperature=1.3)
        # merging ids into one bucket can only lose information (data processing inequality)
        assert 0 < kl_k.item() <= kl_full.item() + 1e-5
        assert 0 < tv_k.item() <= tv_full.item() + 1e-5
    assert tv_full.item() <= 8  # at most 1 per token
    # 1 - TV is sum min(target_probs, draft_probs), the acceptance alpha
    alpha = torch.minimum(draft.softmax(-1), target.softmax(-1)).sum(-1)
    torch.testing.assert_close(kd_losses(draft, target)[1], (1 - alpha).sum())


def test_tv_gradients_train_a_tiny_draft_towards_the_target():
    draft, target = make_tiny_llama(seed=1, vocab_size=40), make_tiny_llama(seed=2, vocab_size=40)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = topk_of(target(ids).logits.flatten(0, 1), 8)
    opt = torch.optim.Adam(draft.parameters(), lr=3e-3)
    tvs = []
    for _ in range(6):
        _, tv = kd_losses(draft(ids).logits.flatten(0, 1), top)
        opt.zero_grad()
        tv.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in draft.parameters())
        opt.step()
        tvs.append(tv.item())
    assert tvs[-1] < tvs[0] * 0.8, tvs


# ---------------------------------------------------------------------------- freezing


@pytest.fixture(scope="module")
def cut_draft(tmp_path_factory):
    # a 3-layer draft cut from a 5-layer target: layers 2 and 3 removed, so draft layers 0 and
    # 1 sit below the cut
    return save_tiny_chat_model(tmp_path_factory.mktemp("cut") / "draft", seed=3, num_layers=3,
                                manifest={"stage": "prune", "target": None,
                                          "removed_layers": [2, 3]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "d.jsonl", n=8)


def cfg_for(draft, data, out, **kw):
    base = dict(draft=str(draft), data=str(data), out=str(out), max_prompt_tokens=60,
                batch_size=4, micro_batch_size=2, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                lora_rank=4, lora_alpha=8, lora_dropout=0.0, device="cpu", save_every=0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_frozen_parameters_get_no_gradients(cut_draft, data):
    cfg = cfg_for(cut_draft, data, "unused", method="full", freeze_below_cut=True,
                  freeze_embeddings=True)
    frozen = finetune.frozen_layers(cfg, cut_draft, read_manifest(cut_draft))
    assert frozen == [0, 1]
    model, _ = load_model(cut_draft)
    model, trainable = finetune.trainable_model(cfg, model, frozen)
    assert not [n for n in trainable if "layers.0." in n or "layers.1." in n or "embed" in n]
    model(torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in trainable), name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_freeze_below_cut_and_embeddings_leave_those_weights_unchanged(tmp_path, cut_draft,
                                                                       data, method):
    result = finetune.run(cfg_for(cut_draft, data, tmp_path / "out", method=method,
                                  freeze_below_cut=True, freeze_embeddings=True))
    before = load_file(str(cut_draft / "model.safetensors"))
    after = load_file(str(result.out / "model.safetensors"))
    for name in before:
        same = torch.equal(before[name], after[name])
        if "layers.0." in name or "layers.1." in name or "embed" in name:
            assert same, name
        elif "layers.2." in name and "proj" in name:
            assert not same, name  # the layer above the cut trains (LoRA: merged adapters)
    assert result.manifest["frozen_layers"] == [0, 1]
    assert result.manifest["recipe"]["freeze_below_cut"] is True


def test_freeze_below_cut_needs_removed_layers(tmp_path, data):
    draft = save_tiny_chat_model(tmp_path / "plain", seed=1)
    with pytest.raises(ValueError, match="removed_layers"):
        finetune.run(cfg_for(draft, data, tmp_path / "out", freeze_below_cut=True))
    assert not (tmp_path / "out").exists()
