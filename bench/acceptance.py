"""The acceptance harness: which draft to deploy, measured.

For a target and one or more drafts (any checkpoint dirs: pruned-only, SFT, self-distilled, KD,
merged) on a prompt set (MT-Bench by default, both turns, the second asked after the target's
own first answer):

1. quality, teacher-forced over the target's greedy answers (exact for greedy, fast for any k):
   acceptance rate, MAL and per-position acceptance for k = 1..8, alpha = sum_x
   min(target_probs, draft_probs) at T = 1, per prompt category (`specdec.evaluate`);
2. FLOPs per committed token (draft + target, `specdec.flops`) and the draft's FLOPs reduction;
3. the engine, on a subset: the same greedy acceptance measured by real speculative decoding
   (must equal the teacher-forced numbers, except where the target's top-2 logits nearly tie),
   sampled (T = 1) acceptance, and latency: ms per token and speedup vs the target alone,
   medians over repeats, batch 1;
4. Hugging Face assisted generation with the same pair and k, side by side (speedup and
   acceptance), and vLLM (`draft_model` speculative config) when `.venv-vllm` exists.

Writes `<out>/acceptance.json`, `<out>/report.md` and PNG plots, prints tables, and ends with
one JSON line.

    python bench/acceptance.py --draft pruned=runs/demo/pruned --draft sd=runs/demo/sd \
        --n 80 --turns 2 --latency-n 8 --out runs/demo/bench

A draft whose specdec.json records a trimmed draft vocabulary (`specdec.vocab`) is scored and
run with it everywhere here (teacher-forced, engine, latency; ``--draft-vocab full`` turns that
off); ``--k 0`` (the default) takes each draft's recommended k (`specdec.recommend`), else 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from specdec import flops
from specdec.acceptance import greedy_accepted_length
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.sampling import SamplingParams
from specdec.evaluate import (REPORT_KS, Answer, DraftQuality, cached_target_answers,
                              parse_drafts, quality_table, score_drafts)
from specdec.models import DEFAULT_TARGET, load_model, resolve_model, write_json_atomic
from specdec.recommend import recommended_k

ROOT = Path(__file__).resolve().parents[1]
NEAR_TIE = 1e-3  # fp32 top-2 logit margin under which batched and one-by-one argmax may differ


@dataclass
class BenchConfig:
    target: str = DEFAULT_TARGET
    draft: list[str] = field(default_factory=list)  # label=path
    prompts: str = "mt-bench"
    n: int | None = None
    turns: int = 2
    max_new_tokens: int = 96
    batch_size: int = 8
    k: int = 0  # draft length for the engine / HF / vLLM runs; 0 = each draft's recommended, else 4
    draft_vocab: str = "auto"  # auto: each draft's trimmed vocabulary if it has one | full
    latency_n: int = 6  # prompts in the engine / latency subset (0 skips)
    latency_tokens: int = 64
    repeats: int = 3
    hf: bool = True  # Hugging Face assisted generation side by side
    vllm: str = "auto"  # auto | on | off
    out: str = "bench/results/acceptance"


# ---------------------------------------------------------------------------- engine check


def engine_check(target, draft, answers: list[Answer], k: int, draft_vocab=None) -> dict[str, Any]:
    """Greedy engine runs on the subset vs the teacher-forced prediction for the same text.

    The prediction: run the draft teacher-forced over the text the engine committed, mark where
    its argmax is the next token, and simulate block-wise acceptance (`greedy_accepted_length`).
    It must give the engine's step count exactly, except where a full-sequence forward and the
    engine's cached forwards round a near-tie (top-2 logit margin < 1e-3) differently.
    """
    engine = SpeculativeEngine(target, draft, k=k, draft_vocab=draft_vocab)
    steps_engine = steps_predicted = differ = near_ties = 0
    accepted = drafted = 0
    for a in answers:
        prompt, answer = a.ids[:a.prompt_len], a.ids[a.prompt_len:]
        params = SamplingParams(temperature=0.0, max_tokens=len(answer), ignore_eos=True)
        res = engine.generate([prompt], params)[0]
        steps_engine += res.steps
        accepted += res.accepted
        drafted += res.drafted
        agree, margins = _teacher_forced_agree(draft, target, prompt, res.token_ids, draft_vocab)
        steps_predicted += greedy_accepted_length(agree, k)[1]
        near_ties += sum(m < NEAR_TIE for m in margins)
        differ += int(res.token_ids != answer)
    return {"k": k, "sequences": len(answers), "steps_engine": steps_engine,
            "steps_teacher_forced": steps_predicted, "agree": steps_engine == steps_predicted,
            "acceptance_rate_engine": accepted / max(drafted, 1),
            "near_tie_positions": near_ties, "texts_differing_from_batched_answers": differ}


@torch.inference_mode()
def _teacher_forced_agree(draft, target, prompt: list[int], answer: list[int], draft_vocab=None
                          ) -> tuple[list[bool], list[float]]:
    """Per answer position: does the draft's argmax (over its trimmed vocabulary, if any) equal
    the committed token; target margins."""
    ids = torch.tensor([prompt + answer])
    start = len(prompt) - 1
    if draft_vocab is None:
        d = draft(ids).logits[0, start:-1].float()
    else:
        hidden = draft.get_decoder()(input_ids=ids).last_hidden_state[0, start:-1]
        d = draft_vocab.masked_head(draft)(hidden).float()
    t = target(ids).logits[0, start:-1].float()
    top2 = t.topk(2, dim=-1).values
    return (d.argmax(-1) == ids[0, start + 1:]).tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def sampled_acceptance(target, draft, answers: list[Answer], k: int, seed: int = 0,
                       draft_vocab=None) -> dict:
    engine = SpeculativeEngine(target, draft, k=k, draft_vocab=draft_vocab)
    prompts = [a.ids[:a.prompt_len] for a in answers]
    results = engine.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=len(a.ids) -
                                                       a.prompt_len, seed=seed + i)
                                        for i, a in enumerate(answers)])
    acc, dr, steps, toks = (sum(getattr(r, f) for r in results)
                            for f in ("accepted", "drafted", "steps", "committed"))
    return {"k": k, "acceptance_rate": acc / max(dr, 1), "mal": toks / max(steps, 1)}


# ---------------------------------------------------------------------------- latency


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(target, drafts: dict[str, Any], prompts: list[list[int]], tokens: int,
            k: int | dict[str, int], repeats: int, hf: bool, console: Console,
            vocabs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """ms/token at batch 1, greedy, for the target alone and every draft, ours and HF's.
    k: one draft length, or one per draft label; vocabs: label -> trimmed draft vocabulary
    (our engine only: Hugging Face drafts over the full vocabulary)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    ks = k if isinstance(k, dict) else {label: k for label in drafts}
    vocabs = vocabs or {}
    rows = []
    k = 1

    def ours(draft, label=None):
        engine = SpeculativeEngine(target, draft, k=k, draft_vocab=vocabs.get(label))
        out = {}

        def go():
            out["results"] = [engine.generate([p], params)[0] for p in prompts]
        seconds = _median_time(go, repeats)
        res = out["results"]
        n = sum(len(r.token_ids) for r in res)
        drafted = sum(r.drafted for r in res)
        return seconds, n, (sum(r.accepted for r in res) / drafted if drafted else None)

    def hf_generate(draft, label=None):
        from transformers.generation import candidate_generator as cg

        matches: list[int] = []
        original = cg.AssistedCandidateGenerator.update_candidate_strategy

        def record(self, input_ids, scores, num_matches):
            matches.append(int(num_matches))
            return original(self, input_ids, scores, num_matches)

        kwargs = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
        if draft is not None:
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0
            kwargs["assistant_model"] = draft
        out = {}

        def go():
            matches.clear()
            with torch.inference_mode():
                out["n"] = sum(target.generate(torch.tensor([p]), **kwargs).shape[1] - len(p)
                               for p in prompts)
        cg.AssistedCandidateGenerator.update_candidate_strategy = record
        try:
            seconds = _median_time(go, repeats)
        finally:
            cg.AssistedCandidateGenerator.update_candidate_strategy = original
        acc = sum(matches) / (k * len(matches)) if matches else None
        return seconds, out["n"], acc

    engines = [("specdec", ours)] + ([("hf", hf_generate)] if hf else [])
    for label, draft in [("target alone", None), *drafts.items()]:
        k = ks.get(label, 1)
        for engine_name, fn in engines:
            console.print(f"latency: {engine_name} / {label}")
            seconds, n, acc = fn(draft, label)
            rows.append({"engine": engine_name, "draft": label, "k": k if draft else 0,
                         "ms_per_token": 1000 * seconds / n, "tokens_per_s": n / seconds,
                         "acceptance_rate": acc})
    base = {r["engine"]: r["ms_per_token"] for r in rows if r["draft"] == "target alone"}
    for r in rows:
        r["speedup_vs_own_target"] = base[r["engine"]] / r["ms_per_token"]
        r["speedup_vs_specdec_target"] = base["specdec"] / r["ms_per_token"]
    return rows


def vllm_rows(cfg: BenchConfig, drafts: dict[str, str], console: Console) -> list[dict] | None:
    """vLLM's own numbers (`python -m specdec.vllm generate` in .venv-vllm), if it is there.

    vLLM decodes the subset's prompts as one batch (its scheduler's choice), greedy, with
    `draft_model` speculation; ms/token is its generate time over the tokens it produced, and
    acceptance comes from vLLM's spec-decode counters.
    """
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if cfg.vllm == "off" or (cfg.vllm == "auto" and not python.exists()):
        return None
    if not python.exists():
        raise SystemExit("--vllm on needs .venv-vllm: run `make vllm-check` once to create it")
    rows = []
    for label, draft in [("target alone", None), *drafts.items()]:
        out = Path(cfg.out) / f"vllm-{label.replace(' ', '-')}.json"
        cmd = [str(python), "-m", "specdec.vllm", "generate", "--target", cfg.target,
               "--prompts", cfg.prompts, "-n", str(max(cfg.latency_n, 1)),
               "--max-tokens", str(cfg.latency_tokens), "--json", str(out)]
        if draft is not None:
            cmd += ["--draft", draft, "--k", str(cfg.k or recommended_k(draft))]
        console.print(f"vLLM: {label}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            console.print(f"[yellow]vLLM run failed (exit {proc.returncode}); skipped[/yellow]\n"
                          f"{proc.stderr[-1500:]}")
            return None
        result = json.loads(out.read_text())
        spec = result.get("spec_decode") or {}
        seconds, tokens = result["seconds"]["generate"], result["output_tokens"]
        rows.append({"engine": f"vllm (batch {max(cfg.latency_n, 1)})", "draft": label,
                     "k": (cfg.k or recommended_k(draft)) if draft else 0,
                     "ms_per_token": 1000 * seconds / tokens,
                     "tokens_per_s": tokens / seconds,
                     "acceptance_rate": (spec["num_accepted_tokens"] / spec["num_draft_tokens"]
                                         if spec.get("num_draft_tokens") else None)})
    for r in rows:
        r["speedup_vs_own_target"] = rows[0]["ms_per_token"] / r["ms_per_token"]
    return rows


# ---------------------------------------------------------------------------- report


def flops_rows(target_config, draft_configs: dict[str, Any], quality: list[DraftQuality],
               k: int, context: int) -> list[dict[str, Any]]:
    target = flops.decode_flops(target_config, context).total
    rows = []
    for q in quality:
        draft = flops.decode_flops(draft_configs[q.label], context).total
        mal = q.report.mean_accepted_length[k]
        rows.append({"draft": q.label, "draft_flops_reduction": 1 - draft / target,
                     "flops_per_committed_token": (k * draft + (k + 1) * target) / mal,
                     "target_flops_per_token": target, "mal": mal, "k": k,
                     "model_speedup": flops.spec_cost(target_config, draft_configs[q.label], k,
                                                      min(q.report.top1_agreement, 0.999),
                                                      context).speedup})
    return rows


def plots(quality: list[DraftQuality], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in quality:
        ks = sorted(q.report.mean_accepted_length)
        ax.plot(ks, [q.report.mean_accepted_length[k] for k in ks], marker="o", label=q.label)
    ax.set(xlabel="draft length k", ylabel="mean accepted length (tokens / target forward)",
           title="MAL vs k (greedy, teacher-forced)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "mal_vs_k.png", dpi=120)
    files.append("mal_vs_k.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    k = max(q.per_position and max(q.per_position) for q in quality)
    for q in quality:
        rates = q.per_position[k]
        ax.plot(range(1, k + 1), rates, marker="o", label=q.label)
    ax.set(xlabel="draft position", ylabel="acceptance rate", title=f"per-position acceptance, k={k}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_position.png", dpi=120)
    files.append("per_position.png")
    plt.close(fig)

    cats = sorted(quality[0].per_category)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(quality)
    for j, q in enumerate(quality):
        ax.bar([i + j * width for i in range(len(cats))],
               [q.per_category[c]["mal@4"] for c in cats], width, label=q.label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30)
    ax.set(ylabel="MAL at k=4", title="acceptance by category")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "by_category.png", dpi=120)
    files.append("by_category.png")
    plt.close(fig)
    return files


def markdown(cfg: BenchConfig, result: dict[str, Any]) -> str:
    lines = [f"# Acceptance report: {cfg.target}", "",
             f"{result['answers']} target answers on {cfg.prompts} ({cfg.turns} turn(s), "
             f"{cfg.max_new_tokens} tokens each); machine: {result['machine']}", "",
             "## Quality (teacher-forced, greedy; alpha at T=1)", "",
             "| draft | layers | top-1 | alpha | " + " | ".join(f"MAL k={k}" for k in (1, 2, 4, 8))
             + " |", "|---|---|---|---|" + "---|" * 4]
    for q in result["quality"]:
        lines.append(f"| {q['draft']} | {q['layers']} | {q['top1_agreement']:.3f} | "
                     f"{q['alpha']:.3f} | " + " | ".join(f"{q['mal'][str(k)]:.2f}"
                                                         for k in (1, 2, 4, 8)) + " |")
    lines += ["", f"## FLOPs (k={cfg.k or 4})", "",
              "| draft | draft FLOPs vs target | FLOPs / committed token vs target alone |",
              "|---|---|---|"]
    for f in result["flops"]:
        lines.append(f"| {f['draft']} | -{100 * f['draft_flops_reduction']:.1f}% | "
                     f"{f['flops_per_committed_token'] / f['target_flops_per_token']:.2f}x |")
    if result.get("engine_check"):
        lines += ["", "## Engine vs teacher-forced (greedy)", "",
                  "| draft | k | steps (engine) | steps (teacher-forced) | agree | sampled acceptance (T=1) |",
                  "|---|---|---|---|---|---|"]
        for label, c in result["engine_check"].items():
            s = result["sampled"][label]
            lines.append(f"| {label} | {c['k']} | {c['steps_engine']} | "
                         f"{c['steps_teacher_forced']} | {c['agree']} | {s['acceptance_rate']:.3f} |")
    if result.get("latency"):
        lines += ["", "## Latency (batch 1, greedy, medians)", "",
                  "| engine | draft | k | ms/token | tokens/s | speedup vs own target | acceptance |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["latency"] + (result.get("vllm") or []):
            acc = "-" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.3f}"
            lines.append(f"| {r['engine']} | {r['draft']} | {r['k']} | {r['ms_per_token']:.1f} | "
                         f"{r['tokens_per_s']:.1f} | {r['speedup_vs_own_target']:.2f}x | {acc} |")
    lines += [""] + [f"![{p}]({p})" for p in result["plots"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def run(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    drafts = parse_drafts(cfg.draft)
    paths = {label: resolve_model(p) for label, p in drafts.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    target, tokenizer = load_model(cfg.target)
    answers = cached_target_answers(cfg.target, cfg.prompts, cfg.n, cfg.turns,
                                    cfg.max_new_tokens, cfg.batch_size, console, target, tokenizer)
    models = {label: load_model(p)[0] for label, p in paths.items()}
    vocabs = draft_vocabs(cfg, paths, target)
    ks = {label: cfg.k or recommended_k(p) for label, p in paths.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    quality = score_drafts(target, models, answers, cfg.batch_size, 1.0, REPORT_KS, pad, console,
                           vocabs=vocabs)
    console.print(quality_table(quality, f"quality vs {cfg.target} ({len(answers)} answers)"))
    context = int(statistics.median(len(a.ids) for a in answers))
    fl = flops_rows(target.config, {k: m.config for k, m in models.items()}, quality,
                    cfg.k or 4, context)
    result: dict[str, Any] = {
        "config": asdict(cfg), "answers": len(answers), "machine": _machine(),
        "quality": [q.row() for q in quality], "flops": fl, "engine_check": {}, "sampled": {},
        "k": ks, "draft_vocab_n": {label: v.n for label, v in vocabs.items()},
    }
    subset = [a for a in answers if a.turn == 1][:cfg.latency_n]
    if subset:
        for label, m in models.items():
            console.print(f"engine check: {label}")
            result["engine_check"][label] = engine_check(target, m, subset, ks[label],
                                                         vocabs.get(label))
            result["sampled"][label] = sampled_acceptance(target, m, subset, ks[label],
                                                          draft_vocab=vocabs.get(label))
        prompts = [a.ids[:a.prompt_len] for a in subset]
        result["latency"] = latency(target, models, prompts, cfg.latency_tokens, ks,
                                    cfg.repeats, cfg.hf, console, vocabs)
        result["vllm"] = vllm_rows(cfg, {k: str(v) for k, v in paths.items()}, console)
        console.print(latency_table(result["latency"] + (result["vllm"] or [])))
    result["plots"] = plots(quality, out)
    write_json_atomic(out / "acceptance.json", result)
    (out / "report.md").write_text(markdown(cfg, result))
    console.print(f"report: {out / 'report.md'}")
    return result


def draft_vocabs(cfg: BenchConfig, paths: dict[str, Path], target) -> dict[str, Any]:
    """label -> the trimmed vocabulary each draft's specdec.json names (--draft-vocab auto)."""
    from specdec.vocab import load_draft_vocab

    if cfg.draft_vocab not in ("auto", "full"):
        raise ValueError(f"--draft-vocab must be auto or full, got {cfg.draft_vocab!r}")
    if cfg.draft_vocab == "full":
        return {}
    size = target.get_output_embeddings().weight.shape[0]
    return {label: v for label, p in paths.items() if (v := load_draft_vocab(p, size)) is not None}


def latency_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="latency, batch 1, greedy (medians)")
    for col in ("engine", "draft", "k", "ms/token", "tok/s", "speedup vs own target",
                "speedup vs specdec target", "acceptance"):
        table.add_column(col)
    for r in rows:
        acc = "-" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.3f}"
        # vLLM rows run batched, so they have no ratio to our batch-1 target
        vs_ours = r.get("speedup_vs_specdec_target")
        table.add_row(r["engine"], r["draft"], str(r["k"]), f"{r['ms_per_token']:.1f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_own_target']:.2f}x",
                      "-" if vs_ours is None else f"{vs_ours:.2f}x", acc)
    return table


def _machine() -> str:
    import os
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "draft":
            parser.add_argument(flag, action="append", default=[], help="label=path (repeat)")
        elif name == "n":
            parser.add_argument(flag, type=int, default=None)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    result = run(cfg)
    summary = {"target": cfg.target, "answers": result["answers"],
               "mal_k4": {q["draft"]: round(q["mal"]["4"], 3) for q in result["quality"]},
               "alpha": {q["draft"]: round(q["alpha"], 3) for q in result["quality"]},
               "engine_agrees": all(c["agree"] for c in result["engine_check"].values())}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
