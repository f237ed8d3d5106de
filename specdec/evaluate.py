"""Draft quality as speculative decoding sees it: teacher-forced acceptance against the target.

The target answers the evaluation prompts greedily (MT-Bench by default; with `--turns 2` the
second turn is asked after the target's own first answer, as in EAGLE/Spec-Bench). Every draft
is then run teacher-forced over the same token sequences, once, and compared position by
position with the target (`specdec.acceptance`): top-1 agreement, alpha = sum_x
min(target_probs, draft_probs) at temperature 1, and the exact greedy mean accepted length
(MAL) and per-position acceptance for each k, by prompt category.

On the target's own greedy text the greedy numbers are exact: they are what the engine
measures when it runs the same pair (bench/acceptance.py checks that on a subset).

The target's answers are cached (`$SPECDEC_CACHE/answers/`, keyed by the target's weights,
the prompts and the generation settings), so comparing more drafts later costs only their
forwards.

    python -m specdec.evaluate --target smollm2-135m-instruct \
        --draft pruned=runs/x/pruned --draft sft=runs/x/sft --n 80 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specdec import acceptance
from specdec.data import Record, chat_ids, load_records
from specdec.hub import cache_dir
from specdec.models import (DEFAULT_TARGET, ModelError, load_model, read_manifest,
                            resolve_model, write_json_atomic)

REPORT_KS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass
class Answer:
    """One scored sequence: a prompt (chat-templated) and the target's greedy answer."""

    record_id: str
    category: str
    turn: int
    ids: list[int]  # prompt + answer
    prompt_len: int


@dataclass
class DraftQuality:
    label: str
    path: str
    layers: int
    report: acceptance.AcceptanceReport
    per_category: dict[str, dict[str, float]]  # category -> {"top1", "alpha", "mal@4"}
    per_position: dict[int, list[float]]  # k -> acceptance rate at draft position 1..k

    def row(self) -> dict[str, Any]:
        r = self.report
        return {
            "draft": self.label, "path": self.path, "layers": self.layers,
            "top1_agreement": r.top1_agreement, "alpha": r.alpha, "kl": r.kl,
            "mal": {str(k): v for k, v in r.mean_accepted_length.items()},
            "per_position": {str(k): v for k, v in self.per_position.items()},
            "per_category": self.per_category,
            "target_matches_text": r.target_matches_text,
        }


# ---------------------------------------------------------------------------- target answers


def answers_key(target_path: Path, prompts: str, n: int | None, turns: int, max_new_tokens: int
                ) -> str:
    manifest = read_manifest(target_path)
    weights = manifest.get("weights_sha256") or str(target_path.resolve())
    prompts_id = prompts if not Path(prompts).is_file() else hashlib.sha256(
        Path(prompts).read_bytes()).hexdigest()
    text = json.dumps([weights, prompts_id, n, turns, max_new_tokens], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def target_answers(target, tokenizer, records: Sequence[Record], max_new_tokens: int,
                   turns: int = 1, batch_size: int = 8, console: Console | None = None
                   ) -> list[Answer]:
    """The target's greedy answers, turn by turn, through the engine in target-only mode."""
    from specdec.decode.engine import SpeculativeEngine
    from specdec.decode.sampling import SamplingParams

    engine = SpeculativeEngine(target, None, tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    conversations = [list(r.prompt()) for r in records]
    answers: list[Answer] = []
    with Progress(console=console, transient=True) as bar:
        for turn in range(1, turns + 1):
            todo = [i for i, r in enumerate(records) if turn == 1 or len(r.followups) >= turn - 1]
            task = bar.add_task(f"target answers, turn {turn}", total=len(todo))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                for i in chunk:
                    if turn > 1:
                        conversations[i].append(
                            {"role": "user", "content": records[i].followups[turn - 2]})
                prompts = [chat_ids(tokenizer, conversations[i]) for i in chunk]
                results = engine.generate(prompts, params)
                for i, prompt, res in zip(chunk, prompts, results):
                    text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
                    conversations[i].append({"role": "assistant", "content": text})
                    answers.append(Answer(records[i].id, records[i].category or "all", turn,
                                          prompt + res.token_ids, len(prompt)))
                bar.advance(task, len(chunk))
    return answers


def cached_target_answers(target_name: str, prompts: str = "mt-bench", n: int | None = None,
                          turns: int = 1, max_new_tokens: int = 96, batch_size: int = 8,
                          console: Console | None = None, target=None, tokenizer=None
                          ) -> list[Answer]:
    """`target_answers`, read from the cache when the same target and settings ran before."""
    path = resolve_model(target_name)
    key = answers_key(path, prompts, n, turns, max_new_tokens)
    file = cache_dir() / "answers" / f"{key}.jsonl"
    if file.is_file():
        return [Answer(**json.loads(line)) for line in file.read_text().split("\n") if line]
    if target is None:
        target, tokenizer = load_model(path)
    records = load_records(prompts, n=n)
    answers = target_answers(target, tokenizer, records, max_new_tokens, turns, batch_size,
                             console)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(a)) + "\n" for a in answers))
    tmp.replace(file)
    return answers


# ---------------------------------------------------------------------------- scoring


def per_position_acceptance(agree: Sequence[bool], k: int) -> tuple[list[int], int]:
    """(accepted count at draft position 1..k, steps) of greedy decoding over one sequence."""
    counts, steps, i, n = [0] * k, 0, 0, len(agree)
    while i < n:
        run = 0
        while run < k and i + run < n and agree[i + run]:
            counts[run] += 1
            run += 1
        i += run + 1
        steps += 1
    return counts, steps


def score_drafts(target, drafts: dict[str, Any], answers: Sequence[Answer], batch_size: int = 8,
                 temperature: float = 1.0, ks: Sequence[int] = REPORT_KS,
                 pad_id: int = 0, console: Console | None = None,
                 vocabs: dict[str, Any] | None = None) -> list[DraftQuality]:
    """Teacher-forced quality of each draft (label -> model) on the target's answers.

    The target's forward runs once; each draft's once (labels holding the same model object
    share its forward). vocabs: label -> `specdec.vocab.DraftVocab` for drafts scored with a
    trimmed vocabulary, exactly as the engine drafts with it.
    """
    vocabs = vocabs or {}
    data = acceptance.make_batches([a.ids for a in answers], [a.prompt_len for a in answers],
                                   batch_size, pad_id)
    rows = [i for b in data.batches for i in b.order]  # data order -> answer index
    with Progress(console=console, transient=True) as bar:
        target_hidden = acceptance.scored_hidden(acceptance.model_hidden_fn(target), data, bar,
                                                 "target forward")
        out = []
        hidden_of: dict[int, torch.Tensor] = {}
        for label, draft in drafts.items():
            if id(draft) not in hidden_of:
                hidden_of[id(draft)] = acceptance.scored_hidden(
                    acceptance.model_hidden_fn(draft), data, bar, f"{label} forward")
            hidden = hidden_of[id(draft)]
            vocab = vocabs.get(label)
            head = draft.get_output_embeddings() if vocab is None else vocab.masked_head(draft)
            stats = acceptance.position_stats(target_hidden, target.get_output_embeddings(),
                                              hidden, head, temperature)
            report = acceptance.summarize(stats, data, temperature, ks)
            per_answer, offset = {}, 0
            for i in rows:
                n = data.lengths[i]
                per_answer[i] = (stats.agree[offset:offset + n].tolist(),
                                 stats.alpha[offset:offset + n])
                offset += n
            out.append(DraftQuality(
                label, str(getattr(draft, "name_or_path", "")), draft.config.num_hidden_layers,
                report, _per_category(answers, per_answer), _per_position(per_answer, ks)))
    return out


def _per_position(per_answer, ks) -> dict[int, list[float]]:
    result = {}
    for k in ks:
        counts, steps = [0] * k, 0
        for agree, _ in per_answer.values():
            c, s = per_position_acceptance(agree, k)
            counts = [a + b for a, b in zip(counts, c)]
            steps += s
        result[k] = [c / steps for c in counts]
    return result


def _per_category(answers, per_answer) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        groups.setdefault(a.category, []).append(i)
    out = {}
    for cat, idx in sorted(groups.items()):
        agree = [x for i in idx for x in per_answer[i][0]]
        alpha = torch.cat([per_answer[i][1] for i in idx])
        committed = steps = 0
        for i in idx:
            c, s = acceptance.greedy_accepted_length(per_answer[i][0], 4)
            committed, steps = committed + c, steps + s
        out[cat] = {"top1": sum(agree) / len(agree), "alpha": float(alpha.mean()),
                    "mal@4": committed / steps, "tokens": len(agree)}
    return out


# ---------------------------------------------------------------------------- stage


@dataclass
class EvaluateConfig:
    target: str = DEFAULT_TARGET
    draft: list[str] = field(default_factory=list)  # "label=path" or a path
    prompts: str = "mt-bench"
    n: int | None = None
    turns: int = 1
    max_new_tokens: int = 96
    batch_size: int = 8
    temperature: float = 1.0
    # auto: each draft with the trimmed vocabulary its specdec.json names (if any); full: never
    draft_vocab: str = "auto"
    out: str | None = None  # JSON


def parse_drafts(specs: Sequence[str]) -> dict[str, str]:
    drafts = {}
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        if label in drafts:
            raise ValueError(f"two drafts are labelled {label!r}; name them label=path")
        drafts[label] = path
    if not drafts:
        raise ValueError("no drafts given; pass --draft label=path (one or more)")
    return drafts


def run(cfg: EvaluateConfig, console: Console | None = None) -> list[DraftQuality]:
    console = console or Console()
    drafts = parse_drafts(cfg.draft)
    if cfg.turns not in (1, 2):
        raise ValueError(f"turns must be 1 or 2, got {cfg.turns}")
    paths = {label: resolve_model(p) for label, p in drafts.items()}  # fail before any work
    target, tokenizer = load_model(cfg.target)
    answers = cached_target_answers(cfg.target, cfg.prompts, cfg.n, cfg.turns,
                                    cfg.max_new_tokens, cfg.batch_size, console, target, tokenizer)
    if cfg.draft_vocab not in ("auto", "full"):
        raise ValueError(f"--draft-vocab must be auto or full, got {cfg.draft_vocab!r}")
    models = {label: load_model(path)[0] for label, path in paths.items()}
    vocabs = {}
    if cfg.draft_vocab == "auto":
        from specdec.vocab import load_draft_vocab

        vocab_size = target.get_output_embeddings().weight.shape[0]
        vocabs = {label: v for label, path in paths.items()
                  if (v := load_draft_vocab(path, vocab_size)) is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = score_drafts(target, models, answers, cfg.batch_size, cfg.temperature,
                           pad_id=pad, console=console, vocabs=vocabs)
    for q in results:
        q.path = str(paths[q.label])
    console.print(quality_table(results, f"teacher-forced vs {cfg.target} on {cfg.prompts} "
                                         f"({len(answers)} answers, {cfg.max_new_tokens} tokens)"))
    if cfg.out:
        write_json_atomic(cfg.out, {"config": asdict(cfg), "drafts": [q.row() for q in results]})
    return results


def quality_table(results: Sequence[DraftQuality], title: str, ks=(1, 2, 4, 8)) -> Table:
    table = Table(title=title)
    for col in ["draft", "layers", "top-1 agreement", "alpha (T=1)"] + [f"MAL k={k}" for k in ks]:
        table.add_column(col, justify="right" if col != "draft" else "left")
    for q in results:
        r = q.report
        table.add_row(q.label, str(q.layers), f"{r.top1_agreement:.3f}", f"{r.alpha:.3f}",
                      *[f"{r.mean_accepted_length[k]:.2f}" for k in ks])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.evaluate",
                                     description=__doc__.split("\n")[0])
    for f in fields(EvaluateConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "draft":
            parser.add_argument(flag, action="append", default=[], help="label=path (repeat)")
        elif f.name == "n":
            parser.add_argument(flag, type=int, default=None, help="first n prompts")
        elif f.name == "out":
            parser.add_argument(flag, default=None, help="write the results as JSON")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    console = Console()
    try:
        run(EvaluateConfig(**vars(args)), console)
    except (ValueError, ModelError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
