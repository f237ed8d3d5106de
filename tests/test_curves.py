"""Learning curves: the quality probe during fine-tuning and the curves plot (tiny models)."""

from __future__ import annotations

import pytest
from conftest import save_tiny_chat_model, tiny_chat_tokenizer, write_chat_data

from specdec import curves, finetune
from specdec.data import chat_ids
from specdec.evaluate import Answer
from specdec.finetune import FinetuneConfig
from specdec.models import load_model, read_manifest


def _answers(tok, n=3):
    out = []
    for i in range(n):
        prompt = chat_ids(tok, [{"role": "user", "content": f"say {i}"}])
        answer = tok.encode(f"Hi {i}! Here is {i}.", add_special_tokens=False)
        out.append(Answer(f"r{i}", "c", 1, prompt + answer, len(prompt)))
    return out


def test_probe_in_finetune_and_plot(tmp_path, monkeypatch):
    target_dir = save_tiny_chat_model(tmp_path / "target", seed=0, num_layers=3)
    draft_dir = save_tiny_chat_model(tmp_path / "draft", seed=1, num_layers=2,
                                     manifest={"stage": "prune", "target": str(target_dir)})
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    target, _ = load_model(target_dir)
    answers = _answers(tiny_chat_tokenizer())
    # the probe of a draft identical to the target agrees everywhere
    probe = curves.QualityProbe(target, answers)
    assert probe(target)["top1"] == 1.0
    built = []

    def for_target(name, n, max_new_tokens, console=None):
        built.append(name)
        return curves.QualityProbe(target, answers)

    monkeypatch.setattr(curves.QualityProbe, "for_target", staticmethod(for_target))
    runs = []
    for name, lr in (("a", 1e-2), ("b", 3e-2)):
        cfg = FinetuneConfig(draft=str(draft_dir), data=str(data), out=str(tmp_path / name),
                             max_prompt_tokens=60, batch_size=4, micro_batch_size=2, max_steps=5,
                             lr=lr, method="full", device="cpu", save_every=0, eval_every=2)
        result = finetune.run(cfg)
        probed = [r for r in result.curve if "eval" in r]
        assert [r["step"] for r in probed] == [2, 4, 5]  # every 2 steps and the last
        assert all(0 <= r["eval"]["top1"] <= 1 and r["eval"]["mal"]["4"] >= 1 for r in probed)
        tokens = [r["train_tokens"] for r in result.curve]
        assert tokens == sorted(tokens) and tokens[0] > 0
        assert read_manifest(result.out)["eval_before"]["answers"] == 3
        # the probe does not change the recipe: same fingerprint as without it
        plain = finetune.fingerprint(FinetuneConfig(**{**cfg.__dict__, "eval_every": 0}).recipe(),
                                     "x", "y")
        assert plain == finetune.fingerprint(cfg.recipe(), "x", "y")
        runs.append(str(result.out))
    assert built == [str(target_dir), str(target_dir)]
    table = curves.plot(runs, tmp_path / "curve.png", "tiny")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert [p["step"] for p in table["a"]] == [0, 2, 4, 5]
    assert curves.main([*runs, "--out", str(tmp_path / "c2.png")]) == 0
    with pytest.raises(ValueError, match="loss_curve.json does not exist"):
        curves.read_curve(tmp_path / "nothing")
