"""The engine's KV cache and forward: slab layers and the lean Llama forward.

`SlabLayer` must behave as Hugging Face's DynamicLayer (same keys and values after any mix of
updates, crops, row selection and compaction gathers), and `LeanLlamaForward` must return
bitwise the same logits as ``model(...)`` in every shape the engine uses: prefill into an empty
cache, one token, k + 1 tokens after a non-empty cache (no mask given: causal bottom-right),
and a batch with holes (a 4D boolean mask).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specdec.decode.engine import SpeculativeEngine
from specdec.decode.forward import LeanLlamaForward, hf_forward, lean_supported
from specdec.decode.kv import BatchKV, SlabLayer, make_cache
from specdec.decode.packed import (
    WEIGHT_MAJOR_ROWS,
    packed,
    packing_supported,
    weight_major,
    weight_major_supported,
)
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


@pytest.mark.parametrize("precision",
                         ["fp32-plain", "fp32-rowmm", "fp32-weight-major", "bf16-packed"])
def test_lean_forward_is_bitwise_hf(model, precision, monkeypatch):
    """fp32 with plain linears (pack=False); fp32 with the few-row kernel (the default on an
    AVX2 CPU, rowmm.py) or, where it cannot run, the weight-major few-row path (packed.py):
    equal to rounding (weight-major: bitwise where one row goes through a linear); bf16 with
    the linears prepacked for oneDNN (the default there): bitwise."""
    from specdec.decode import rowmm

    if precision == "bf16-packed":
        model = copy.deepcopy(model).to(torch.bfloat16)
        if packing_supported(model) is not None:
            pytest.skip(packing_supported(model))
    if precision == "fp32-rowmm" and rowmm.rowmm_supported(model) is not None:
        pytest.skip(rowmm.rowmm_supported(model))
    if precision == "fp32-weight-major":
        monkeypatch.setattr(rowmm, "rowmm_supported", lambda m=None: "turned off by the test")
    lean = LeanLlamaForward(model, pack=False if precision == "fp32-plain" else None)
    hf = hf_forward(model)
    assert lean.pack == (precision == "bf16-packed")
    assert lean.rowmm == (precision == "fp32-rowmm")
    assert lean.weight_major == (precision == "fp32-weight-major")

    def same(a, b):  # few-row paths: equal to rounding
        if precision not in ("fp32-weight-major", "fp32-rowmm"):
            return torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return True

    torch.manual_seed(1)
    with torch.inference_mode():
        slab, dyn = make_cache(model, 32), DynamicCache(config=model.config)
        width = 0
        for q in (7, 1, 4, 1, 5):  # prefill, decode, verification after a non-empty cache
            ids = torch.randint(0, 97, (2, q))
            pos = torch.arange(width, width + q)[None].expand(2, q)
            a = lean(ids, None, pos, slab, 0)
            b = hf(ids, None, pos, dyn, 0)
            assert same(a, b), f"q={q}: max diff {(a - b).abs().max()}"
            assert same(lean(ids[:, -1:], None, pos[:, -1:] + q, slab, 1),
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
        assert same(lean(ids, mask, pos, slab, 0), hf(ids, mask, pos, dyn, 0))


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


def _one_by_one_vs_together(model, row_exact, prompt, tokens, chunk):
    """Logits of `tokens` fed one slot per forward, and `chunk` slots per forward, after the
    same prefill of `prompt` (batch 1, dense: the engine's verification shape)."""
    cpu = torch.device("cpu")
    single, together = BatchKV(model, 1, cpu, 256, row_exact=row_exact), \
        BatchKV(model, 1, cpu, 256, row_exact=row_exact)
    single.forward(prompt)
    together.forward(prompt)
    one = torch.cat([single.forward(tokens[:, j:j + 1]) for j in range(tokens.shape[1])], 1)
    many = torch.cat([together.forward(tokens[:, s:s + chunk])
                      for s in range(0, tokens.shape[1], chunk)], 1)
    return one, many


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_exact_verification_is_one_token_forwards(dtype):
    """row_exact: a (k + 1)-slot forward after a non-empty cache gives exactly the logits of
    k + 1 one-slot forwards (bf16: bitwise; fp32 projections take another GEMM path for one
    row, so there only to rounding), and the same values as the single masked sdpa call."""
    model = make_tiny_llama(seed=5, num_layers=3, hidden_size=128, num_heads=4,
                            num_kv_heads=2, intermediate_size=256).to(dtype)
    torch.manual_seed(2)
    prompt, tokens = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        one, many = _one_by_one_vs_together(model, True, prompt, tokens, chunk=4)
        _, plain = _one_by_one_vs_together(model, False, prompt, tokens, chunk=4)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(plain.float(), many.float(), rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        assert torch.equal(one, many), f"max diff {(one.float() - many.float()).abs().max()}"
    else:
        torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_row_exact_with_a_mask_uses_each_rows_mask():
    """Batched (a 4D mask with holes): slot j attends to what its mask row allows, over the
    first W + j + 1 slots -- the same values as the single masked call."""
    model = make_tiny_llama(seed=6, num_heads=4, num_kv_heads=2)
    exact, plain = LeanLlamaForward(model, row_exact=True), LeanLlamaForward(model)
    torch.manual_seed(3)
    with torch.inference_mode():
        caches = make_cache(model, 32), make_cache(model, 32)
        ids = torch.randint(0, 97, (2, 6))
        pos = torch.arange(6)[None].expand(2, 6)
        for fwd, cache in zip((exact, plain), caches):
            fwd(ids, None, pos, cache, 0)
        valid = torch.rand(2, 9) > 0.3
        valid[:, -3:] = True
        causal = torch.arange(9)[None, :] <= torch.arange(6, 9)[:, None]
        mask = valid[:, None, None, :] & causal[None, None]
        ids = torch.randint(0, 97, (2, 3))
        pos = valid.cumsum(1)[:, -3:] - 1
        a, b = exact(ids, mask, pos, caches[0], 0), plain(ids, mask, pos, caches[1], 0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_bf16_verification_feeds_its_linears_slot_by_slot(dtype):
    """On the CPU oneDNN's bf16 products need not be row-invariant (an AVX-512 bf16 CPU rounds
    an output of a 5-row down_proj differently from the 1-row one now and then), so a row-exact
    bf16 verification gives every linear one slot at a time, as a one-token forward does; fp32
    keeps whole products (rowmm and the weight-major path are row-invariant)."""
    model = make_tiny_llama(seed=5, num_layers=2, hidden_size=128, num_heads=4,
                            num_kv_heads=2, intermediate_size=256).to(dtype)
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    fwd = LeanLlamaForward(model, row_exact=True, pack=False)
    with torch.inference_mode():
        cache = make_cache(model, 32)
        fwd(torch.randint(0, 97, (1, 6)), None, torch.arange(6)[None], cache, 0)  # the prompt
        assert set(seen) == {6}
        seen.clear()
        fwd(torch.randint(0, 97, (1, 4)), None, torch.arange(6, 10)[None], cache, 0)  # a verification
    calls, rows = (4, 1) if dtype == torch.bfloat16 else (1, 4)  # per linear, for 4 slots
    assert len(seen) == (2 * 7 + 1) * calls and set(seen) == {rows}  # 7 linears a layer + head


def test_smollm2_bf16_verification_equals_target_alone(smollm2_path):
    """SmolLM2 in bf16, the case that broke greedy identity before row_exact: 5-slot
    verifications give bitwise the logits of one-token decoding, so a bf16 speculative decode
    is token-identical to the bf16 target alone."""
    from specdec.models import load_model

    model, tok = load_model(smollm2_path, dtype=torch.bfloat16)
    prompt = torch.tensor([tok.apply_chat_template(
        [{"role": "user", "content": "Explain how a transformer language model works."}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    params = SamplingParams(temperature=0, max_tokens=30)
    with torch.inference_mode():
        alone = SpeculativeEngine(model, None, tokenizer=tok).generate([prompt[0].tolist()],
                                                                       params)[0].token_ids
        one, many = _one_by_one_vs_together(model, True, prompt, torch.tensor([alone]), 5)
        assert torch.equal(one, many), f"max diff {(one.float() - many.float()).abs().max()}"
        # the target as its own draft: long runs of accepted drafts, every k + 1 slot verified
        out = [SpeculativeEngine(model, model, k=k, tokenizer=tok).generate(
            [prompt[0].tolist()], params)[0].token_ids for k in (1, 4)]
    assert out == [alone, alone]


def test_packed_linear_follows_weight_updates():
    """A packed copy is rebuilt when the weight changes in place or is replaced, so an engine
    never decodes with stale weights; fp32 models and GPU models are not packed."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(32, 48).to(torch.bfloat16)
    if packing_supported(linear) is not None:
        pytest.skip(packing_supported(linear))
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(linear)(x), linear(x))
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(packed(linear)(x), linear(x))
    linear.weight = torch.nn.Parameter(torch.randn(48, 32).to(torch.bfloat16))
    with torch.inference_mode():
        assert torch.equal(packed(linear)(x), linear(x))
    assert "not bfloat16" in packing_supported(torch.nn.Linear(4, 4))


def test_weight_major_linear():
    """fp32 weight-major: one row and long prefills are ``linear(x)`` bitwise, 2-16 rows equal
    it to rounding; it follows a replaced weight; other modules pass through unchanged."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(96, 200, bias=True)
    fast = weight_major(linear)
    lo, hi = WEIGHT_MAJOR_ROWS
    with torch.inference_mode():
        for rows in (1, lo, 5, hi, hi + 1, 40):
            x = torch.randn(1, rows, 96)
            if lo <= rows <= hi:
                torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(fast(x), linear(x))
            assert fast(x).shape == (1, rows, 200) and fast(x).is_contiguous()
        linear.weight = torch.nn.Parameter(torch.randn(200, 96))
        x = torch.randn(3, 96)
        torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)
    other = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert weight_major(other) is other
    assert weight_major_supported(torch.nn.Linear(4, 4)) is None
    assert "not float32" in weight_major_supported(other)


def test_truncate_drops_the_tail_of_a_dense_cache(model):
    """BatchKV.truncate (the concurrent drafter's rollback): the same logits as a cache that
    never held the dropped slots (to rounding: a 5-token prefill attends in other blocks than a
    3-token one); a cache with holes refuses."""
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        kv = BatchKV(model, 1, torch.device("cpu"), 16)
        kv.forward(ids[:, :5])
        kv.truncate(3)
        assert kv.width == 3 and kv.lengths == [3]
        got = kv.forward(ids[:, 5:])
        fresh = BatchKV(model, 1, torch.device("cpu"), 16)
        fresh.forward(ids[:, :3])
        torch.testing.assert_close(got, fresh.forward(ids[:, 5:]), rtol=1e-5, atol=1e-5)
        kv.truncate(1)
        assert kv.width == 1 and kv.lengths == [1]
        holes = BatchKV(model, 2, torch.device("cpu"), 16)
        holes.forward(torch.ones(2, 3, dtype=torch.int64),
                      torch.tensor([[False, True, True], [True, True, True]]), [2, 3])
        with pytest.raises(ValueError, match="dense"):
            holes.truncate(1)
