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


@pytest.fixture(params=["avx2", "avx512"])
def kernels(request):
    """Each set of kernels in turn (the AVX-512 one where the CPU has it), then the default."""
    try:
        if rowmm.select_kernels(request.param) != request.param:
            pytest.skip("this CPU has no AVX-512 F + BW")
        yield request.param
    finally:
        rowmm.select_kernels()


@pytest.mark.parametrize("out_features, in_features", SHAPES + [(40, 6), (33, 7)])
def test_each_int8_kernel_is_the_dequantized_product_and_row_invariant(
        kernels, out_features, in_features):
    torch.manual_seed(5)
    q, scale = rowmm.quantize_weight(torch.randn(out_features, in_features))
    tiles = rowmm.tile_major_i8(q)
    group = 4 if kernels == "avx512" else 2
    assert rowmm.i8_group() == group
    assert tiles.shape == (-(-out_features // 16), -(-in_features // group), 16 * group)
    padded_scale = torch.ones(tiles.shape[0] * 16)
    padded_scale[:out_features] = scale
    x = torch.randn(9, in_features)
    full = rowmm.matmul_i8(x, tiles, padded_scale, out_features)
    torch.testing.assert_close(full, F.linear(x, q.float() * scale[:, None]), rtol=1e-5,
                               atol=1e-5)
    for rows in (1, 2, 3, 4, 5):  # one pass over a tile takes up to 3 (AVX2) or 4 rows
        for start in (0, 9 - rows):
            part = rowmm.matmul_i8(x[start:start + rows], tiles, padded_scale, out_features)
            assert torch.equal(part, full[start:start + rows]), (rows, start)


def test_int8_tiles_laid_out_for_the_other_kernel_fail_clearly():
    q, _ = rowmm.quantize_weight(torch.randn(32, 8))
    other = 2 if rowmm.i8_group() == 4 else 4
    tiles = rowmm.tile_major_i8(q, group=other)
    with pytest.raises(ValueError, match="tile_major_i8"):
        rowmm.matmul_i8(torch.randn(1, 8), tiles, torch.ones(32), 32)
    with pytest.raises(ValueError, match="2 or 4"):
        rowmm.tile_major_i8(q, group=3)
    with pytest.raises(ValueError, match="'avx2' or 'avx512'"):
        rowmm.select_kernels("neon")


def test_int8_tile_layouts_hold_each_weight_where_the_kernels_read_it():
    q = torch.arange(-64, 64, dtype=torch.int8).view(16, 8)  # every weight distinct
    quads, pairs = rowmm.tile_major_i8(q, group=4), rowmm.tile_major_i8(q, group=2)
    for d in range(16):
        for i in range(8):
            assert quads[0, i // 4, 4 * d + i % 4] == q[d, i]
            assert pairs[0, i // 2, 4 * (d % 8) + (d // 8) + 2 * (i % 2)] == q[d, i]


@pytest.mark.parametrize("out_features", [16, 64, 200, 333])  # whole groups of 4 tiles or not
def test_the_avx512_fp32_kernel_equals_the_avx2_one_bitwise(out_features):
    torch.manual_seed(6)
    tiles, x = rowmm.tile_major(torch.randn(out_features, 72)), torch.randn(7, 72)
    try:
        if rowmm.select_kernels("avx512") != "avx512":
            pytest.skip("this CPU has no AVX-512 F + BW")
        wide = rowmm.matmul_f32(x, tiles, out_features)
        rowmm.select_kernels("avx2")
        assert torch.equal(wide, rowmm.matmul_f32(x, tiles, out_features))
    finally:
        rowmm.select_kernels()


def test_the_rowmm_benchmark_sweeps_every_weight_and_checks_the_kernels_agree():
    """bench/rowmm.py on a tiny model: mechanics only (no timing asserted)."""
    import importlib.util
    import sys
    from pathlib import Path

    from rich.console import Console

    path = Path(__file__).resolve().parents[1] / "bench" / "rowmm.py"
    spec = importlib.util.spec_from_file_location("bench_rowmm", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_rowmm"] = bench  # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(bench)
        model = make_tiny_llama(seed=7, num_layers=2)
        assert len(bench.weights(model)) == 2 * 7 + 1
        cfg = bench.RowmmBenchConfig(threads=1, rows="1,3", warmup=0, repeats=1)
        result = bench.run(cfg, Console(quiet=True), model=model)
    finally:
        sys.modules.pop("bench_rowmm", None)
        rowmm.select_kernels()
        torch.set_num_threads(threads)
    kernels = result["kernels"]
    assert kernels[0] == "avx2" and len(result["rows"]) == 2 * 2 * len(kernels)
    assert all(r["match"] for r in result["rows"] if "match" in r)
    assert {(r["dtype"], r["rows"]) for r in result["rows"]} == {
        (d, m) for d in ("fp32", "int8") for m in (1, 3)}
