"""Benchmark of the few-row CPU kernels (`specdec/decode/rowmm.c`) on a real model's weights.

One "sweep" multiplies 1..4 rows (the tokens of a decode or verification step) by every
projection of every layer and by the head, in model order, as a forward does: SmolLM2's 538 MB
of fp32 weights (135 MB as int8 tiles) do not fit in any cache, so a sweep streams them from
memory like a real step. Each sweep is timed with the AVX2 kernels and, where the CPU has
AVX-512, the AVX-512 ones, fp32 and int8 (the ``w8`` draft dtype) side by side in one run,
interleaved (this machine's speed drifts): median of ``--repeats`` sweeps. Reports ms per sweep,
the weight bytes streamed per second, the cost of m rows over 1 row (what verification adds,
v(k) without the rest of a forward) and AVX-512 over AVX2. Checks that the AVX-512 fp32 kernel
returns the AVX2 kernel's results bit for bit and the int8 ones agree to rounding.

    python bench/rowmm.py                    # 2 threads, rows 1-4
    python bench/rowmm.py --threads 1 --rows 1,3

Writes ``bench/results/rowmm.json`` and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdec.decode import rowmm  # noqa: E402
from specdec.models import load_model, write_json_atomic  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RowmmBenchConfig:
    model: str = "smollm2-135m-instruct"
    threads: int = 2
    rows: str = "1,2,3,4"
    warmup: int = 2
    repeats: int = 15
    seed: int = 0
    out: str = "bench/results/rowmm.json"


def weights(model) -> list[torch.Tensor]:
    """Every projection of every layer, then the head: [out, in] fp32, in forward order."""
    out = []
    for layer in model.model.layers:
        for name in PROJECTIONS:
            parent = layer.self_attn if name in PROJECTIONS[:4] else layer.mlp
            out.append(getattr(parent, name).weight.detach())
    out.append(model.get_output_embeddings().weight.detach())
    return out


Mat = tuple[torch.Tensor, "torch.Tensor | None", int, int]  # tiles, int8 scales, out, in


def fp32_mats(ws: list[torch.Tensor]) -> list[Mat]:
    return [(rowmm.tile_major(w), None, *w.shape) for w in ws]


def int8_mats(ws: list[torch.Tensor]) -> list[Mat]:
    """Tiles laid out for the int8 kernel in use, with their padded per-channel scales."""
    mats = []
    for w in ws:
        q, scale = rowmm.quantize_weight(w)
        tiles = rowmm.tile_major_i8(q)
        padded = torch.ones(tiles.shape[0] * rowmm.TILE)
        padded[: w.shape[0]] = scale
        mats.append((tiles, padded, *w.shape))
    return mats


def sweep(mats: list[Mat], xs: dict[int, torch.Tensor], m: int) -> list[torch.Tensor]:
    """One pass over every weight with m rows; returns the outputs (for the match check)."""
    outs = []
    for tiles, scale, out_features, in_features in mats:
        x = xs[in_features][:m]
        outs.append(rowmm.matmul_f32(x, tiles, out_features) if scale is None
                    else rowmm.matmul_i8(x, tiles, scale, out_features))
    return outs


def run(cfg: RowmmBenchConfig, console: Console, model=None) -> dict[str, Any]:
    """The sweeps over `model`'s weights (default: load ``cfg.model``)."""
    if rowmm.rowmm_supported() is not None:
        raise ValueError(f"the rowmm kernels cannot run here: {rowmm.rowmm_supported()}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rows = [int(r) for r in cfg.rows.split(",") if r.strip()]
    if not rows or min(rows) < 1 or max(rows) > rowmm.MAX_ROWS:
        raise ValueError(f"--rows must be in 1..{rowmm.MAX_ROWS}, got {cfg.rows!r}")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {cfg.repeats} / "
                         f"{cfg.warmup}")
    ws = weights(model if model is not None else load_model(cfg.model, dtype=torch.float32)[0])
    kernels = ["avx2"] + (["avx512"] if rowmm.select_kernels("avx512") == "avx512" else [])
    mats = {}
    for isa in kernels:  # int8 tiles are laid out per kernel; fp32 ones are the same for both
        rowmm.select_kernels(isa)
        mats["int8", isa] = int8_mats(ws)
        mats["fp32", isa] = mats.get(("fp32", "avx2")) or fp32_mats(ws)
    xs = {n: torch.randn(max(rows), n) for n in {w.shape[1] for w in ws}}
    nbytes = {"fp32": sum(w.numel() * 4 for w in ws),
              "int8": sum(t.numel() + s.numel() * 4 for t, s, _, _ in mats["int8", "avx2"])}
    console.print(f"rowmm: {len(ws)} weights of {cfg.model}, {nbytes['fp32'] / 1e6:.0f} MB fp32 / "
                  f"{nbytes['int8'] / 1e6:.0f} MB int8, {cfg.threads} threads, kernels {kernels}")

    times: dict[tuple[str, str, int], list[float]] = {}
    results: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    for rep in range(cfg.warmup + cfg.repeats):
        for m in rows:
            for dtype in ("fp32", "int8"):
                for isa in kernels:  # interleaved, so that drift hits every kernel alike
                    rowmm.select_kernels(isa)
                    t0 = time.perf_counter()
                    outs = sweep(mats[dtype, isa], xs, m)
                    dt = time.perf_counter() - t0
                    if rep >= cfg.warmup:
                        times.setdefault((dtype, isa, m), []).append(dt)
                    if rep == 0:
                        results[(dtype, isa, m)] = outs
    rowmm.select_kernels()

    out_rows = []
    for dtype in ("fp32", "int8"):
        for m in rows:
            for isa in kernels:
                s = statistics.median(times[(dtype, isa, m)])
                one = statistics.median(times[(dtype, isa, rows[0])])
                row: dict[str, Any] = {"dtype": dtype, "kernels": isa, "rows": m, "ms": s * 1e3,
                                       "gbps": nbytes[dtype] / s / 1e9, "vs_first_rows": s / one}
                if isa != "avx2":
                    base = statistics.median(times[(dtype, "avx2", m)])
                    row["speedup_vs_avx2"] = base / s
                    a, b = results[(dtype, "avx2", m)], results[(dtype, isa, m)]
                    row["match"] = (all(torch.equal(x, y) for x, y in zip(a, b)) if dtype == "fp32"
                                    else all(torch.allclose(x, y, rtol=1e-4, atol=1e-4)
                                             for x, y in zip(a, b)))
                out_rows.append(row)
    return {"config": asdict(cfg), "kernels": kernels, "bytes": nbytes,
            "cpu": torch.backends.cpu.get_cpu_capability(), "rows": out_rows}


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"rowmm sweeps ({result['config']['threads']} threads, torch reports "
                        f"{result['cpu']})")
    first = result["config"]["rows"].split(",")[0].strip()
    for col in ("dtype", "kernels", "rows", "ms / sweep", "GB/s", f"vs {first} row(s)", "vs AVX2",
                "match"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["dtype"], r["kernels"], str(r["rows"]), f"{r['ms']:.2f}",
                      f"{r['gbps']:.1f}", f"{r['vs_first_rows']:.2f}",
                      f"{r['speedup_vs_avx2']:.2f}x" if "speedup_vs_avx2" in r else "",
                      ("yes" if r["match"] else "NO") if "match" in r else "")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(RowmmBenchConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = RowmmBenchConfig(**vars(parser.parse_args(argv)))
    console = Console(stderr=True)
    try:
        result = run(cfg, console)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else ROOT / cfg.out
    write_json_atomic(out, result)
    print_table(result, console)
    summary: dict[str, Any] = {"bench": "rowmm", "threads": cfg.threads,
                               "kernels": result["kernels"], "out": str(out)}
    for r in result["rows"]:
        key = f"{r['dtype']}_{r['kernels']}_rows{r['rows']}"
        summary[f"{key}_ms"] = round(r["ms"], 3)
        if "speedup_vs_avx2" in r:
            summary[f"{key}_vs_avx2"] = round(r["speedup_vs_avx2"], 3)
    matches = [r["match"] for r in result["rows"] if "match" in r]
    summary["all_match"] = all(matches) if matches else None
    print(json.dumps(summary))
    return 1 if summary["all_match"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
