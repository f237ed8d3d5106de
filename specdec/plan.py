"""What a pipeline preset will do, before doing it: stages, commands, memory, time.

`python -m specdec.pipeline --preset paper-8b --dry-run` prints, for the preset's target, each
stage with the command that runs it on its own, the accelerator memory it needs and an estimate
of its time on one H100 / H200 (80 / 141 GiB, ~990 dense bf16 TFLOP/s, 3.35 / 4.8 TB/s).
Nothing is downloaded: the sizes come from the registry's known config (specdec.models) and
specdec.flops.

The estimates are a model, not a measurement, and say so: bf16 weights (2 bytes a parameter),
full fine-tuning with AdamW at 16 bytes a parameter (bf16 weights and grads, fp32 master and two
moments) plus activations, LoRA at the frozen weights plus ~10%; throughput at 40% of peak for
training (6 FLOPs a parameter a token, 8 with the KD teacher's forward), vLLM generation at a
stated tokens/s for an 8B model at batch 256, decode-bound benches at the memory bandwidth.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

# Presets whose target is not the embedded default (the pipeline's --target default).
PRESET_TARGETS = {"paper-8b": "llama-3.1-8b-instruct"}

GIB = 1024 ** 3
GPUS = {  # name: (memory GiB, dense bf16 FLOP/s, memory bandwidth B/s)
    "H100": (80, 989e12, 3.35e12),
    "H200": (141, 989e12, 4.8e12),
}
TRAIN_MFU = 0.40
VLLM_TOKENS_PER_S = {"H100": 2500.0, "H200": 3500.0}  # an 8B model, bf16, batch 256, ~500 ctx
ANSWER_TOKENS_PER_RECORD = 0.6  # generated tokens, as a share of max_new_tokens (stops early)


@dataclass
class Step:
    name: str
    command: str
    memory_gib: float  # on one GPU
    minutes: dict[str, float]  # GPU name -> estimated minutes
    note: str = ""


def _params(config) -> int:
    from specdec.flops import param_counts

    return param_counts(config).total


def _draft_config(config, layers: int):
    draft = config.__class__(**config.to_dict())
    draft.num_hidden_layers = layers
    return draft


def plan(preset_name: str, preset, target: str, run_dir: str, gpus: int = 1) -> list[Step]:
    """The steps of `preset` on `target` (a registry name with a known config)."""
    from specdec.models import known_config

    config = known_config(target)
    n_layers = config.num_hidden_layers
    p_target = _params(config)
    w_target = p_target * 2 / GIB  # bf16
    steps: list[Step] = []
    q = shlex.quote
    ft = preset.finetune

    def minutes(flop: float = 0.0, tokens_vllm: float = 0.0, bytes_moved: float = 0.0):
        out = {}
        for gpu, (_, peak, bw) in GPUS.items():
            seconds = flop / (peak * TRAIN_MFU * gpus) + tokens_vllm / VLLM_TOKENS_PER_S[gpu] \
                + bytes_moved / bw
            out[gpu] = seconds / 60 + 1.0  # + a minute to load the weights
        return out

    # prune: calibration forwards + held-out continuations, bf16 on one GPU
    for cut in preset.cuts:
        keep = cut.keep if cut.keep is not None else n_layers - cut.drop
        rule = f"--drop {cut.drop}" if cut.drop is not None else f"--keep {cut.keep}"
        calib_tokens = preset.prune_calib_n * 256 + preset.prune_heldout_n * 64
        steps.append(Step(
            f"prune {cut.name} ({n_layers} -> {keep} layers)",
            f"python -m specdec.prune --target {target} {rule} --select acceptance "
            f"--calib-n {preset.prune_calib_n} --heldout-n {preset.prune_heldout_n} "
            f"--device cuda --out {q(f'{run_dir}/{cut.name}/pruned')}",
            w_target * 1.3, minutes(flop=2 * p_target * calib_tokens * 4,
                                    bytes_moved=preset.prune_heldout_n * 64 * p_target * 2 / 8),
            "one target forward per calibration batch, a few per candidate block"))
    answer_tokens = preset.distill_n * preset.distill_max_new_tokens * ANSWER_TOKENS_PER_RECORD
    steps.append(Step(
        f"distill ({preset.distill_n} records, vLLM)",
        f"python -m specdec.distill --target {target} --data sharegpt --n {preset.distill_n} "
        f"--engine vllm --dtype bfloat16 --batch-size {preset.vllm_batch_size} "
        f"--max-new-tokens {preset.distill_max_new_tokens} "
        f"--max-answer-tokens {preset.distill_max_answer_tokens} "
        f"--out {q(f'{run_dir}/distilled.jsonl')}",
        0.9 * GPUS["H100"][0], minutes(tokens_vllm=answer_tokens),
        "vLLM takes ~90% of the GPU (weights + KV cache); the rest of the time is prefill"))
    seq = ft.get("max_seq_len", 512)
    examples = ft.get("n") or preset.distill_n
    train_tokens = examples * seq * 0.6 * ft.get("epochs", 1)
    method = ft.get("method", "lora")
    for cut in preset.cuts:
        keep = cut.keep if cut.keep is not None else n_layers - cut.drop
        p_draft = _params(_draft_config(config, keep))
        recipe = {**ft, **cut.finetune}
        extra = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()
                         if k not in ("method", "bf16") and v is not None)
        for variant, data, kd in (("sft", "original.jsonl", 0.0), ("sd", "distilled.jsonl", 0.0),
                                  ("sd-kd", "distilled.jsonl", preset.kd)):
            if variant == "sd-kd" and not preset.kd:
                continue
            state = 16 if method == "full" else 2.2
            memory = p_draft * state / GIB \
                + (w_target if kd else 0) + 8.0  # activations at micro batch 8, checkpointed
            flop = (6 * p_draft + (2 * p_target if kd else 0)) * train_tokens
            kd_args = f" --kd {kd} --target {target}" if kd else ""
            steps.append(Step(
                f"finetune {cut.name}/{variant} ({method}, torchrun x{gpus})",
                f"torchrun --nproc-per-node {gpus} -m specdec.finetune --draft "
                f"{q(f'{run_dir}/{cut.name}/pruned')} --data {q(f'{run_dir}/{data}')} "
                f"--{method} {extra} --bf16 --device cuda{kd_args} "
                f"--out {q(f'{run_dir}/{cut.name}/{variant}')}",
                memory, minutes(flop=flop),
                "full fine-tuning keeps 16 bytes a parameter on every rank (data parallel): "
                "more than an 80 GiB H100 holds (there: --lora)"
                if method == "full" and memory > GPUS["H100"][0] else ""))
    n_eval = preset.eval_n or 80
    eval_tokens = n_eval * preset.eval_turns * preset.eval_max_new_tokens
    for cut in preset.cuts:
        drafts = " ".join(f"--draft {v}={q(f'{run_dir}/{cut.name}/{v}')}"
                          for v in ("pruned", "sft", "sd") + (("sd-kd",) if preset.kd else ()))
        steps.append(Step(
            f"bench {cut.name} (MT-Bench {n_eval} x {preset.eval_turns}, vLLM drop-in)",
            f"python bench/acceptance.py --target {target} {drafts} --turns {preset.eval_turns} "
            f"--max-new-tokens {preset.eval_max_new_tokens} --k {preset.k} "
            f"--latency-n {preset.latency_n} --vllm {preset.bench_vllm} "
            f"--out {q(f'{run_dir}/{cut.name}/bench')}",
            w_target * 2 + 6.0,
            # decode-bound: every target token reads the weights once (batch 8 answers), then
            # the drafts teacher-forced, the engine subset and vLLM start-ups (~2 min each)
            {g: v + 2.0 * (4 if preset.bench_vllm != "off" else 0)
             for g, v in minutes(bytes_moved=eval_tokens / 8 * p_target * 2,
                                 flop=2 * p_target * eval_tokens * 4).items()},
            "target + one draft resident; vLLM rows start vLLM once per draft"))
    return steps


def print_plan(preset_name: str, preset, target: str, run_dir: str,
               console: Console | None = None, gpus: int = 1) -> dict[str, Any]:
    """Print the plan; returns it as JSON-able data (the stages and the totals)."""
    console = console or Console()
    steps = plan(preset_name, preset, target, run_dir, gpus)
    table = Table(title=f"pipeline --preset {preset_name} --dry-run: {target}, "
                        f"{gpus} GPU{'s' if gpus > 1 else ''} (estimates)")
    for col in ("stage", "GPU memory", *(f"min on {g}" for g in GPUS), "fits"):
        table.add_column(col)
    for s in steps:
        fits = ", ".join(g for g, (mem, _, _) in GPUS.items() if s.memory_gib <= mem) or "none"
        table.add_row(s.name, f"{s.memory_gib:.0f} GiB",
                      *(f"{s.minutes[g]:.0f}" for g in GPUS), fits)
    totals = {g: sum(s.minutes[g] for s in steps) for g in GPUS}
    table.add_row("total", "", *(f"{totals[g]:.0f}" for g in GPUS), "")
    console.print(table)
    console.print("[bold]commands, in order[/bold] (the pipeline runs the same stages itself; "
                  "these run one stage on its own):")
    for s in steps:
        console.print(f"# {s.name}" + (f" -- {s.note}" if s.note else ""), highlight=False,
                      soft_wrap=True)
        console.print(s.command, highlight=False, soft_wrap=True)
    console.print(f"Needs: hub access to {target} (accept the license, `hf auth login`), "
                  f"vLLM (`bash scripts/install_vllm.sh`), nothing was downloaded now.",
                  soft_wrap=True)
    return {"preset": preset_name, "target": target,
            "stages": [s.__dict__ for s in steps], "total_minutes": totals}
