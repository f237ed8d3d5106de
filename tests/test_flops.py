"""Analytic parameters and FLOPs against the real modules and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, tiny_llama_config
from transformers import LlamaConfig

from specdec import flops
from specdec.flops import (
    LlamaShape,
    decode_flops,
    expected_tokens_per_step,
    measure_flops,
    meta_param_count,
    param_counts,
    prefill_flops,
    pruning_reduction,
    spec_cost,
)

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
)


def _close(measured: float, analytic: float, rel: float = 0.02) -> bool:
    return abs(measured - analytic) <= rel * analytic


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_module(tied):
    model = make_tiny_llama(num_layers=3, tie_word_embeddings=tied)
    assert param_counts(model.config).total == sum(p.numel() for p in model.parameters())


def test_param_count_with_biases():
    config = tiny_llama_config(num_layers=2)
    config.attention_bias = True
    config.mlp_bias = True
    assert param_counts(config).total == meta_param_count(config)


def test_llama_8b_from_config_alone():
    config = LlamaConfig(**LLAMA_8B)
    full = param_counts(config).total
    assert full == meta_param_count(config) == 8_030_261_248
    config.num_hidden_layers = 26
    pruned = param_counts(config).total
    assert pruned == meta_param_count(config) == 6_721_589_248
    assert round(full / 1e9, 2) == 8.03 and round(pruned / 1e9, 2) == 6.72
    rows = {c.name: c.reduction for c in pruning_reduction(LlamaConfig(**LLAMA_8B), drop=6)}
    # The paper's 16.3% is the all-parameter ratio, equivalently 2N FLOPs with embeddings at T=0.
    assert round(100 * rows["params, all"], 1) == 16.3
    assert round(100 * rows["FLOPs/tok T=0, with emb (2N rule)"], 1) == 16.3
    assert round(100 * rows["FLOPs/tok T=0, LM head, no emb"], 1) == 17.4
    assert rows["FLOPs/tok T=0, layers only"] == pytest.approx(6 / 32)


def test_registry_8b_config_matches():
    from specdec.models import known_config

    config = known_config("llama-3.1-8b-instruct")
    assert LlamaShape.from_config(config) == LlamaShape.from_config(LlamaConfig(**LLAMA_8B))


@pytest.mark.parametrize("tied", [True, False])
def test_flop_counter_tiny_prefill_and_decode(tied):
    model = make_tiny_llama(num_layers=3, tie_word_embeddings=tied, num_heads=4, num_kv_heads=2)
    ids = torch.randint(3, 97, (2, 11))
    measured = measure_flops(model, ids)
    analytic = 2 * prefill_flops(model.config, 11, causal=False).total  # batch of 2
    assert _close(measured, analytic)
    assert measured == analytic  # exact on matmuls
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    measured = measure_flops(model, ids[:, :1], past_key_values=cache)
    assert measured == 2 * decode_flops(model.config, 12).total


def test_measure_flops_restores_attention():
    model = make_tiny_llama(num_layers=1)
    before = model.config._attn_implementation
    measure_flops(model, torch.randint(3, 97, (1, 4)))
    assert model.config._attn_implementation == before


def test_causal_counts_fewer_attention_flops():
    config = tiny_llama_config()
    full, causal = prefill_flops(config, 16, causal=False), prefill_flops(config, 16, causal=True)
    assert causal.attn_context == pytest.approx(full.attn_context * 17 / 32)
    assert causal.mlp == full.mlp and causal.attn_proj == full.attn_proj
    last = prefill_flops(config, 16, all_logits=False)
    assert last.lm_head == full.lm_head / 16


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(1.5, 2)
    with pytest.raises(ValueError, match="k"):
        expected_tokens_per_step(0.5, 0)


def test_spec_cost_model():
    target = LlamaConfig(**LLAMA_8B)
    draft = LlamaShape.from_config(target).with_layers(26)
    sc = spec_cost(target, draft, k=4, alpha=0.8, context=512)
    tau = (1 - 0.8**5) / 0.2
    assert sc.tokens_per_step == pytest.approx(tau)
    assert sc.flops_per_token == pytest.approx((4 * sc.draft_flops + 5 * sc.target_flops) / tau)
    assert sc.speedup == pytest.approx(tau / (4 * sc.cost_ratio + 1))
    free = spec_cost(target, draft, k=4, alpha=0.8, cost_ratio=0.0)
    assert free.speedup == pytest.approx(tau)


def test_cli_8b_offline(capsys):
    assert flops.main(["--model", "llama-3.1-8b-instruct", "--drop", "6", "--alpha", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "16.30%" in out and "8.030G" in out and "6.722G" in out and "speedup" in out


def test_cli_checkpoint_dir_and_errors(tmp_path, capsys):
    model = make_tiny_llama(num_layers=4)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "m")
    assert flops.main(["--model", str(tmp_path / "m"), "--draft", str(tmp_path / "m"),
                       "--k", "3", "--alpha", "0.5"]) == 0
    assert "speedup" in capsys.readouterr().out
    assert flops.main(["--model", str(tmp_path / "m"), "--drop", "4"]) == 2
    assert "--drop must be in 1..3" in capsys.readouterr().out
    assert flops.main(["--model", "no-such-model"]) == 2


@pytest.mark.slow
def test_flop_counter_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (1, 64))
    assert _close(measure_flops(model, ids), prefill_flops(model.config, 64, causal=False).total)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    measured = measure_flops(model, ids[:, :1], past_key_values=cache)
    assert _close(measured, decode_flops(model.config, 65).total)
    assert param_counts(model.config).total == sum(p.numel() for p in model.parameters())
