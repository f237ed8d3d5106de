"""The engine's KV cache and forward: slab layers and the lean Llama forward.

`SlabLayer` must behave as Hugging Face's DynamicLayer (same keys and values after any mix of
updates, crops, row selection and compaction gathers), and `LeanLlamaForward` must return
bitwise the same logits as ``model(...)`` in every shape the engine uses: prefill into an empty
cache, one token, k + 1 tokens after a non-empty cache (no mask given: causal bottom-right),
and a batch with holes (a 4D boolean mask).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specdec.decode.engine import SpeculativeEngine
from specdec.decode.forward import LeanLlamaForward, hf_forward, lean_supported
from specdec.decode.kv import BatchKV, SlabLayer, make_cache
from specdec.decode.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=3, num_heads=4, num_kv_heads=2)  # grouped-query attention


def test_slab_layer_matches_dynamic_layer():
    torch.manual_seed(0)
    slab, dyn = SlabLayer(capacity=9), DynamicLayer()
    slab.headroom = 2  # force several reallocations

    def both(fn):
        fn(slab)
        fn(dyn)
        assert slab.get_seq_length() == dyn.get_seq_length()
        assert torch.equal(slab.keys, dyn.keys) and torch.equal(slab.values, dyn.values)

    for n, crop in ((3, 0), (5, -2), (1, 0), (4, -4), (7, -1)):  # grows past capacity too
        k, v = torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8)
        out = slab.update(k, v)
        dyn.update(k, v)
        assert torch.equal(out[0], dyn.keys)
        if crop:
            both(lambda layer: layer.crop(crop))
    both(lambda layer: layer.batch_select_indices(torch.tensor([2, 0])))
    index = torch.tensor([[0, 2, 5, 6], [1, 3, 4, 6]])  # compaction: keep these slots per row
    slab.gather_slots(index)
    idx = index[:, None, :, None].expand(-1, 2, -1, 8)
    dyn.keys, dyn.values = dyn.keys.gather(2, idx), dyn.values.gather(2, idx)
    assert torch.equal(slab.keys, dyn.keys) and torch.equal(slab.values, dyn.values)
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    both(lambda layer: layer.update(k, v))
    slab.reset()
    assert slab.get_seq_length() == 0 and slab.keys is None


def test_lean_forward_is_bitwise_hf(model):
    lean, hf = LeanLlamaForward(model), hf_forward(model)
    torch.manual_seed(1)
    with torch.inference_mode():
        slab, dyn = make_cache(model, 32), DynamicCache(config=model.config)
        width = 0
        for q in (7, 1, 4, 1, 5):  # prefill, decode, verification after a non-empty cache
            ids = torch.randint(0, 97, (2, q))
            pos = torch.arange(width, width + q)[None].expand(2, q)
            a = lean(ids, None, pos, slab, 0)
            b = hf(ids, None, pos, dyn, 0)
            assert torch.equal(a, b), f"q={q}: max diff {(a - b).abs().max()}"
            assert torch.equal(lean(ids[:, -1:], None, pos[:, -1:] + q, slab, 1),
                               hf(ids[:, -1:], None, pos[:, -1:] + q, dyn, 1))
            slab.crop(-1)
            dyn.crop(-1)
            width += q
        # a batch with holes: a 4D boolean mask, as BatchKV builds it
        valid = torch.rand(2, width + 3) > 0.3
        valid[:, -3:] = True
        causal = torch.arange(width + 3)[None, :] <= torch.arange(width, width + 3)[:, None]
        mask = valid[:, None, None, :] & causal[None, None]
        ids = torch.randint(0, 97, (2, 3))
        pos = valid.cumsum(1)[:, -3:] - 1
        assert torch.equal(lean(ids, mask, pos, slab, 0), hf(ids, mask, pos, dyn, 0))


def test_forward_choice(model):
    assert lean_supported(model) is None
    assert isinstance(BatchKV(model, 1, torch.device("cpu"))._forward, LeanLlamaForward)
    assert not isinstance(BatchKV(model, 1, torch.device("cpu"), lean=False)._forward,
                          LeanLlamaForward)
    eager = make_tiny_llama(seed=3)
    eager.set_attn_implementation("eager")
    assert "sdpa" in lean_supported(eager)
    assert not isinstance(BatchKV(eager, 1, torch.device("cpu"))._forward, LeanLlamaForward)


def test_lean_and_hf_engines_agree(model):
    """The engine with and without the lean forward: identical tokens, batched and sampled."""
    draft = make_tiny_llama(seed=4, num_layers=2)
    prompts = [[1, 5, 9], [1, 7, 7, 7, 3, 2, 8], [4]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=10, max_tokens=12, seed=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    for d in (None, draft):
        lean = SpeculativeEngine(model, d, k=3).generate(prompts, params)
        hf = SpeculativeEngine(model, d, k=3, lean=False).generate(prompts, params)
        assert [r.token_ids for r in lean] == [r.token_ids for r in hf]
