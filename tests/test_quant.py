"""int8 drafts (specdec.quant): the draft's linears quantized at load, the target untouched --
``int8`` (activations too, fbgemm) and ``w8`` (weights only, `specdec.decode.rowmm`).

Lossless whatever the draft computes: greedy output identical to the target alone, sampled
output distributed as the target's (chi-square), with a trimmed vocabulary too; teacher-forced
acceptance runs the same int8 modules, so it still predicts the engine's steps exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama, save_tiny_chat_model
from test_decode_engine import (  # noqa: F401  (one_thread, target: fixtures)
    PROMPTS,
    assert_same_greedy,
    drop_layers,
    one_thread,
    spread,
    target,
)
from test_decode_sampling import VOCAB, sample_first_three

from specdec import acceptance
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.reference import target_generate
from specdec.decode.sampling import SamplingParams
from specdec.decode.rowmm import Int8RowLinear
from specdec.quant import (
    PROJECTIONS,
    Int8Linear,
    QuantError,
    load_draft,
    quantize_linears,
    quantize_weights,
)
from specdec.vocab import DraftVocab

SIGNIFICANCE = 1e-3


def int8_draft(model, keep, head=True, kind="int8"):
    """Every projection and (by default) the head in int8: the most a draft is quantized
    (``kind="w8"``: weight-only, always every projection and the head)."""
    if kind == "w8":
        return quantize_weights(drop_layers(model, keep))
    return quantize_linears(drop_layers(model, keep), projections=PROJECTIONS + ("down_proj",),
                            head=head)


KINDS = {"int8": Int8Linear, "w8": Int8RowLinear}


def test_int8_linear_is_close_and_keeps_the_fp32_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    q = Int8Linear(linear)
    x = torch.randn(3, 5, 256)
    with torch.inference_mode():
        exact, approx = linear(x), q(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    rel = (approx - exact).norm() / exact.norm()
    assert 0 < rel < 0.02, rel  # quantized (not the same numbers), and close
    assert q.weight is linear.weight and q.bias is linear.bias
    with pytest.raises(QuantError, match="nn.Linear"):
        Int8Linear(torch.nn.Embedding(4, 4))


def test_smoothing_holds_an_outlier_channel():
    """An input channel 100x larger than the rest (as LLM activations have): per-tensor int8
    activations lose the small channels; SmoothQuant's factors move the outlier into the
    per-channel weight scales and keep the product close."""
    from specdec.quant import smoothing

    torch.manual_seed(1)
    model = make_tiny_llama(seed=2, num_layers=1)
    linear = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 100.0  # channel 5 of q_proj's input
    calib = [[3, 9, 27, 81, 50, 7, 2], [11, 12, 13]]
    scales = smoothing(model, calib, linears=[(None, "q_proj", linear)])
    x = torch.randn(64, linear.in_features)
    x[:, 5] *= 100
    with torch.inference_mode():
        exact = linear(x)
        errors = [((q(x) - exact).norm() / exact.norm()).item()
                  for q in (Int8Linear(linear), Int8Linear(linear, scales[id(linear)]))]
    assert errors[1] < 0.5 * errors[0], errors


def test_quantize_linears_replaces_projections_and_head_keeps_ties(target):
    default = quantize_linears(copy.deepcopy(target), calib=[[1, 2, 3, 4]])
    layer = default.model.layers[0]  # by default: not down_proj, not the head
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and layer.self_attn.q_proj.inv_smooth is not None
    assert type(layer.mlp.down_proj) is torch.nn.Linear and type(default.lm_head) is torch.nn.Linear
    model = int8_draft(target, list(range(target.config.num_hidden_layers)))
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear) and model.specdec_int8
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        a, b = target(ids).logits, model(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8  # a close, not equal, model
    with pytest.raises(QuantError, match="fp32 models on the CPU"):
        quantize_linears(copy.deepcopy(target).to(torch.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("trimmed", [False, True])
def test_int8_draft_greedy_is_the_target(target, k, trimmed, kind):
    draft = int8_draft(target, [0, 3], kind=kind)
    vocab = DraftVocab(torch.arange(0, 97, 2), target.config.vocab_size) if trimmed else None
    engine = SpeculativeEngine(target, draft, k=k, draft_vocab=vocab)
    if trimmed:
        assert isinstance(engine._draft_head, KINDS[kind])  # the sub-head is int8 too
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = engine.generate(PROMPTS, params)  # batched
    for prompt, r in zip(PROMPTS, results):
        assert_same_greedy(target, prompt, r.token_ids, target_generate(target, prompt, params))
    (solo,) = engine.generate([PROMPTS[0]], params)  # batch 1
    assert_same_greedy(target, PROMPTS[0], solo.token_ids,
                       target_generate(target, PROMPTS[0], params))
    assert sum(r.accepted for r in results) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_int8_teacher_forced_acceptance_predicts_the_engine(target, kind):
    """Greedy MAL scored teacher-forced with the int8 draft == the engine's steps with it."""
    vocab = DraftVocab(torch.arange(0, 60), target.config.vocab_size)
    draft = int8_draft(target, [0, 3], kind=kind)
    k = 3
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = SpeculativeEngine(target, draft, k=k, draft_vocab=vocab).generate(PROMPTS, params)
    seqs = [p + r.token_ids for p, r in zip(PROMPTS, results)]
    report = acceptance.compare(target, draft, seqs, [len(p) for p in PROMPTS], ks=[k],
                                progress=False, draft_vocab=vocab, temperature=0)
    committed = sum(len(r.token_ids) for r in results)
    assert report.mean_accepted_length[k] == pytest.approx(committed / sum(r.steps for r in results))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_int8_draft_samples_the_target_distribution(k, kind):
    small = spread(make_tiny_llama(seed=3, vocab_size=VOCAB), 5.0)
    engine = SpeculativeEngine(small, int8_draft(small, [0, 3], kind=kind), k=k, eos_token_ids=[])
    results, _ = sample_first_three(engine, small, significance=SIGNIFICANCE)
    assert sum(r.accepted for r in results) > 0


def test_load_draft(tmp_path):
    path = save_tiny_chat_model(tmp_path / "draft")
    draft, tok = load_draft(path, "int8", calib=[[1, 2, 3]])
    assert isinstance(draft.model.layers[0].self_attn.q_proj, Int8Linear) and tok is not None
    w8, _ = load_draft(path, "w8")
    assert isinstance(w8.model.layers[0].mlp.down_proj, Int8RowLinear)
    assert isinstance(w8.lm_head, Int8RowLinear) and w8.specdec_int8 == "w8"
    fp32, _ = load_draft(path, "float32")  # long names too
    assert type(fp32.lm_head) is torch.nn.Linear
    with pytest.raises(QuantError, match="one of fp32, bf16, fp16, int8"):
        load_draft(path, "int4")
    for dtype in ("int8", "w8"):
        with pytest.raises(QuantError, match="CPU only"):
            load_draft(path, dtype, device="cuda")
