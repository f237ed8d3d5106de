"""Heal a pruned draft: SFT or self-distilled fine-tuning (one recipe), LoRA or full, optional KD.

    python -m specdec.finetune --draft runs/x/pruned --data runs/x/distilled.jsonl \
        --out runs/x/sd [--lora | --full] [--kd 0.5 --kd-temperature 1.0 \
        --target smollm2-135m-instruct]
    python -m specdec.logit_cache --data runs/x/distilled.jsonl --top-k 32 \
        --out runs/x/distilled.logits           # once; then KD epochs never run the target:
    python -m specdec.finetune --draft runs/x/pruned --data runs/x/distilled.jsonl --full \
        --kd 0.5 --kd-tv 1.0 --kd-cache runs/x/distilled.logits --freeze-below-cut \
        --freeze-embeddings --out runs/x/sd-kd
    python -m specdec.finetune --draft runs/x/pruned --data sharegpt --n 1000 --out runs/x/sft
    torchrun --nproc-per-node 2 -m specdec.finetune ...   # data parallel (gloo on CPU)

The SFT baseline and the self-distilled draft share this recipe; only --data differs. Each
record's first turn is chat-templated exactly as at inference (`specdec.train_data`); the loss
is on the response tokens only. Records are selected as `specdec.distill` selects them, so
`--data sharegpt --n N` trains on the records that `specdec.distill --n N` rewrote (pass the
same caps).

Loss per optimizer step = sum over the global batch's response tokens of cross-entropy
+ kd * T^2 * KL(target_probs || draft_probs) + kd_tv * TV(target_probs, draft_probs) at
temperature T, divided by the number of response tokens in the global batch (`specdec.kd`).
The KD terms are on the full vocabulary, or with --kd-top-k K on the (K + 1)-way partition of
the target's top K ids plus the rest; --kd-cache reads that partition from a
`specdec.logit_cache` cache (checked against this run's target, data, selection, template,
top-k and temperature) instead of running the target. --batch-size is the global batch
(sequences per step); each process takes its share and accumulates gradients over
micro-batches of --micro-batch-size, and gradients are summed across processes, so one process
and N processes follow the same loss curve. Batches group similar lengths; lr warms up linearly
and decays on a cosine.

--freeze-below-cut freezes the draft's layers below the removed block (from the `removed_layers`
of its specdec.json): they see exactly the target's inputs. With --freeze-embeddings too (the
tied embedding/head), nothing below the cut needs a backward pass.

LoRA (peft) adapters are merged into the weights at the end. The result is a plain
LlamaForCausalLM checkpoint dir plus specdec.json (parent, data file and sha256, recipe, loss
curve), loss_curve.json and loss_curve.png. Every --save-every steps the trainable weights,
optimizer, scheduler, RNG states and step go to `<out>.ckpt/` (`specdec.train_state`); a rerun
with the same arguments resumes from there, and a finished --out with the same recipe is not
retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from specdec import logit_cache
from specdec.cli import config_from_args, config_parser
from specdec.data import DataError
from specdec.turns import data_sha256
from specdec.kd import OnlineTeacher, kd_losses, response_logits
from specdec.models import (DEFAULT_TARGET, MANIFEST, ModelError, load_model, read_manifest,
                            resolve_model, save_checkpoint, write_json_atomic)
from specdec.precision import bf16_warning
from specdec.train_data import (DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_SEQ_LEN, Example,
                                Selection, build_examples, collate, epoch_batches, special_ids)
from specdec.train_state import (TrainState, checkpoint, ckpt_dir, plot_curve, resume,
                                 world)

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fields that do not change what is trained: a resume may change them.
NOT_RECIPE = ("out", "save_every", "device", "eval_every", "eval_n", "eval_max_new_tokens")
# Recipe fields added after runs were made: at these values they leave a fingerprint as it was.
LATER_DEFAULTS = {"kd_tv": 0.0, "kd_top_k": None, "kd_cache": None, "freeze_below_cut": False,
                  "freeze_embeddings": False}


@dataclass
class FinetuneConfig:
    draft: str = field(metadata={"help": "the draft to heal: checkpoint dir or registry name"})
    out: str = field(metadata={"help": "output checkpoint dir"})
    data: str = field(default="sharegpt", metadata={
        "help": "sharegpt | a distilled JSONL | any local JSON/JSONL of records"})
    n: int | None = field(default=None, metadata={"help": "records to use (default: all)"})
    split: str = field(default="train", metadata={
        "help": "split of a built-in source (local files are used whole)",
        "choices": ["train", "test", "all"]})
    max_prompt_tokens: int = field(default=DEFAULT_MAX_PROMPT_TOKENS, metadata={
        "help": "skip records whose chat-templated prompt is longer (as distill does)"})
    max_answer_tokens: int | None = field(default=None, metadata={
        "help": "skip records whose answer is longer (as distill does)"})
    max_seq_len: int = field(default=DEFAULT_MAX_SEQ_LEN,
                             metadata={"help": "truncate longer sequences"})
    method: str = field(default="lora", metadata={"choices": list(METHODS),
                                                  "help": "also --lora / --full"})
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR))
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps (default: --epochs over the data; overrides --epochs)"})
    batch_size: int = field(default=16, metadata={"help": "global batch: sequences per step"})
    micro_batch_size: int = field(default=4, metadata={
        "help": "sequences per forward pass in each process (gradient accumulation)"})
    lr: float | None = field(default=None, metadata={"help": "default: 2e-4 LoRA, 5e-5 full"})
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kd: float = field(default=0.0, metadata={
        "help": "weight of the T^2 KL(target || draft) term on response tokens (0: off)"})
    kd_tv: float = field(default=0.0, metadata={
        "help": "weight of the total-variation term (1 - TV is the acceptance alpha; 0: off)"})
    kd_temperature: float = 1.0
    kd_top_k: int | None = field(default=None, metadata={
        "help": "KD on the target's top-k ids plus one residual bucket (default: the full "
                "vocabulary online; the cache's k with --kd-cache)"})
    kd_cache: str | None = field(default=None, metadata={
        "help": "a specdec.logit_cache dir for this data: KD without running the target"})
    target: str | None = field(default=None, metadata={
        "help": "the KD teacher (default: the target named in the draft's specdec.json)"})
    freeze_below_cut: bool = field(default=False, metadata={
        "help": "freeze the layers below the removed block (specdec.json removed_layers)"})
    freeze_embeddings: bool = field(default=False, metadata={
        "help": "freeze the input embedding (and the LM head when tied to it)"})
    seed: int = 0
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CPU or CUDA)"})
    group_by_length: bool = True
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: never)"})
    eval_every: int = field(default=0, metadata={
        "help": "learning curve: score the draft teacher-forced on MT-Bench (specdec.curves) "
                "before training, every N steps and at the end (0: never)"})
    eval_n: int = field(default=40, metadata={"help": "MT-Bench first turns the probe scores"})
    eval_max_new_tokens: int = field(default=64, metadata={
        "help": "tokens of each target answer the probe scores"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "micro_batch_size", "epochs", "max_seq_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kd < 0 or self.kd_tv < 0 or self.kd_temperature <= 0:
            raise ValueError("--kd and --kd-tv must be >= 0 and --kd-temperature > 0")
        if self.kd_top_k is not None and self.kd_top_k < 1:
            raise ValueError("--kd-top-k must be at least 1 (or none: the full vocabulary)")
        if self.eval_every < 0 or self.eval_n < 1 or self.eval_max_new_tokens < 1:
            raise ValueError("--eval-every must be >= 0, --eval-n and --eval-max-new-tokens >= 1")
        if self.kd_cache and not self.uses_kd:
            raise ValueError("--kd-cache without --kd or --kd-tv has nothing to do; set a KD "
                             "weight, or drop --kd-cache")

    @property
    def uses_kd(self) -> bool:
        return self.kd > 0 or self.kd_tv > 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def recipe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in NOT_RECIPE:
            d.pop(k)
        d["lr"] = self.learning_rate
        return d


@dataclass
class FinetuneResult:
    out: Path
    manifest: dict[str, Any]
    curve: list[dict[str, Any]]
    resumed_from: int = 0  # the step a checkpoint resumed from (0: started fresh)


# ---------------------------------------------------------------------------- loss and step


def accumulate_gradients(model, teacher, examples: list[Example], shard: list[int],
                         n_tokens: int, cfg: FinetuneConfig, pad_id: int,
                         device: torch.device) -> torch.Tensor:
    """Backpropagate this process's share (`shard`, indices into `examples`) of a global batch,
    micro-batch by micro-batch.

    Each micro-batch adds d(loss_sum / n_tokens), where loss_sum is the sum over its response
    tokens of cross-entropy (+ kd * T^2 * KL(target || draft) + kd_tv * TV) and n_tokens counts
    the response tokens of the whole global batch, so the gradients summed over micro-batches
    and processes are those of the global batch's mean loss. `teacher(indices, input_ids,
    attention_mask, loss_mask)` gives the target's logits or `TopK` at the loss positions.
    Returns [cross-entropy sum, KL sum, TV sum] (float64).
    """
    sums = torch.zeros(3, dtype=torch.float64)
    temperature = cfg.kd_temperature
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    for m in range(0, len(shard), cfg.micro_batch_size):
        indices = shard[m:m + cfg.micro_batch_size]
        input_ids, attention_mask, loss_mask, labels = collate(
            [examples[i] for i in indices], pad_id, device)
        with autocast:
            logits = response_logits(model, input_ids, attention_mask, loss_mask)
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = ce
        if teacher is not None:
            target = teacher(indices, input_ids, attention_mask, loss_mask)
            kl, tv = kd_losses(logits, target, temperature)
            loss = ce + cfg.kd * temperature ** 2 * kl + cfg.kd_tv * tv
            sums[1] += kl.item()
            sums[2] += tv.item()
        (loss / n_tokens).backward()
        sums[0] += ce.item()
    return sums


def sync_gradients(params, sums: torch.Tensor) -> None:
    """Sum gradients and loss sums over all processes (a process with no examples adds 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- checkpoints


def fingerprint(recipe: dict[str, Any], data_hash: str, draft_hash: str,
                teacher: str | None = None) -> str:
    """What a run trains, by content: the recipe with the draft, data and KD cache named by
    their hashes (not their paths, so a resume from another directory still matches)."""
    recipe = {k: v for k, v in recipe.items() if k not in ("draft", "data", "kd_cache")
              and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    content = {"recipe": recipe, "data": data_hash, "draft": draft_hash}
    if teacher is not None:
        content["teacher"] = teacher
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- setup


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def teacher_name(cfg: FinetuneConfig, draft_manifest: dict[str, Any]) -> str | None:
    return cfg.target or draft_manifest.get("target")


def load_teacher(cfg: FinetuneConfig, draft_manifest: dict[str, Any], draft, tokenizer, device):
    name = teacher_name(cfg, draft_manifest)
    if not name:
        raise ValueError("--kd needs a teacher: pass --target (the draft's specdec.json names "
                         "none), or --kd-cache")
    teacher, teacher_tok = load_model(name, dtype=torch.float32, device=device)
    if teacher.config.vocab_size != draft.config.vocab_size or \
            teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--kd teacher {name} has a different vocabulary from the draft "
                         f"({teacher.config.vocab_size} vs {draft.config.vocab_size} ids): "
                         f"KD needs the target the draft was cut from")
    teacher.requires_grad_(False)
    return name, teacher.eval()


def open_kd_cache(cfg: FinetuneConfig, draft_manifest: dict[str, Any], tokenizer,
                  stop_ids: set[int], pad_id: int, examples: list[Example],
                  data_hash: str) -> logit_cache.LogitCache:
    """The --kd-cache, checked against everything this run's KD targets depend on."""
    name = teacher_name(cfg, draft_manifest)
    old = logit_cache.peek(cfg.kd_cache)  # what it was made with, where readable
    fix = logit_cache.command(logit_cache.LogitCacheConfig(
        **{**vars(Selection.of(cfg)), "target": name or old.get("target") or "<the target>",
           "top_k": cfg.kd_top_k or old.get("top_k") or 32,
           "temperature": cfg.kd_temperature, "out": cfg.kd_cache}))
    expected = logit_cache.settings(
        Selection.of(cfg), data_hash, logit_cache.tokenizer_identity(tokenizer, stop_ids, pad_id),
        examples, cfg.kd_top_k or 0, cfg.kd_temperature)
    expected.pop("format")
    if cfg.kd_top_k is None:
        expected.pop("top_k")  # use the cache's
    if cfg.target:
        expected["target_weights"] = logit_cache.target_identity(resolve_model(cfg.target))
    elif draft_manifest.get("target_weights"):
        expected["target_weights"] = draft_manifest["target_weights"]
    elif name:
        expected["target"] = name
    return logit_cache.open_cache(cfg.kd_cache, expected, fix)


def frozen_layers(cfg: FinetuneConfig, draft_path: Path, draft_manifest: dict[str, Any]
                  ) -> list[int]:
    """The draft's layers below its cut (draft numbering = target numbering there), found in
    the `removed_layers` of its specdec.json or its parents'."""
    if not cfg.freeze_below_cut:
        return []
    manifest, seen = draft_manifest, 0
    while "removed_layers" not in manifest and manifest.get("parent") and seen < 8:
        manifest, seen = read_manifest(manifest["parent"]), seen + 1
    removed = manifest.get("removed_layers")
    if not removed:
        raise ValueError(f"--freeze-below-cut needs the layers the draft lost, and neither "
                         f"{draft_path / MANIFEST} nor its parents' name removed_layers (a "
                         f"draft made by specdec.prune does); drop --freeze-below-cut")
    return list(range(min(removed)))


def trainable_model(cfg: FinetuneConfig, model, frozen: list[int]):
    """(model to train, its trainable parameters by name): LoRA wrapping, then freezing."""
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM"))
    base = model.get_base_model() if cfg.method == "lora" else model
    for i in frozen:
        base.get_decoder().layers[i].requires_grad_(False)
    if cfg.freeze_embeddings:
        base.get_input_embeddings().requires_grad_(False)
    model.train()
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- loop


def train(cfg: FinetuneConfig, model, teacher, examples: list[Example], state: TrainState,
          total_steps: int, pad_id: int, device: torch.device, save: Callable[[], None],
          console: Console, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          probe: Callable[[Any], dict[str, Any]] | None = None) -> int:
    """Run optimizer steps state.step .. total_steps; returns the tokens seen this run.
    `probe(model)` (a `specdec.curves.QualityProbe`) scores the draft every cfg.eval_every
    steps and after the last; its result goes into that step's curve record as ``eval``."""
    rank, world_size = world()
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    params = list(state.trainable.values())
    temperature = cfg.kd_temperature
    tokens_seen, t_start = 0, time.perf_counter()
    columns = [TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    epoch_cache: dict[int, list[list[int]]] = {}
    curve = state.curve
    with Progress(*columns, console=console, disable=rank != 0) as progress:
        task = progress.add_task("finetune", total=total_steps, completed=state.step,
                                 loss=f"{curve[-1]['loss']:.4f}" if curve else "-", tps="-")
        for step in range(state.step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch,
                                                    cfg.group_by_length)}
            batch = epoch_cache[epoch][index]
            n_tokens = sum(examples[i].n_response for i in batch)  # global: every rank knows
            shard = sorted(batch[rank::world_size], key=lambda i: -lengths[i])
            sums = accumulate_gradients(model, teacher, examples, shard, n_tokens, cfg, pad_id,
                                        device)
            if world_size > 1:
                sync_gradients(params, sums)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = state.scheduler.get_last_lr()[0]
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)

            batch_tokens = sum(lengths[i] for i in batch)
            tokens_seen += batch_tokens
            elapsed = time.perf_counter() - t_start
            ce, kl, tv = (x / n_tokens for x in sums.tolist())
            kd_on = teacher is not None
            record = {"step": step + 1,
                      "loss": ce + cfg.kd * temperature ** 2 * kl + cfg.kd_tv * tv,
                      "ce": ce, "kd": kl if kd_on else None, "tv": tv if kd_on else None,
                      "lr": lr, "response_tokens": n_tokens,
                      "train_tokens": (curve[-1].get("train_tokens", 0) if curve else 0) + batch_tokens,
                      "tokens_per_s": round(tokens_seen / elapsed, 2)}
            if probe is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
                record["eval"] = probe(model)
                t_start += time.perf_counter() - t_start - elapsed  # the probe is not training
            curve.append(record)
            state.step = step + 1
            progress.update(task, advance=1, loss=f"{record['loss']:.4f}",
                            tps=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save()
            if on_step is not None:
                on_step(step + 1, record)
    return tokens_seen


# ---------------------------------------------------------------------------- run


def run(cfg: FinetuneConfig, console: Console | None = None,
        on_step: Callable[[int, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune `cfg.draft` and write `cfg.out`. Under an initialised torch.distributed group
    each process trains on its share of every global batch (rank 0 writes). `on_step(step,
    record)` is called after every optimizer step (and after that step's checkpoint)."""
    rank, world_size = world()
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    if cfg.bf16 and rank == 0 and (warning := bf16_warning(
            device.type, "--bf16 (autocast)", "drop --bf16 (fp32 is faster here)")):
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    out, ckpt = Path(cfg.out), ckpt_dir(cfg.out)
    draft_path = resolve_model(cfg.draft, console)
    draft_manifest = read_manifest(draft_path)
    data_hash = data_sha256(cfg.data)
    draft_hash = json.dumps(draft_manifest.get("weights_sha256")) \
        if draft_manifest.get("weights_sha256") else str(draft_path.resolve())

    # data
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(draft_path, dtype=torch.float32, device=device)
    stop_ids, pad_id = special_ids(model, tokenizer)
    counts: Counter = Counter()
    examples = build_examples(Selection.of(cfg), tokenizer, stop_ids, counts)
    frozen = frozen_layers(cfg, draft_path, draft_manifest)

    # teacher: the KD cache (checked before anything is trained or deleted) or the target
    teacher, teacher_label, teacher_id = None, None, None
    if cfg.kd_cache:
        cache = open_kd_cache(cfg, draft_manifest, tokenizer, stop_ids, pad_id, examples,
                              data_hash)
        if cfg.kd_top_k is None:
            cfg = dataclasses.replace(cfg, kd_top_k=cache.top_k)
        teacher = logit_cache.CachedTeacher(cache, device)
        teacher_label, teacher_id = f"cache {cfg.kd_cache}", f"cache:{cache.key}"
    fp = fingerprint(cfg.recipe(), data_hash, draft_hash, teacher_id)

    if (out / MANIFEST).is_file():
        done = read_manifest(out)
        if done.get("fingerprint") == fp:
            if rank == 0:
                console.print(f"finetune: {out} is already trained with this recipe; nothing "
                              f"to do (delete it to train again)")
                shutil.rmtree(ckpt, ignore_errors=True)  # left by a crash right after saving
            return FinetuneResult(out, done, done.get("loss_curve", []))
        raise ValueError(f"{out} already holds a checkpoint made with another recipe or data; "
                         f"choose another --out, or delete it to replace it")

    if cfg.uses_kd and teacher is None:
        teacher_label, target_model = load_teacher(cfg, draft_manifest, model, tokenizer,
                                                   device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        teacher = OnlineTeacher(target_model, cfg.kd_top_k, cfg.kd_temperature, autocast)

    # model and optimizer
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    model, trainable = trainable_model(cfg, model, frozen)
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio))
    state = TrainState(trainable, optimizer, scheduler)

    # checkpointing and the loop
    if resume(state, ckpt, fp, console):
        if rank == 0:
            console.print(f"finetune: resuming {out} from step {state.step} of {total_steps}")
    else:
        torch.manual_seed(cfg.seed + rank)
    start_step = state.step
    probe = eval_before = None
    if cfg.eval_every and rank == 0:
        from specdec.curves import QualityProbe

        probe = QualityProbe.for_target(teacher_name(cfg, draft_manifest) or DEFAULT_TARGET,
                                        cfg.eval_n, cfg.eval_max_new_tokens, console=console)
        if state.step == 0:
            eval_before = probe(model)
    t_start = time.perf_counter()
    tokens_seen = train(cfg, model, teacher, examples, state, total_steps, pad_id, device,
                        lambda: checkpoint(state, ckpt, fp), console, on_step, probe)
    train_seconds = time.perf_counter() - t_start

    # output
    curve = state.curve
    manifest = {
        "stage": "finetune", "parent": str(draft_path),
        "parent_stage": draft_manifest.get("stage"),
        "target": draft_manifest.get("target"), "fingerprint": fp,
        "data": cfg.data, "data_sha256": data_hash, "examples": len(examples),
        "skipped": dict(sorted(counts.items())), "recipe": cfg.recipe(),
        "kd_teacher": teacher_label, "frozen_layers": frozen,
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "world_size": world_size, "steps": total_steps, "resumed_from_step": start_step,
        "train_seconds_this_run": round(train_seconds, 2),
        "tokens_per_s_this_run": round(tokens_seen / train_seconds, 2) if tokens_seen else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
    }
    if eval_before is not None:
        manifest["eval_before"] = eval_before
    if rank == 0:
        write_output(cfg, model, tokenizer, out, manifest, curve)
        shutil.rmtree(ckpt, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
    return FinetuneResult(out, manifest, curve, start_step)


def write_output(cfg: FinetuneConfig, model, tokenizer, out: Path, manifest: dict[str, Any],
                 curve: list[dict[str, Any]]) -> None:
    final = model.merge_and_unload() if cfg.method == "lora" else model
    final.eval()
    save_checkpoint(final, tokenizer, out, manifest)
    write_json_atomic(out / "loss_curve.json", curve)
    kd = [f"kd {cfg.kd}" if cfg.kd else "", f"tv {cfg.kd_tv}" if cfg.kd_tv else ""]
    plot_curve(curve, out / "loss_curve.png", f"{out.name}: {cfg.method}, data "
               f"{Path(cfg.data).name}" + "".join(f", {k}" for k in kd if k))


# ---------------------------------------------------------------------------- CLI


def init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(FinetuneConfig, "python -m specdec.finetune",
                           "Fine-tune (heal) a pruned draft: SFT or self-distilled, LoRA or full.")
    parser.add_argument("--lora", dest="method", action="store_const", const="lora",
                        default=argparse.SUPPRESS, help="LoRA (peft), merged at the end")
    parser.add_argument("--full", dest="method", action="store_const", const="full",
                        default=argparse.SUPPRESS, help="full fine-tuning")
    cfg = config_from_args(FinetuneConfig, parser.parse_args(argv))
    init_distributed()
    if cfg.device == "auto" and torch.cuda.is_available() and dist.is_initialized():
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    console = Console()
    rank = world()[0]
    try:
        result = run(cfg, console=console)
    except (DataError, ModelError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        m = result.manifest
        table = Table(title=f"finetune: {result.out}", show_header=False)
        table.add_row("method", cfg.method)
        table.add_row("data", f"{cfg.data} ({m['examples']} examples)")
        for reason, count in m["skipped"].items():
            table.add_row(f"  skipped: {reason}", str(count))
        table.add_row("steps", str(m["steps"]))
        if result.curve:
            table.add_row("loss first -> last",
                          f"{result.curve[0]['loss']:.4f} -> {result.curve[-1]['loss']:.4f}")
        table.add_row("tokens/s", str(m.get("tokens_per_s_this_run") or "-"))
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
