"""Heal a pruned draft: SFT or self-distilled fine-tuning (one recipe), LoRA or full, optional KD.

    python -m specdec.finetune --draft runs/x/pruned --data runs/x/distilled.jsonl \
        --out runs/x/sd [--lora | --full] [--kd 0.5 --kd-temperature 1.0 \
        --target smollm2-135m-instruct]
    python -m specdec.finetune --draft runs/x/pruned --data sharegpt --n 1000 --out runs/x/sft
    torchrun --nproc-per-node 2 -m specdec.finetune ...   # data parallel (gloo on CPU)

The SFT baseline and the self-distilled draft share this recipe; only --data differs. Each
record's first turn is chat-templated exactly as at inference: the prompt rendered with the
generation prompt, then the response tokens the template puts after it, up to and including the
end-of-turn token. The loss is on those response tokens only (the prompt is rendered on its own
and must be a prefix of the whole conversation; a record where it is not is skipped and
counted). Records are selected as `specdec.distill` selects them (first turns, the train split of
a built-in source, prompts capped at --max-prompt-tokens, answers at --max-answer-tokens), so
`--data sharegpt --n N` trains on the records that `specdec.distill --n N` rewrote (pass the
same caps).

Loss per optimizer step = sum over the global batch's response tokens of
cross-entropy + kd * T^2 * KL(target_probs || draft_probs) at temperature T, divided by the
number of response tokens in the global batch. --batch-size is the global batch (sequences per
step); each process takes its share and accumulates gradients over micro-batches of
--micro-batch-size, and gradients are summed across processes, so one process and N processes
follow the same loss curve. Batches group similar lengths; lr warms up linearly and decays on a
cosine.

LoRA (peft) adapters are merged into the weights at the end. The result is a plain
LlamaForCausalLM checkpoint dir plus specdec.json (parent, data file and sha256, recipe, loss
curve), loss_curve.json and loss_curve.png. Every --save-every steps the trainable weights,
optimizer, scheduler, RNG states and step go to `<out>.ckpt/`; a rerun with the same arguments
resumes from there, and a finished --out with the same recipe is not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
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

from specdec.cli import config_from_args, config_parser
from specdec.data import DataError, chat_ids
from specdec.distill import data_sha256, first_turns
from specdec.models import (MANIFEST, ModelError, load_model, read_manifest, resolve_model,
                            save_checkpoint, write_json_atomic)

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fields that do not change what is trained: a resume may change them.
NOT_RECIPE = ("out", "save_every", "device")


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
    max_prompt_tokens: int = field(default=512, metadata={
        "help": "skip records whose chat-templated prompt is longer (as distill does)"})
    max_answer_tokens: int | None = field(default=None, metadata={
        "help": "skip records whose answer is longer (as distill does)"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncate longer sequences"})
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
        "help": "weight of the KL(target || draft) term on response tokens (0: off)"})
    kd_temperature: float = 1.0
    target: str | None = field(default=None, metadata={
        "help": "the KD teacher (default: the target named in the draft's specdec.json)"})
    seed: int = 0
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CPU or CUDA)"})
    group_by_length: bool = True
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: never)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "micro_batch_size", "epochs", "max_seq_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kd < 0 or self.kd_temperature <= 0:
            raise ValueError("--kd must be >= 0 and --kd-temperature > 0")

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


# ---------------------------------------------------------------------------- examples


@dataclass
class Example:
    id: str
    input_ids: list[int]  # prompt then response
    n_prompt: int  # the first n_prompt tokens carry no loss

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def build_example(tokenizer, record_id: str, prompt: list[dict[str, str]], response: str,
                  stop_ids: set[int], max_seq_len: int) -> Example | str:
    """Token ids of prompt + response as the chat template renders them at inference, or why
    not ('prefix_mismatch', 'empty_response', 'too_long').

    The prompt is rendered with the generation prompt; the whole conversation must start with
    exactly those tokens. The response tokens are what follows, up to and including the first
    stop token (the template's end-of-turn); anything the template adds after it is dropped.
    """
    response = response.strip()
    if not response:
        return "empty_response"
    prefix = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": response}],
                    add_generation_prompt=False)
    if full[:len(prefix)] != prefix:
        return "prefix_mismatch"
    tail = full[len(prefix):]
    cut = next((i for i, t in enumerate(tail) if t in stop_ids), None)
    if cut is not None:
        tail = tail[:cut + 1]
    ids = (prefix + tail)[:max_seq_len]
    if len(ids) <= len(prefix):
        return "too_long"
    return Example(record_id, ids, len(prefix))


def build_examples(cfg: FinetuneConfig, tokenizer, stop_ids: set[int],
                   counts: Counter) -> list[Example]:
    turns = first_turns(cfg.data, tokenizer, cfg.n, cfg.split, cfg.max_prompt_tokens, counts,
                        cfg.max_answer_tokens)
    examples = []
    for t in turns:
        ex = build_example(tokenizer, t.id, t.prompt, t.reference, stop_ids, cfg.max_seq_len)
        if isinstance(ex, str):
            counts[ex] += 1
        else:
            examples.append(ex)
    if turns and counts["prefix_mismatch"] > 0.1 * len(turns):
        raise DataError(
            f"{counts['prefix_mismatch']} of {len(turns)} records render differently with and "
            f"without the generation prompt: the chat template does not put the response right "
            f"after the prompt, so the loss mask would be wrong. Fix the tokenizer's "
            f"chat_template (it must render the generation prompt as the start of the "
            f"assistant turn).")
    if not examples:
        raise DataError(f"no training examples in {cfg.data} (skipped: {dict(counts)}); check "
                        f"--data, --split, --max-prompt-tokens and --max-seq-len")
    return examples


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The global batches of one epoch: a seeded shuffle; with grouping, each run of
    16 batches' worth of examples is sorted by length before it is cut into batches, and the
    batches are shuffled again, so a batch holds similar lengths (little padding)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    mega = batch_size * 16
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, loss_mask, labels): right padded; loss_mask[b, j] marks
    positions j whose logits predict a response token (labels holds those tokens in order)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, :len(e.input_ids)] = 1
        loss_mask[row, e.n_prompt - 1:len(e.input_ids) - 1] = True
    labels = torch.cat([torch.tensor(e.input_ids[e.n_prompt:]) for e in examples])
    return (input_ids.to(device), attention_mask.to(device), loss_mask.to(device),
            labels.to(device))


# ---------------------------------------------------------------------------- losses


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """Logits at the loss positions only: [n_response_tokens, vocab]. The LM head runs on the
    selected hidden states, not the whole sequence (the prompt needs no logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state  # [batch, seq, hidden]
    return base.get_output_embeddings()(hidden[loss_mask])


def kd_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor,
          temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of KL(target_probs || draft_probs) at `temperature`, in fp32.
    draft_logits, target_logits: [n_tokens, vocab]."""
    draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)
    target_logp = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return (target_logp.exp() * (target_logp - draft_logp)).sum()


def accumulate_gradients(model, teacher, shard: list[Example], n_tokens: int,
                         cfg: FinetuneConfig, pad_id: int, device: torch.device) -> torch.Tensor:
    """Backpropagate this process's share of a global batch, micro-batch by micro-batch.

    Each micro-batch adds d(loss_sum / n_tokens), where loss_sum is the sum over its response
    tokens of cross-entropy (+ kd * T^2 * KL(target || draft)) and n_tokens counts the response
    tokens of the whole global batch, so the gradients summed over micro-batches and processes
    are those of the global batch's mean loss. Returns [cross-entropy sum, KL sum] (float64).
    """
    sums = torch.zeros(2, dtype=torch.float64)
    temperature = cfg.kd_temperature
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    for m in range(0, len(shard), cfg.micro_batch_size):
        input_ids, attention_mask, loss_mask, labels = collate(
            shard[m:m + cfg.micro_batch_size], pad_id, device)
        with autocast:
            logits = response_logits(model, input_ids, attention_mask, loss_mask)
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = ce
        if teacher is not None:
            with torch.no_grad(), autocast:
                target_logits = response_logits(teacher, input_ids, attention_mask, loss_mask)
            kl = kd_kl(logits, target_logits, temperature)
            loss = ce + cfg.kd * temperature ** 2 * kl
            sums[1] += kl.item()
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


def ckpt_dir(out: str | Path) -> Path:
    return Path(f"{out}.ckpt")


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".state.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def fingerprint(recipe: dict[str, Any], data_hash: str, draft_hash: str) -> str:
    """What a run trains, by content: the recipe with the draft and data named by their hashes
    (not their paths, so a resume from another directory still matches)."""
    recipe = {k: v for k, v in recipe.items() if k not in ("draft", "data")}
    blob = json.dumps({"recipe": recipe, "data": data_hash, "draft": draft_hash},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["loss"] for c in curve], label="loss")
    if any(c.get("kd") for c in curve):
        ax.plot(steps, [c["ce"] for c in curve], label="cross-entropy", alpha=0.7)
        ax.plot(steps, [c["kd"] for c in curve], label="KL(target || draft)", alpha=0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss per response token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- run


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_teacher(cfg: FinetuneConfig, draft_manifest: dict[str, Any], draft, tokenizer, device):
    name = cfg.target or draft_manifest.get("target")
    if not name:
        raise ValueError("--kd needs a teacher: pass --target (the draft's specdec.json names "
                         "none)")
    teacher, teacher_tok = load_model(name, dtype=torch.float32, device=device)
    if teacher.config.vocab_size != draft.config.vocab_size or \
            teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--kd teacher {name} has a different vocabulary from the draft "
                         f"({teacher.config.vocab_size} vs {draft.config.vocab_size} ids): "
                         f"KD needs the target the draft was cut from")
    teacher.requires_grad_(False)
    return name, teacher.eval()


def run(cfg: FinetuneConfig, console: Console | None = None,
        on_step: Callable[[int, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune `cfg.draft` and write `cfg.out`. Under an initialised torch.distributed group
    each process trains on its share of every global batch (rank 0 writes). `on_step(step,
    record)` is called after every optimizer step (and after that step's checkpoint)."""
    rank, world_size = world()
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    out, ckpt = Path(cfg.out), ckpt_dir(cfg.out)
    draft_path = resolve_model(cfg.draft, console)
    draft_manifest = read_manifest(draft_path)
    data_hash = data_sha256(cfg.data)
    draft_hash = json.dumps(draft_manifest.get("weights_sha256")) \
        if draft_manifest.get("weights_sha256") else str(draft_path.resolve())
    fp = fingerprint(cfg.recipe(), data_hash, draft_hash)

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

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(draft_path, dtype=torch.float32, device=device)
    stop_ids = {t for t in (tokenizer.eos_token_id,) if t is not None}
    gen_eos = model.generation_config.eos_token_id
    stop_ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)

    counts: Counter = Counter()
    examples = build_examples(cfg, tokenizer, stop_ids, counts)
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    teacher_name, teacher = None, None
    if cfg.kd > 0:
        teacher_name, teacher = load_teacher(cfg, draft_manifest, model, tokenizer, device)

    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM"))
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio))

    start_step, curve = 0, []
    if (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        if state["fingerprint"] != fp:
            raise ValueError(f"{ckpt} was made with another recipe or data; rerun with the same "
                             f"arguments to resume, or delete it to start over")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, curve = state["step"], state["curve"]
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank])
        elif rank == 0:
            console.print("[yellow]note:[/yellow] resuming with another number of processes; "
                          "dropout masks will differ from an uninterrupted run")
        if rank == 0:
            console.print(f"finetune: resuming {out} from step {start_step} of {total_steps}")
    else:
        torch.manual_seed(cfg.seed + rank)

    temperature = cfg.kd_temperature
    tokens_seen, t_start = 0, time.perf_counter()
    columns = [TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    epoch_cache: dict[int, list[list[int]]] = {}
    with Progress(*columns, console=console, disable=rank != 0) as progress:
        task = progress.add_task("finetune", total=total_steps, completed=start_step,
                                 loss=f"{curve[-1]['loss']:.4f}" if curve else "-", tps="-")
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch,
                                                    cfg.group_by_length)}
            batch = epoch_cache[epoch][index]
            n_tokens = sum(examples[i].n_response for i in batch)  # global: every rank knows
            shard = sorted(batch[rank::world_size], key=lambda i: -lengths[i])
            sums = accumulate_gradients(model, teacher, [examples[i] for i in shard], n_tokens,
                                        cfg, pad_id, device)
            if world_size > 1:
                sync_gradients(trainable.values(), sums)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            tokens_seen += sum(lengths[i] for i in batch)
            elapsed = time.perf_counter() - t_start
            ce_mean, kl_mean = sums[0].item() / n_tokens, sums[1].item() / n_tokens
            record = {"step": step + 1, "loss": ce_mean + cfg.kd * temperature ** 2 * kl_mean,
                      "ce": ce_mean, "kd": kl_mean if teacher is not None else None,
                      "lr": lr, "response_tokens": n_tokens,
                      "tokens_per_s": round(tokens_seen / elapsed, 2)}
            curve.append(record)
            progress.update(task, advance=1, loss=f"{record['loss']:.4f}",
                            tps=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                rngs = [None] * world_size
                if world_size > 1:
                    dist.all_gather_object(rngs, rng_state())
                else:
                    rngs = [rng_state()]
                if rank == 0:
                    save_training_state(ckpt, {
                        "fingerprint": fp, "step": step + 1, "curve": curve, "rng": rngs,
                        "trainable": {n: p.detach().cpu() for n, p in trainable.items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()})
            if on_step is not None:
                on_step(step + 1, record)

    train_seconds = time.perf_counter() - t_start
    manifest = {
        "stage": "finetune", "parent": str(draft_path),
        "parent_stage": draft_manifest.get("stage"),
        "target": draft_manifest.get("target"), "fingerprint": fp,
        "data": cfg.data, "data_sha256": data_hash, "examples": len(examples),
        "skipped": dict(sorted(counts.items())), "recipe": cfg.recipe(),
        "kd_teacher": teacher_name, "world_size": world_size, "steps": total_steps,
        "resumed_from_step": start_step,
        "train_seconds_this_run": round(train_seconds, 2),
        "tokens_per_s_this_run": round(tokens_seen / train_seconds, 2) if tokens_seen else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
    }
    if rank == 0:
        final = model.merge_and_unload() if cfg.method == "lora" else model
        final.eval()
        save_checkpoint(final, tokenizer, out, manifest)
        write_json_atomic(out / "loss_curve.json", curve)
        plot_curve(curve, out / "loss_curve.png", f"{out.name}: {cfg.method}, data "
                   f"{Path(cfg.data).name}" + (f", kd {cfg.kd}" if cfg.kd else ""))
        shutil.rmtree(ckpt, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
    return FinetuneResult(out, manifest, curve, start_step)


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
