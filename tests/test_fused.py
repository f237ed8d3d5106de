"""The fused decoder step (specdec.decode.fused): equal to ``model(...)`` to rounding for every
decode and verification shape it takes, row-invariant (a verification's logits equal one-token
decoding's bit for bit), writing the same keys and values into the cache, on fp32 and w8
models, and out of the way of everything it does not take."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from transformers import DynamicCache

from specdec.decode import fused, rowmm
from specdec.decode.forward import LeanLlamaForward, hf_forward
from specdec.decode.kv import BatchKV, SlabLayer, make_cache
from specdec.quant import quantize_weights

pytestmark = pytest.mark.skipif(rowmm.rowmm_supported() is not None,
                                reason=f"rowmm: {rowmm.rowmm_supported()}")

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("shape", [
    {"num_heads": 4, "num_kv_heads": 2},  # grouped-query attention, head_dim 16
    {"hidden_size": 48, "num_heads": 4, "num_kv_heads": 4},  # head_dim 12: not a multiple of 8
])
def test_fused_steps_match_hf(shape):
    model = make_tiny_llama(seed=7, **shape)
    lean, hf = LeanLlamaForward(model), hf_forward(model)
    assert lean.fused is not None
    torch.manual_seed(2)
    with torch.inference_mode():
        slab, dyn = make_cache(model, 8), DynamicCache(config=model.config)  # grows past 8
        width = 0
        for q in (7, 1, 4, 1, 16, 3):  # a prefill (PyTorch), then steps and verifications
            ids = torch.randint(0, 97, (1, q))
            pos = torch.arange(width, width + q)[None]
            a, b = lean(ids, None, pos, slab, 0), hf(ids, None, pos, dyn, 0)
            torch.testing.assert_close(a, b, **CLOSE)
            torch.testing.assert_close(lean(ids[:, -1:], None, pos[:, -1:] + q, slab, 1),
                                       hf(ids[:, -1:], None, pos[:, -1:] + q, dyn, 1), **CLOSE)
            slab.crop(-1)
            dyn.crop(-1)
            width += q
        for mine, theirs in zip(slab.layers, dyn.layers):  # the cache holds the same slots
            torch.testing.assert_close(mine.keys, theirs.keys, **CLOSE)
            torch.testing.assert_close(mine.values, theirs.values, **CLOSE)


@pytest.mark.parametrize("w8", [False, True])
def test_fused_verification_equals_one_token_steps_bitwise(w8):
    model = make_tiny_llama(seed=5)
    if w8:
        model = quantize_weights(model)
    kv_once, kv_steps = BatchKV(model, 1, torch.device("cpu")), BatchKV(model, 1, torch.device("cpu"))
    assert kv_once._forward.fused is not None
    torch.manual_seed(3)
    # rows over 6..11 slots: the attention sums scores 8 slots at a time, across that boundary
    prompt, new = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        for kv in (kv_once, kv_steps):
            kv.forward(prompt, logits_to_keep=1)
        together = kv_once.forward(new)
        for j in range(6):
            assert torch.equal(kv_steps.forward(new[:, j:j + 1])[0, 0], together[0, j]), j
        for a, b in zip(kv_once.cache.layers, kv_steps.cache.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("w8", [False, True])
def test_fused_forward_does_not_depend_on_the_thread_count(w8):
    """The projections split their output tiles over the threads, the attention its (row,
    head) pairs: every output is computed as on one thread."""
    model = make_tiny_llama(seed=9, num_heads=4, num_kv_heads=2)
    if w8:
        model = quantize_weights(model)
    torch.manual_seed(5)
    prompt, new = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 5))
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            kv = BatchKV(model, 1, torch.device("cpu"))
            assert kv._forward.fused is not None
            with torch.inference_mode():
                kv.forward(prompt, logits_to_keep=1)
                out[n] = (kv.forward(new), kv.forward(new[:, :1]),
                          [layer.keys.clone() for layer in kv.cache.layers])
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        assert torch.equal(out[n][0], out[1][0]) and torch.equal(out[n][1], out[1][1]), n
        assert all(torch.equal(a, b) for a, b in zip(out[n][2], out[1][2])), n


def test_fused_w8_matches_the_w8_models_pytorch_forward():
    model = quantize_weights(make_tiny_llama(seed=6))
    lean = LeanLlamaForward(model)
    plain = LeanLlamaForward(model)
    plain.fused = None  # the same w8 model through the PyTorch path
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        a_cache, b_cache = make_cache(model, 32), make_cache(model, 32)
        lean(ids[:, :8], None, torch.arange(8)[None], a_cache, 1)
        plain(ids[:, :8], None, torch.arange(8)[None], b_cache, 1)
        torch.testing.assert_close(lean(ids[:, 8:], None, torch.arange(8, 12)[None], a_cache, 0),
                                   plain(ids[:, 8:], None, torch.arange(8, 12)[None], b_cache, 0),
                                   rtol=1e-4, atol=1e-4)


def test_fused_w8_refuses_tiles_laid_out_for_the_other_int8_kernel():
    model = quantize_weights(make_tiny_llama(seed=6))  # tiles for the default kernels
    lean = LeanLlamaForward(model)
    ids = torch.randint(0, 97, (1, 9))
    default = rowmm.select_kernels()
    try:
        with torch.inference_mode():
            cache = make_cache(model, 32)
            lean(ids[:, :8], None, torch.arange(8)[None], cache, 1)
            if rowmm.select_kernels("avx2" if default == "avx512" else "avx512") == default:
                pytest.skip("one int8 kernel on this CPU")
            with pytest.raises(RuntimeError, match="select the kernels first"):
                lean(ids[:, 8:], None, torch.tensor([[8]]), cache, 0)
    finally:
        rowmm.select_kernels()


def test_fused_leaves_other_forwards_to_pytorch(monkeypatch):
    """A prefill, a batch, a mask and more than 16 rows take the PyTorch path (the fused call
    would raise here); the switch and unsupported models say why they are not fused."""
    model = make_tiny_llama(seed=8)
    lean = LeanLlamaForward(model)

    def boom(*args, **kwargs):
        raise AssertionError("the fused path took a forward it should not")

    monkeypatch.setattr(lean.fused, "__call__", boom, raising=False)
    monkeypatch.setattr(fused.FusedLlama, "__call__", boom)
    with torch.inference_mode():
        cache = make_cache(model, 64)
        lean(torch.randint(0, 97, (1, 5)), None, torch.arange(5)[None], cache, 1)  # past == 0
        lean(torch.randint(0, 97, (1, 17)), None, torch.arange(5, 22)[None], cache, 1)  # 17 rows
        mask = torch.ones(1, 1, 1, 23, dtype=torch.bool)
        lean(torch.randint(0, 97, (1, 1)), mask, torch.tensor([[22]]), cache, 1)  # a mask
        batch = make_cache(model, 64)
        lean(torch.randint(0, 97, (2, 5)), None, torch.arange(5)[None].expand(2, 5), batch, 1)
        lean(torch.randint(0, 97, (2, 1)), None, torch.tensor([[5], [5]]), batch, 1)  # batch 2
    monkeypatch.setenv("SPECDEC_FUSED", "0")
    assert "SPECDEC_FUSED=0" in fused.fused_supported(model)
    assert LeanLlamaForward(model).fused is None
    monkeypatch.delenv("SPECDEC_FUSED")
    biased = copy.deepcopy(model)
    biased.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
    assert "q_proj" in fused.fused_supported(biased)
    assert LeanLlamaForward(biased).fused is None


def test_slab_reserve_grows_and_keeps_the_slots():
    layer = SlabLayer(capacity=4)
    with pytest.raises(RuntimeError, match="holds slots already"):
        layer.reserve(1)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    layer.headroom = 0
    layer.update(k, v)
    keys, values = layer.reserve(5)  # past the 3 allocated slots and the capacity
    assert layer.length == 8 and keys.shape[2] >= 8
    assert torch.equal(keys[:, :, :3], k) and torch.equal(values[:, :, :3], v)
