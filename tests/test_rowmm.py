"""The few-row CPU kernel (specdec.decode.rowmm): equal to F.linear to rounding, row-invariant
(a row's result does not depend on the rows around it), int8 weights equal to the dequantized
product, and a verification's logits equal one-token decoding's bit for bit with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from specdec.decode import rowmm
from specdec.decode.forward import LeanLlamaForward
from specdec.decode.kv import make_cache

pytestmark = pytest.mark.skipif(rowmm.rowmm_supported() is not None,
                                reason=f"rowmm: {rowmm.rowmm_supported()}")

SHAPES = [(200, 96), (49, 37), (16, 576), (1, 8)]  # outputs not a multiple of 16, odd inputs


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_matmul_f32_is_linear_and_row_invariant(out_features, in_features):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    tiles = rowmm.tile_major(weight)
    assert tiles.shape == (-(-out_features // 16), in_features, 16)
    x = torch.randn(13, in_features)
    full = rowmm.matmul_f32(x, tiles, out_features)
    torch.testing.assert_close(full, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    for rows in (1, 2, 3, 5, 6, 7, 12):  # 1..6 rows share one pass over a tile, 7+ take two
        for start in (0, 13 - rows):
            part = rowmm.matmul_f32(x[start:start + rows], tiles, out_features)
            assert torch.equal(part, full[start:start + rows]), (rows, start)
    assert rowmm.matmul_f32(x[None, :4], tiles, out_features).shape == (1, 4, out_features)


@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_matmul_i8_is_the_dequantized_product(out_features, in_features):
    torch.manual_seed(1)
    weight = torch.randn(out_features, in_features)
    q, scale = rowmm.quantize_weight(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-6).all()
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module = rowmm.Int8RowLinear(linear)
    x = torch.randn(2, 9, in_features)  # 18 rows: > MAX_ROWS, the dequantized F.linear
    with torch.inference_mode():
        many = module(x)
        expected = F.linear(x, q.float() * scale[:, None], linear.bias)
        torch.testing.assert_close(many, expected, rtol=1e-5, atol=1e-5)
        for rows in (1, 2, 5):  # the kernel
            torch.testing.assert_close(module(x[0, :rows]), expected[0, :rows], rtol=1e-5,
                                       atol=1e-5)
        assert torch.equal(module(x[0, 1:2]), module(x[0, :3])[1:2])  # row-invariant
    assert module.weight is linear.weight and module.bias is linear.bias
    with pytest.raises(ValueError, match="features"):
        module(torch.randn(1, in_features + 1))
    with pytest.raises(ValueError, match="fp32 nn.Linear"):
        rowmm.Int8RowLinear(linear.to(torch.bfloat16))


def test_row_linear_follows_the_weight_and_passes_others_through():
    torch.manual_seed(2)
    linear = torch.nn.Linear(40, 30, bias=False)
    x = torch.randn(3, 40)
    with torch.inference_mode():
        torch.testing.assert_close(rowmm.row_linear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)
        long = torch.randn(rowmm.MAX_ROWS + 1, 40)  # a prefill: linear(x) itself
        assert torch.equal(rowmm.row_linear(linear)(long), linear(long))
    with torch.no_grad():
        linear.weight.mul_(3)  # in place: a new version, the tiles are rebuilt
    with torch.inference_mode():
        torch.testing.assert_close(rowmm.row_linear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)
    other = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert rowmm.row_linear(other) is other
    assert "not float32" in rowmm.rowmm_supported(other)
    with pytest.raises(ValueError, match="fp32 CPU inputs"):
        rowmm.matmul_f32(torch.randn(2, 40, dtype=torch.float64), rowmm.tile_major(linear.weight),
                         30)


def test_verification_logits_equal_one_token_logits_bitwise():
    """With the kernel's row-invariant linears and row-exact attention, a q-slot verification
    computes exactly what q one-token forwards compute, in fp32."""
    model = make_tiny_llama(seed=5)
    lean = LeanLlamaForward(model, row_exact=True)
    assert lean.rowmm
    torch.manual_seed(3)
    prompt, new = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 4))
    with torch.inference_mode():
        together = make_cache(model, 16)
        lean(prompt, None, torch.arange(6)[None], together, 1)
        verified = lean(new, None, torch.arange(6, 10)[None], together, 0)
        alone = make_cache(model, 16)
        lean(prompt, None, torch.arange(6)[None], alone, 1)
        for j in range(4):
            one = lean(new[:, j:j + 1], None, torch.tensor([[6 + j]]), alone, 0)
            assert torch.equal(one[0, 0], verified[0, j]), j


def test_thread_count_does_not_change_a_result():
    """The tiles are split over threads; every output is computed as on one thread."""
    torch.manual_seed(4)
    weight, x = torch.randn(333, 96), torch.randn(5, 96)
    tiles = rowmm.tile_major(weight)
    q, scale = rowmm.quantize_weight(weight)
    tiles8, scale8 = rowmm.tile_major_i8(q), torch.ones(tiles.shape[0] * rowmm.TILE)
    scale8[:333] = scale
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((rowmm.matmul_f32(x, tiles, 333), rowmm.matmul_i8(x, tiles8, scale8, 333)))
    finally:
        torch.set_num_threads(before)
    for f32, i8 in results[1:]:
        assert torch.equal(f32, results[0][0]) and torch.equal(i8, results[0][1])
