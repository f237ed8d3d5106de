"""The main job: prune -> distill -> finetune (SFT and self-distilled) -> bench, in one run folder.

    python -m specdec.pipeline --preset quick            # what `make demo` runs, < 30 min on 2 cores
    python -m specdec.pipeline --preset paper --run runs/paper
    python -m specdec.pipeline --preset paper --run runs/paper --cuts keep12   # one cut only
    python -m specdec.pipeline --preset paper-8b --dry-run   # the GPU plan: stages, memory, time
    python -m specdec.pipeline --preset speed --run runs/speed   # the speed draft, ~90 min

Layout of a run (`runs/<name>/`):
    distilled.jsonl      the target's rewrites of the training answers (self-data distillation)
    original.jsonl       the same prompts with their original answers (the SFT baseline's data)
    <cut>/pruned         the pruned draft (e.g. cut = drop6, keep12)
    <cut>/sft            healed on original.jsonl
    <cut>/sd             healed on distilled.jsonl, same recipe
    <cut>/sd-kd          the same plus a logit-distillation term (paper preset)
    <cut>/bench/         bench/acceptance.py's report, JSON and plots
    <cut>/frontier/      bench/frontier.py: cost/acceptance frontier, measured speedups, the
                         settings written into each draft's specdec.json
    distilled.logits/    the target's top-k logits on distilled.jsonl (presets with kd_cache)
    report.md            every cut's comparison table and the fastest draft

Every stage is skipped when its output is already there and valid (a checkpoint with its
`specdec.json`, a complete data file, a bench JSON), and distill and finetune resume from their
own partial outputs, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from specdec.models import DEFAULT_TARGET, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cut:
    name: str
    drop: int | None = None
    keep: int | None = None
    # FinetuneConfig fields this cut changes in the preset's recipe (for all its drafts alike)
    finetune: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    cuts: tuple[Cut, ...]
    distill_n: int
    distill_max_new_tokens: int
    distill_batch_size: int
    distill_max_answer_tokens: int  # records whose original answer is longer are not used
    finetune: dict[str, Any]  # FinetuneConfig fields shared by every draft (one recipe)
    kd: float  # 0: no KD draft
    prune_calib_n: int
    prune_heldout_n: int  # held-out prompts whose target continuations score the candidates
    eval_n: int | None
    eval_turns: int
    eval_max_new_tokens: int
    latency_n: int
    latency_tokens: int
    repeats: int = 3  # latency repeats (medians)
    k: int = 4
    # distillation backend: "auto" is vLLM when this interpreter or .venv-vllm has it (it runs
    # there), else transformers; vLLM generates in `vllm_dtype` (bf16: 176 tok/s on one core
    # of an AVX-512 BF16 CPU, against 31 for batched transformers in fp32 on both cores; on a
    # CPU without native bf16, `for_this_machine` makes this and bf16 autocast fp32)
    distill_engine: str = "auto"
    vllm_dtype: str = "bfloat16"
    vllm_batch_size: int = 128  # prompts per LLM.generate call (and per append to the output)
    vllm_kv_cache_gib: float | None = 3.0
    bench_vllm: str = "auto"  # bench/acceptance.py --vllm: auto | on | off
    # KD from a logit cache of distilled.jsonl (specdec.logit_cache, made once) instead of
    # running the target at every step; its top-k
    kd_cache: bool = False
    kd_top_k: int = 32
    # bench/frontier.py after the bench: draft vocabularies N (0 = full), ks, end-to-end runs
    frontier: bool = True
    frontier_vocab_n: str = "0,8192,16384"
    frontier_ks: str = "1,2,3,4"
    frontier_n: int = 16  # MT-Bench first turns scored teacher-forced
    frontier_e2e_best: int = 2
    frontier_e2e_prompts: int = 4
    frontier_new_tokens: int = 64
    # draft dtypes the frontier measures ("" = the target's): w8 drafts (int8 weights on the
    # rowmm kernel, specdec.quant) cost ~35-40% less than fp32 ones on an AVX2 CPU at the same
    # acceptance; int8 (fbgemm, activations too) is the choice where rowmm cannot run
    frontier_draft_dtypes: str = "fp32,w8"
    # torch threads for the frontier: 1, as the README's frontier runs (the fused step and
    # rowmm split their tiles over more threads too; `bench/latency.py --concurrent` compares
    # drafting on one core each with our target alone on both)
    frontier_threads: int = 1


PRESETS: dict[str, Preset] = {
    # Sized for a 2-core CPU: about 25 minutes end to end.
    "quick": Preset(
        cuts=(Cut("drop6", drop=6),),
        distill_n=48, distill_max_new_tokens=160, distill_batch_size=16,
        distill_max_answer_tokens=128,
        finetune=dict(method="full", epochs=1, batch_size=8, micro_batch_size=4,
                      max_seq_len=320, lr=5e-5),
        kd=0.0, prune_calib_n=32, prune_heldout_n=8, eval_n=16, eval_turns=1,
        eval_max_new_tokens=64, latency_n=2, latency_tokens=32, repeats=2,
        bench_vllm="off",  # vLLM starts once per draft (minutes): `make vllm-check` shows it
        frontier_vocab_n="0,8192", frontier_ks="1,2,4",
    ),
    # The speed draft: the deep cut that bench/frontier.py favours on this CPU, healed as well as
    # about 90 minutes on 2 cores allow (vLLM distillation of 768 records, one epoch over all of
    # them for SFT / self-distilled / self-distilled + cached-logit KD, the layers below the cut
    # frozen), ending with the frontier: measured speedups and the settings each draft records
    # for serve, the benches and vLLM. (All records, not the first n: distill writes its output
    # in its batches' order, longest prompts first.)
    "speed": Preset(
        cuts=(Cut("keep12", keep=12),),
        distill_n=768, distill_max_new_tokens=256, distill_batch_size=32,
        distill_max_answer_tokens=192,
        finetune=dict(method="full", epochs=1, batch_size=16, micro_batch_size=8,
                      max_seq_len=384, max_answer_tokens=192, lr=3e-4, bf16=True,
                      freeze_below_cut=True, eval_every=8, eval_n=40, eval_max_new_tokens=64),
        kd=1.0, kd_cache=True, prune_calib_n=64, prune_heldout_n=16, eval_n=40, eval_turns=1,
        eval_max_new_tokens=64, latency_n=0, latency_tokens=64, repeats=1, bench_vllm="off",
        frontier_vocab_n="0,4096,8192,16384", frontier_n=40, frontier_e2e_best=3,
        frontier_e2e_prompts=16, frontier_new_tokens=128,
    ),
    # The paper's comparison at this model's scale: two draft sizes, 1,024 distilled records,
    # a KD variant, all 80 MT-Bench questions with both turns. Healing is sized for a 2-core
    # CPU (bf16 autocast, ~100-200 training tokens/s): one epoch over the first 384 of the
    # 1,024 records, 24 steps of 16, the same prompts for every draft (a GPU would take all of
    # them, for several epochs); the deep cut takes a higher lr.
    "paper": Preset(
        cuts=(Cut("drop6", drop=6), Cut("keep12", keep=12, finetune=dict(lr=3e-4))),
        distill_n=1024, distill_max_new_tokens=256, distill_batch_size=32,
        distill_max_answer_tokens=192,
        finetune=dict(method="full", n=384, epochs=1, batch_size=16, micro_batch_size=8,
                      max_seq_len=384, lr=1e-4, bf16=True),
        kd=0.5, prune_calib_n=128, prune_heldout_n=32, eval_n=None, eval_turns=2,
        eval_max_new_tokens=96,
        latency_n=3, latency_tokens=48, repeats=2,
    ),
    # The paper's setting on a GPU box with hub access (target llama-3.1-8b-instruct, see
    # specdec.plan.PRESET_TARGETS): drop 6 of 32 and a deep cut, vLLM distillation in bf16,
    # bf16 full healing (torchrun data parallel when run stage by stage), MT-Bench 80 x 2 and
    # the vLLM drop-in bench. `--dry-run` prints the stages, commands, memory and time.
    "paper-8b": Preset(
        cuts=(Cut("drop6", drop=6), Cut("keep16", keep=16, finetune=dict(lr=5e-5))),
        distill_n=8192, distill_max_new_tokens=512, distill_batch_size=64,
        distill_max_answer_tokens=512,
        finetune=dict(method="full", epochs=2, batch_size=64, micro_batch_size=8,
                      max_seq_len=1024, lr=2e-5, bf16=True),
        kd=0.5, prune_calib_n=256, prune_heldout_n=64, eval_n=None, eval_turns=2,
        eval_max_new_tokens=256, latency_n=8, latency_tokens=128, repeats=3,
        distill_engine="vllm", vllm_batch_size=256, vllm_kv_cache_gib=None, bench_vllm="on",
        frontier_vocab_n="0,16384,32768,65536", frontier_n=80, frontier_draft_dtypes="",
    ),
    # Wiring only, for a tiny model in tests: every stage runs, on a handful of records.
    "smoke": Preset(
        cuts=(Cut("drop1", drop=1),),
        distill_n=4, distill_max_new_tokens=8, distill_batch_size=4,
        distill_max_answer_tokens=512,
        finetune=dict(method="full", max_steps=2, batch_size=2, micro_batch_size=2,
                      max_seq_len=64),
        kd=0.5, prune_calib_n=4, prune_heldout_n=2, eval_n=2, eval_turns=1,
        eval_max_new_tokens=8, latency_n=1, latency_tokens=4, repeats=1, k=2,
        distill_engine="transformers", bench_vllm="off", kd_cache=True, kd_top_k=8,
        frontier_vocab_n="0", frontier_ks="1,2", frontier_n=2, frontier_e2e_best=1,
        frontier_e2e_prompts=1, frontier_new_tokens=4,
    ),
}


@dataclass
class PipelineConfig:
    preset: str = "quick"
    run: str = ""  # default runs/<preset>
    target: str = DEFAULT_TARGET
    skip_bench: bool = False
    cuts: tuple[str, ...] = ()  # run only these of the preset's cuts (default: all)
    distill_engine: str = ""  # override the preset's: auto | transformers | vllm
    bench_vllm: str = ""  # override the preset's: auto | on | off


@dataclass
class StageLog:
    rows: list[tuple[str, str, float]] = field(default_factory=list)  # stage, status, seconds

    def add(self, stage: str, status: str, seconds: float) -> None:
        self.rows.append((stage, status, seconds))


def _stage(log: StageLog, console: Console, name: str, done: bool, fn) -> None:
    if done:
        console.print(f"[dim]{name}: done already, skipped[/dim]")
        log.add(name, "skipped (valid output exists)", 0.0)
        return
    console.rule(name)
    start = time.perf_counter()
    fn()
    log.add(name, "ran", time.perf_counter() - start)


def _checkpoint_done(path: Path, stage: str) -> bool:
    return (path / "config.json").is_file() and read_manifest(path).get("stage") == stage


def jsonl_ids(path: Path) -> list[str]:
    """The `id` of every record of a JSONL file (read line by line as a file, not with
    str.splitlines, which also splits on the U+2028 that rewrites may hold raw)."""
    from specdec.data import iter_jsonl

    return [obj["id"] for obj, _ in iter_jsonl(path)]


def write_original(distilled: Path, out: Path, source: str = "sharegpt") -> int:
    """The distilled prompts with their original answers: the SFT baseline's data, same records."""
    from specdec.data import iter_records
    from specdec.turns import FirstTurn, first_turn

    wanted = jsonl_ids(distilled)
    wanted_ids = set(wanted)
    found: dict[str, FirstTurn] = {}
    for record in iter_records(source, split="train"):
        if record.id in wanted_ids:
            turn = first_turn(record)
            if isinstance(turn, FirstTurn):
                found[turn.id] = turn
        if len(found) == len(wanted_ids):
            break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} distilled ids not found in {source} (e.g. "
                           f"{missing[:3]}); was distilled.jsonl made from another source?")
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rid in wanted:
            t = found[rid]
            f.write(json.dumps({"id": t.id, "source": t.source, "origin": "original",
                                "messages": t.prompt + [{"role": "assistant",
                                                         "content": t.reference}]},
                               ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(wanted)


def for_this_machine(preset: Preset, console: Console | None = None,
                     bf16_fast: bool | None = None) -> Preset:
    """The preset with bf16 only where it is fast (specdec.precision): on a CPU without native
    bf16 its vLLM dtype and bf16 autocast become fp32, and one line says so."""
    if bf16_fast is None:
        import torch

        from specdec.precision import bf16_is_fast

        bf16_fast = torch.cuda.is_available() or bf16_is_fast("cpu")
    changes: dict[str, Any] = {}
    if not bf16_fast and preset.vllm_dtype == "bfloat16":
        changes["vllm_dtype"] = "float32"
    if not bf16_fast and preset.finetune.get("bf16"):
        changes["finetune"] = {**preset.finetune, "bf16": False}
    if changes and console is not None:
        console.print("this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag), where bf16 "
                      "runs 3-4x slower than fp32: distilling and healing in fp32")
    return replace(preset, **changes) if changes else preset


def run(cfg: PipelineConfig, console: Console | None = None) -> dict[str, Any]:
    from specdec import distill, finetune, prune

    console = console or Console()
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = for_this_machine(PRESETS[cfg.preset], console)
    names = [c.name for c in preset.cuts]
    unknown = sorted(set(cfg.cuts) - set(names))
    if unknown:
        raise ValueError(f"--cuts {' '.join(unknown)}: preset {cfg.preset!r} has cuts "
                         f"{', '.join(names)}")
    engines = ("", "auto", *distill.ENGINES)
    if cfg.distill_engine not in engines:
        raise ValueError(f"--distill-engine {cfg.distill_engine!r}: choose one of "
                         f"{', '.join(engines[1:])}")
    if cfg.bench_vllm not in ("", "auto", "on", "off"):
        raise ValueError(f"--bench-vllm {cfg.bench_vllm!r}: choose one of auto, on, off")
    cuts = [c for c in preset.cuts if not cfg.cuts or c.name in cfg.cuts]
    run_dir = Path(cfg.run or f"runs/{cfg.preset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.json").write_text(json.dumps(
        {"config": asdict(cfg), "preset": asdict(preset)}, indent=2, default=str))
    log = StageLog()
    distilled, original = run_dir / "distilled.jsonl", run_dir / "original.jsonl"

    for cut in cuts:
        pruned = run_dir / cut.name / "pruned"
        _stage(log, console, f"prune {cut.name}", _checkpoint_done(pruned, "prune"),
               lambda: prune.run(prune.PruneConfig(
                   target=cfg.target, out=str(pruned), drop=cut.drop, keep=cut.keep,
                   select="acceptance", calib_n=preset.prune_calib_n,
                   heldout_n=preset.prune_heldout_n), console))

    distill_done = (distilled.is_file() and
                    Path(f"{distilled}.summary.json").is_file())
    engine = cfg.distill_engine or preset.distill_engine
    if engine == "auto":
        engine = "vllm" if distill.vllm_available() else "transformers"
    engine_args = dict(batch_size=preset.distill_batch_size) if engine == "transformers" else \
        dict(batch_size=preset.vllm_batch_size, dtype=preset.vllm_dtype,
             vllm_kv_cache_gib=preset.vllm_kv_cache_gib)
    distill_cfg = distill.DistillConfig(
        out=str(distilled), target=cfg.target, n=preset.distill_n,
        max_new_tokens=preset.distill_max_new_tokens,
        max_answer_tokens=preset.distill_max_answer_tokens, engine=engine, **engine_args)
    _stage(log, console, "distill", distill_done, lambda: _distill(distill_cfg, console))
    _stage(log, console, "original answers (SFT data)", original.is_file(),
           lambda: write_original(distilled, original))

    logits = run_dir / "distilled.logits"
    if preset.kd and preset.kd_cache:
        from specdec import logit_cache

        recipe = {**preset.finetune}
        cache_cfg = logit_cache.LogitCacheConfig(
            data=str(distilled), out=str(logits), target=cfg.target, n=recipe.get("n"),
            max_answer_tokens=recipe.get("max_answer_tokens"),
            max_seq_len=recipe.get("max_seq_len", logit_cache.DEFAULT_MAX_SEQ_LEN),
            top_k=preset.kd_top_k, bf16=bool(recipe.get("bf16")))
        _stage(log, console, "logit cache (KD)", (logits / logit_cache.MANIFEST).is_file(),
               lambda: logit_cache.run(cache_cfg, console))

    for cut in cuts:
        pruned = run_dir / cut.name / "pruned"
        drafts = {"pruned": pruned}
        variants = [("sft", original, 0.0), ("sd", distilled, 0.0)]
        if preset.kd:
            variants.append(("sd-kd", distilled, preset.kd))
        for label, data, kd in variants:
            out = run_dir / cut.name / label
            drafts[label] = out
            extra = dict(kd=kd, target=cfg.target) if kd else {}
            if kd and preset.kd_cache:
                extra["kd_cache"] = str(logits)
            _stage(log, console, f"finetune {cut.name}/{label}", _checkpoint_done(out, "finetune"),
                   lambda out=out, data=data, extra=extra: finetune.run(finetune.FinetuneConfig(
                       draft=str(pruned), out=str(out), data=str(data),
                       **{**preset.finetune, **cut.finetune}, **extra), console))
        bench_dir = run_dir / cut.name / "bench"
        if cfg.skip_bench:
            continue
        cmd = [sys.executable, str(ROOT / "bench" / "acceptance.py"), "--target", cfg.target,
               "--turns", str(preset.eval_turns), "--max-new-tokens",
               str(preset.eval_max_new_tokens), "--k", str(preset.k),
               "--latency-n", str(preset.latency_n), "--latency-tokens",
               str(preset.latency_tokens), "--repeats", str(preset.repeats),
               "--vllm", cfg.bench_vllm or preset.bench_vllm, "--out", str(bench_dir)]
        if preset.eval_n:
            cmd += ["--n", str(preset.eval_n)]
        for label, path in drafts.items():
            cmd += ["--draft", f"{label}={path}"]
        _stage(log, console, f"bench {cut.name}", (bench_dir / "acceptance.json").is_file(),
               lambda cmd=cmd: _run_bench(cmd))
        if preset.frontier:
            frontier_dir = run_dir / cut.name / "frontier"
            _stage(log, console, f"frontier {cut.name}",
                   (frontier_dir / "frontier.json").is_file(),
                   lambda cmd=frontier_cmd(cfg, preset, drafts, distilled, frontier_dir):
                   _run_bench(cmd))

    # every cut of the preset with results, also those another pipeline (--cuts) benched
    summary = report(run_dir, [(c, run_dir / c.name / "bench") for c in preset.cuts], console)
    table = Table(title=f"pipeline {cfg.preset}: stages")
    for col in ("stage", "status", "seconds"):
        table.add_column(col)
    for stage, status, seconds in log.rows:
        table.add_row(stage, status, f"{seconds:.0f}")
    console.print(table)
    for cut_name, verdict in summary.get("fastest", {}).items():  # what the run ends with
        console.print(f"[bold]{cut_name}[/bold]: {verdict}", soft_wrap=True)
    return summary


def _distill(cfg, console: Console) -> None:
    from specdec import distill

    python = distill.vllm_elsewhere(cfg)
    if python is None:
        distill.run(cfg, console=console)
    else:
        distill.run_in(python, cfg, console)


def frontier_cmd(cfg: PipelineConfig, preset: Preset, drafts: dict[str, Path], distilled: Path,
                 out: Path) -> list[str]:
    """bench/frontier.py over a cut's drafts, writing each one's recommended settings."""
    cmd = [sys.executable, str(ROOT / "bench" / "frontier.py"), "--target", cfg.target,
           "--vocab-data", str(distilled), "--vocab-n", preset.frontier_vocab_n,
           "--ks", preset.frontier_ks, "--n", str(preset.frontier_n),
           "--max-new-tokens", str(preset.eval_max_new_tokens),
           "--e2e-best", str(preset.frontier_e2e_best),
           "--e2e-prompts", str(preset.frontier_e2e_prompts),
           "--new-tokens", str(preset.frontier_new_tokens), "--write-recommended",
           "--out", str(out)]
    if preset.frontier_draft_dtypes:
        cmd += ["--draft-dtypes", preset.frontier_draft_dtypes]
    if preset.frontier_threads:
        cmd += ["--threads", str(preset.frontier_threads)]
    for label, path in drafts.items():
        cmd += ["--draft", f"{label}={path}"]
    return cmd


def _run_bench(cmd: list[str]) -> None:
    script = Path(cmd[1])
    if not script.is_file():
        raise RuntimeError(f"{script} is missing: the bench stage needs a checkout of the "
                           f"repository (bench/ is not installed with the package)")
    subprocess.run(cmd, check=True)


def report(run_dir: Path, benches: list[tuple[Cut, Path]], console: Console) -> dict[str, Any]:
    lines = [f"# specdec run {run_dir.name}", ""]
    summary: dict[str, Any] = {}
    for cut, bench_dir in benches:
        file = bench_dir / "acceptance.json"
        if not file.is_file():
            lines.append(f"{cut.name}: no bench results (run without --skip-bench)")
            continue
        result = json.loads(file.read_text())
        table = Table(title=f"{cut.name}: drafts vs the target ({result['answers']} answers)")
        for col in ("draft", "layers", "top-1", "alpha", "MAL k=1", "MAL k=4", "MAL k=8",
                    "FLOPs/token vs target"):
            table.add_column(col)
        fl = {f["draft"]: f for f in result["flops"]}
        for q in result["quality"]:
            f = fl[q["draft"]]
            table.add_row(q["draft"], str(q["layers"]), f"{q['top1_agreement']:.3f}",
                          f"{q['alpha']:.3f}", f"{q['mal']['1']:.2f}", f"{q['mal']['4']:.2f}",
                          f"{q['mal']['8']:.2f}",
                          f"{f['flops_per_committed_token'] / f['target_flops_per_token']:.2f}x")
        console.print(table)
        summary[cut.name] = {q["draft"]: q["mal"]["4"] for q in result["quality"]}
        lines += [f"## {cut.name}", "", f"Full report: [{cut.name}/bench/report.md]"
                  f"({cut.name}/bench/report.md)", ""]
        lines += (bench_dir / "report.md").read_text().splitlines()[2:] + [""]
    for cut, bench_dir in benches:  # the frontier's verdict, last: what the run ends with
        file = bench_dir.parent / "frontier" / "frontier.json"
        if file.is_file():
            verdict = json.loads(file.read_text()).get("verdict") or ""
            summary.setdefault("fastest", {})[cut.name] = verdict
            lines += [f"## {cut.name}: the fastest draft", "", verdict, "",
                      f"Frontier: [{cut.name}/frontier/frontier.md]({cut.name}/frontier/frontier.md)", ""]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    console.print(f"report: {run_dir / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.pipeline",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", choices=list(PRESETS))
    parser.add_argument("--run", default="", help="run folder (default runs/<preset>)")
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the stages, their commands, memory and time on one "
                             "H100/H200; download and run nothing")
    parser.add_argument("--cuts", nargs="+", default=(), metavar="CUT",
                        help="run only these of the preset's cuts (e.g. drop6); once the "
                             "shared stages (distill, original answers) are done, pipelines with "
                             "different cuts may run side by side in one run folder")
    parser.add_argument("--distill-engine", default="", choices=("auto", "transformers", "vllm"),
                        help="override the preset's distillation backend (presets: auto, "
                             "vLLM when installed, e.g. by `make vllm-check`)")
    parser.add_argument("--bench-vllm", default="", choices=("auto", "on", "off"),
                        help="override the preset's: vLLM rows in the bench (auto: when "
                             ".venv-vllm exists; each draft starts vLLM once, a few minutes)")
    args = parser.parse_args(argv)
    from specdec.plan import PRESET_TARGETS, print_plan

    dry_run = vars(args).pop("dry_run")
    if args.target == DEFAULT_TARGET and args.preset in PRESET_TARGETS:
        args.target = PRESET_TARGETS[args.preset]
    if dry_run:
        print_plan(args.preset, PRESETS[args.preset], args.target,
                   args.run or f"runs/{args.preset}")
        return 0
    run(PipelineConfig(**{**vars(args), "cuts": tuple(args.cuts)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
