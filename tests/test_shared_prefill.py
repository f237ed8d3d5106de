"""A draft whose bottom layers are the target's own prefills from the target's prefill
(`forward.shared_layers`, `BatchKV.prefill_from`, the engine's ``share_prefill``): the layers
are counted exactly, the draft's cache and logits come out as its own prefill computes them, and
decoding stays the target's own, batched and w8 included."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from specdec.decode.engine import SpeculativeEngine
from specdec.decode.forward import shared_layers
from specdec.decode.kv import BatchKV
from specdec.decode.sampling import SamplingParams
from specdec.quant import quantize_weights

CPU = torch.device("cpu")


def draft_sharing(target, n: int, seed: int = 11):
    """A copy of `target` whose layers from n up are perturbed (its bottom n stay the target's)."""
    draft = copy.deepcopy(target)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in draft.model.layers[n:]:
            for p in layer.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return draft


def test_shared_layers_counts_the_bottom_layers_that_are_the_targets():
    target = make_tiny_llama(seed=1)
    assert shared_layers(target, target) == 4
    assert shared_layers(target, copy.deepcopy(target)) == 4
    assert shared_layers(target, draft_sharing(target, 2)) == 2
    assert shared_layers(target, draft_sharing(target, 0)) == 0
    assert shared_layers(target, quantize_weights(copy.deepcopy(target))) == 4  # fp32 originals
    other_embedding = copy.deepcopy(target)
    with torch.no_grad():
        other_embedding.model.embed_tokens.weight[5] += 1.0
    assert shared_layers(target, other_embedding) == 0
    assert shared_layers(target, torch.nn.Linear(2, 2)) == 0  # not a model the lean forward takes
    cut = copy.deepcopy(target)  # layer 2 removed, as a drop cut: the bottom two stay
    cut.model.layers = torch.nn.ModuleList([cut.model.layers[i] for i in (0, 1, 3)])
    cut.config.num_hidden_layers = 3
    assert shared_layers(target, cut) == 2


def test_prefill_from_gives_the_drafts_own_cache_and_logits():
    target = make_tiny_llama(seed=2)
    draft = draft_sharing(target, 2)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row
    n_valid = [9, 6]
    with torch.inference_mode():
        own = BatchKV(draft, 2, CPU)
        expect = own.forward(ids, valid, n_valid, logits_to_keep=1)
        tkv, dkv = BatchKV(target, 2, CPU), BatchKV(draft, 2, CPU)
        _, hidden = tkv.forward(ids, valid, n_valid, logits_to_keep=1, capture=2)
        got = dkv.prefill_from(tkv, 2, hidden, ids, valid, n_valid, logits_to_keep=1)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
        for mine, theirs in zip(dkv.cache.layers, own.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-6, atol=1e-6)
        assert dkv.lengths == own.lengths and dkv.width == own.width
        step = torch.randint(3, 97, (2, 1))  # and it decodes on from there as its own would
        torch.testing.assert_close(dkv.forward(step), own.forward(step), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="empty cache"):
            dkv.prefill_from(tkv, 2, hidden, ids, valid, n_valid)


@pytest.mark.parametrize("w8", [False, True])
def test_engine_shares_the_prefill_and_stays_lossless(w8):
    target = make_tiny_llama(seed=3)
    draft = draft_sharing(target, 3)
    if w8:
        draft = quantize_weights(draft)
    prompts = [[5, 17, 33, 8, 41, 9, 12], [7, 3, 60, 22]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = SpeculativeEngine(target, None).generate(prompts, params)
    embeds = []
    draft.model.embed_tokens.register_forward_hook(lambda *a: embeds.append(1))
    results = {}
    for share in (False, True):
        engine = SpeculativeEngine(target, draft, k=3, share_prefill=share)
        assert engine.shared_layers == (3 if share else 0)
        embeds.clear()
        results[share] = engine.generate(prompts, params)
        results[share, "embeds"] = len(embeds)
        for got, want in zip(results[share], alone):
            assert got.token_ids == want.token_ids
    # sharing skips the draft's own prefill (its only embedding call outside the draft steps)
    assert results[False, "embeds"] - results[True, "embeds"] == 1
    if not w8:  # an fp32 draft's bottom layers compute what the target's do: the same proposals
        assert ([r.accepted_per_position for r in results[True]]
                == [r.accepted_per_position for r in results[False]])
