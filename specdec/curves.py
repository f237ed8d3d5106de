"""Learning curves: draft quality as speculative decoding sees it, measured during healing.

    python -m specdec.finetune ... --eval-every 8 --eval-n 40     # quality in loss_curve.json
    python -m specdec.curves runs/x/keep12/sft runs/x/keep12/sd --out docs/results/curve.png

`QualityProbe` scores the draft being trained, teacher-forced on the target's cached greedy
answers to the first ``eval_n`` MT-Bench first turns (`specdec.evaluate`: the same numbers
`python -m specdec.evaluate` prints, exact greedy MAL), every ``eval_every`` optimizer steps and
after the last one. The target's hidden states are computed once, when the probe is built, so
each probe costs one draft forward over the answers (seconds for SmolLM2). The finetune records
the scores in its loss curve (``eval``: top-1 agreement, alpha, MAL k=1..8) against the
training tokens seen, and ``python -m specdec.curves`` plots several runs on one figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from specdec import acceptance

PROBE_KS = (1, 2, 4, 8)


class QualityProbe:
    """Teacher-forced quality of a (training) draft against its target on fixed answers."""

    def __init__(self, target, answers, pad_id: int = 0, batch_size: int = 8):
        """target: the model; answers: `specdec.evaluate.Answer`s (prompt + greedy answer)."""
        self.data = acceptance.make_batches([a.ids for a in answers],
                                            [a.prompt_len for a in answers], batch_size, pad_id)
        self.target_hidden = acceptance.scored_hidden(acceptance.model_hidden_fn(target), self.data)
        self.target_head = target.get_output_embeddings()
        self.answers = len(answers)

    @classmethod
    def for_target(cls, target_name: str, n: int = 40, max_new_tokens: int = 64,
                   batch_size: int = 8, console=None) -> QualityProbe:
        """The probe on the target's cached greedy answers to the first n MT-Bench turns."""
        from specdec.evaluate import cached_target_answers
        from specdec.models import load_model

        target, tokenizer = load_model(target_name)
        answers = cached_target_answers(target_name, "mt-bench", n, 1, max_new_tokens,
                                        batch_size, console, target, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(target, answers, pad, batch_size)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, Any]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = base.training
        base.eval()
        try:
            hidden = acceptance.scored_hidden(acceptance.model_hidden_fn(base), self.data)
            stats = acceptance.position_stats(self.target_hidden, self.target_head, hidden,
                                              base.get_output_embeddings(), 1.0)
            report = acceptance.summarize(stats, self.data, 1.0, PROBE_KS)
        finally:
            base.train(was_training)
        return {"top1": round(report.top1_agreement, 5), "alpha": round(report.alpha, 5),
                "mal": {str(k): round(v, 4) for k, v in report.mean_accepted_length.items()},
                "answers": self.answers, "tokens": report.tokens}


def read_curve(run: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(label, the loss-curve records that carry an ``eval``) of a finetune output dir."""
    run = Path(run)
    file = run / "loss_curve.json"
    if not file.is_file():
        raise ValueError(f"{file} does not exist; give finetune output dirs (trained with "
                         "--eval-every for a learning curve)")
    from specdec.models import read_manifest

    curve = json.loads(file.read_text())
    points = [r for r in curve if r.get("eval")]
    before = read_manifest(run).get("eval_before")
    if before and points:  # the draft as it was before training, at 0 tokens
        points.insert(0, {"step": 0, "train_tokens": 0, "eval": before})
    return run.name, points


def plot(runs: list[str], out: str | Path, title: str = "") -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    table = {}
    for run in runs:
        label, points = read_curve(run)
        if not points:
            raise ValueError(f"{run}: its loss curve has no quality probes (train with --eval-every)")
        x = [p["train_tokens"] / 1e3 for p in points]
        ax1.plot(x, [p["eval"]["mal"]["4"] for p in points], marker="o", label=label)
        ax2.plot(x, [p["eval"]["top1"] for p in points], marker="o", label=label)
        table[label] = [{"step": p["step"], "train_tokens": p["train_tokens"],
                         "mal4": p["eval"]["mal"]["4"], "top1": p["eval"]["top1"]} for p in points]
    ax1.set_xlabel("training tokens (thousands)")
    ax1.set_ylabel("MAL k=4 (MT-Bench, teacher-forced)")
    ax2.set_xlabel("training tokens (thousands)")
    ax2.set_ylabel("top-1 agreement")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.curves",
                                     description="Plot finetune runs' quality against training tokens.")
    parser.add_argument("runs", nargs="+", help="finetune output dirs")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        table = plot(args.runs, args.out, args.title)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for label, points in table.items():
        last = points[-1]
        print(f"{label}: {len(points)} probes, last at {last['train_tokens']} tokens: "
              f"MAL k=4 {last['mal4']:.3f}, top-1 {last['top1']:.3f}")
    print(json.dumps({"curves": table, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
