"""Benchmark of the fused verification kernels against their torch references.

Times ``verify_greedy``, ``verify_sample`` and ``acceptance_stats`` at Llama-3.1-8B shapes
(vocabulary 128256, bf16 logits, k = 1..8 drafts, batch 1..64), Triton launcher and torch
reference side by side in one run (these machines are noisy): warm-up calls, then repeats,
median time per call. Reports the achieved memory bandwidth (logit bytes read once / median
time; the sampling and statistics kernels read the logits twice, the second pass mostly from
L2, so this is an effective figure) and the speedup (torch median / Triton median). The
tokens of both paths are compared on every shape (``match``).

    python bench/kernels.py                      # CUDA: Triton vs torch, full grid
    python bench/kernels.py --device cpu         # no GPU: torch reference only, small shapes

Without CUDA only the torch reference is timed (on smaller shapes unless given): Triton timing
needs a GPU. Prints a table, writes ``bench/results/kernels.json`` (atomically) and ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

import specdec.kernels as K
from specdec.kernels.common import interpreting

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("greedy", "sample", "stats")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class KernelBenchConfig:
    device: str = "auto"  # auto | cuda | cpu
    vocab: int = 128256  # Llama 3 vocabulary
    batches: str = ""  # comma list; "" = 1,8,32,64 on CUDA, 1,4 on CPU
    ks: str = ""  # comma list; "" = 1,2,4,8 on CUDA, 1,4 on CPU
    dtype: str = "bf16"
    kernels: str = ",".join(KERNELS)
    temperature: float = 1.0
    warmup: int = 0  # 0 = 10 on CUDA, 2 on CPU
    repeats: int = 0  # 0 = 50 on CUDA, 5 on CPU
    seed: int = 0
    out: str = "bench/results/kernels.json"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve(cfg: KernelBenchConfig) -> KernelBenchConfig:
    """Fill the device-dependent defaults; raise ValueError on impossible requests."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {cfg.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    unknown = set(cfg.kernels.split(",")) - set(KERNELS)
    if unknown:
        raise ValueError(f"--kernels: unknown {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    gpu = device == "cuda"
    return KernelBenchConfig(
        device=device, vocab=cfg.vocab,
        batches=cfg.batches or ("1,8,32,64" if gpu else "1,4"),
        ks=cfg.ks or ("1,2,4,8" if gpu else "1,4"),
        dtype=cfg.dtype, kernels=cfg.kernels, temperature=cfg.temperature,
        warmup=cfg.warmup or (10 if gpu else 2), repeats=cfg.repeats or (50 if gpu else 5),
        seed=cfg.seed, out=cfg.out,
    )


def time_call(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    """Median seconds per call (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(batch: int, k: int, vocab: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    target = torch.randn(batch, k + 1, vocab, generator=g, device=device) * 2
    draft = target[:, :k] + torch.randn(batch, k, vocab, generator=g, device=device)
    draft_tokens = draft.argmax(dim=-1)  # [batch, k]
    seeds = torch.arange(batch, dtype=torch.int64, device=device) + seed
    offsets = torch.zeros(batch, dtype=torch.int64, device=device)
    return target.to(dtype), draft.to(dtype).contiguous(), draft_tokens, seeds, offsets


def bench_shape(kernel: str, batch: int, k: int, cfg: KernelBenchConfig, triton_ok: bool) -> dict:
    dtype = DTYPES[cfg.dtype]
    target, draft, tokens, seeds, offsets = make_inputs(batch, k, cfg.vocab, dtype, cfg.device, cfg.seed)
    elt = target.element_size()
    if kernel == "greedy":
        calls = {"torch": lambda: K.verify_greedy_torch(target, tokens),
                 "triton": lambda: K.verify_greedy_triton(target, tokens)}
        nbytes = target.numel() * elt
    elif kernel == "sample":
        args = (target, draft, tokens, cfg.temperature, seeds, offsets)
        calls = {"torch": lambda: K.verify_sample_torch(*args),
                 "triton": lambda: K.verify_sample_triton(*args)}
        nbytes = (target.numel() + draft.numel()) * elt
    else:  # stats over every draft position: n = batch * k rows
        # The kernel reads whole rows: target[:, :k] of a batch > 1 is strided, so copy it.
        t2 = target[:, :k].reshape(-1, cfg.vocab).contiguous()
        d2 = draft.reshape(-1, cfg.vocab)
        calls = {"torch": lambda: K.acceptance_stats_torch(t2, d2, cfg.temperature),
                 "triton": lambda: K.acceptance_stats_triton(t2, d2, cfg.temperature)}
        nbytes = (t2.numel() + d2.numel()) * elt
    row: dict[str, Any] = {"kernel": kernel, "batch": batch, "k": k, "vocab": cfg.vocab,
                           "dtype": cfg.dtype, "bytes": nbytes}
    row["torch_s"] = time_call(calls["torch"], cfg.device, cfg.warmup, cfg.repeats)
    row["torch_gbps"] = nbytes / row["torch_s"] / 1e9
    if triton_ok:
        row["triton_s"] = time_call(calls["triton"], cfg.device, cfg.warmup, cfg.repeats)
        row["triton_gbps"] = nbytes / row["triton_s"] / 1e9
        row["speedup"] = row["torch_s"] / row["triton_s"]
        a, b = calls["torch"](), calls["triton"]()
        if kernel == "stats":
            row["match"] = bool(torch.allclose(a[0], b[0], rtol=1e-3, atol=1e-4)
                                and torch.allclose(a[1], b[1], rtol=1e-3, atol=1e-4))
        else:
            row["match"] = bool(torch.equal(a.tokens, b.tokens))
    del target, draft
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return row


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def run(cfg: KernelBenchConfig) -> dict[str, Any]:
    cfg = resolve(cfg)
    # TRITON_INTERPRET=1 runs the Triton path on the CPU: its timings mean nothing, but every
    # row's match against the torch reference is checked (tests/test_kernels.py does this).
    triton_ok = cfg.device == "cuda" or interpreting()
    rows = []
    for kernel in cfg.kernels.split(","):
        for batch in _ints(cfg.batches):
            for k in _ints(cfg.ks):
                rows.append(bench_shape(kernel, batch, k, cfg, triton_ok))
    note = ("" if cfg.device == "cuda" else
            "Triton interpreter: matches checked, timings meaningless" if triton_ok else
            "no CUDA: torch reference only; Triton timing needs a GPU")
    return {"config": asdict(cfg), "machine": machine(), "triton_timed": triton_ok,
            "note": note, "rows": rows}


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def print_table(result: dict[str, Any], console: Console) -> None:
    timed = result["triton_timed"]
    table = Table(title=f"verification kernels ({result['machine']})")
    for col in ("kernel", "batch", "k", "MB read", "torch ms", "torch GB/s"):
        table.add_column(col, justify="right")
    if timed:
        for col in ("triton ms", "triton GB/s", "speedup", "match"):
            table.add_column(col, justify="right")
    for r in result["rows"]:
        cells = [r["kernel"], str(r["batch"]), str(r["k"]), f"{r['bytes'] / 1e6:.1f}",
                 f"{r['torch_s'] * 1e3:.3f}", f"{r['torch_gbps']:.1f}"]
        if timed:
            cells += [f"{r['triton_s'] * 1e3:.3f}", f"{r['triton_gbps']:.1f}",
                      f"{r['speedup']:.2f}x", "yes" if r["match"] else "NO"]
        table.add_row(*cells)
    console.print(table)
    if result["note"]:
        console.print(f"[bold yellow]{result['note']}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(KernelBenchConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = KernelBenchConfig(**vars(parser.parse_args(argv)))
    try:
        result = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else ROOT / cfg.out
    write_json_atomic(out, result)
    print_table(result, Console())
    summary: dict[str, Any] = {"bench": "kernels", "device": result["config"]["device"],
                               "triton_timed": result["triton_timed"], "shapes": len(result["rows"]),
                               "out": str(out)}
    if result["triton_timed"]:
        for kernel in result["config"]["kernels"].split(","):
            speedups = [r["speedup"] for r in result["rows"] if r["kernel"] == kernel]
            summary[f"{kernel}_median_speedup"] = round(statistics.median(speedups), 3)
        summary["all_match"] = all(r["match"] for r in result["rows"])
    if result["note"]:
        summary["note"] = result["note"]
    print(json.dumps(summary))
    return 1 if summary.get("all_match") is False else 0


if __name__ == "__main__":
    sys.exit(main())
