"""SLERP merge of two drafts of the same shape (as arXiv 2410.09982 merges self-distilled models).

    python -m specdec.merge --a runs/x/sd-sharegpt --b runs/x/sd-alpaca --t 0.5 \
        --out runs/x/merged

Per tensor, flattened, in fp32: with a, b the two tensors and theta the angle between them,
    slerp(a, b, t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
so t = 0 gives a and t = 1 gives b exactly. Near-parallel tensors (|cos theta| > 1 - --eps, where
sin(theta) is ill-conditioned) and zero tensors fall back to linear interpolation
(1 - t) a + t b. The result keeps a's dtype.

Both drafts must share the architecture, every shape-relevant config field and the tokenizer
vocabulary; a mismatch fails with a message naming the field before anything is written. The
output is a plain checkpoint dir (a's config and tokenizer) plus specdec.json, written
atomically.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specdec.cli import config_from_args, config_parser
from specdec.models import ModelError, load_model, read_manifest, resolve_model, save_checkpoint

# Config fields that must agree for two checkpoints to be merged tensor by tensor.
SHAPE_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "tie_word_embeddings")


class MergeError(ValueError):
    """Two checkpoints that cannot be merged; the message names what differs."""


@dataclass
class MergeConfig:
    a: str = field(metadata={"help": "first draft (t = 0): checkpoint dir or registry name"})
    b: str = field(metadata={"help": "second draft (t = 1)"})
    out: str = field(metadata={"help": "output checkpoint dir"})
    t: float = field(default=0.5, metadata={"help": "interpolation factor in [0, 1]"})
    eps: float = field(default=1e-6, metadata={
        "help": "linear interpolation when |cos(angle)| > 1 - eps"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"--t must lie in [0, 1], got {self.t}")


@dataclass
class MergeResult:
    out: Path
    tensors: int
    linear_fallback: list[str]  # tensors merged linearly (near-parallel or zero)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6
          ) -> tuple[torch.Tensor, bool]:
    """(SLERP of a and b at t, whether it fell back to linear interpolation).

    a, b: tensors of the same shape (any dtype; the math is in fp32 on the flattened tensors).
    The result has a's shape and dtype.
    """
    if a.shape != b.shape:
        raise MergeError(f"cannot merge tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    v0, v1 = a.detach().flatten().float(), b.detach().flatten().float()
    n0, n1 = v0.norm(), v1.norm()
    linear = bool(n0 == 0 or n1 == 0)
    if not linear:
        cos = torch.clamp(torch.dot(v0 / n0, v1 / n1), -1.0, 1.0)
        linear = bool(cos.abs() > 1 - eps)
    if linear:
        merged = (1 - t) * v0 + t * v1
    else:
        theta = torch.arccos(cos)
        sin_theta = torch.sin(theta)
        merged = (torch.sin((1 - t) * theta) / sin_theta) * v0 \
            + (torch.sin(t * theta) / sin_theta) * v1
    if t == 0.0:
        merged = v0
    elif t == 1.0:
        merged = v1
    return merged.reshape(a.shape).to(a.dtype), linear


def check_compatible(config_a, config_b, tokenizer_a, tokenizer_b, name_a: str, name_b: str
                     ) -> None:
    """Raise MergeError naming the first config field or vocabulary difference."""
    da, db = config_a.to_dict(), config_b.to_dict()
    for key in SHAPE_FIELDS:
        if da.get(key) != db.get(key):
            raise MergeError(f"{name_a} and {name_b} differ in {key} ({da.get(key)} vs "
                             f"{db.get(key)}): SLERP needs two drafts of the same shape (e.g. "
                             f"two fine-tunes of one pruned draft)")
    if (tokenizer_a is None) != (tokenizer_b is None):
        raise MergeError(f"only one of {name_a}, {name_b} has tokenizer files")
    if tokenizer_a is not None and tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise MergeError(f"{name_a} and {name_b} have different tokenizer vocabularies: "
                         f"merged weights would map ids to the wrong tokens")


def _load(name: str):
    path = resolve_model(name)
    model, tokenizer = load_model(path, dtype=torch.float32)  # one load: seconds at vocab 128k
    has_tokenizer = any((path / f).is_file() for f in
                        ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return path, model, tokenizer if has_tokenizer else None


def run(cfg: MergeConfig, console: Console | None = None) -> MergeResult:
    console = console or Console(stderr=True)
    path_a, model_a, tok_a = _load(cfg.a)
    path_b, model_b, tok_b = _load(cfg.b)
    check_compatible(model_a.config, model_b.config, tok_a, tok_b, cfg.a, cfg.b)
    params_b = dict(model_b.named_parameters())
    params_a = dict(model_a.named_parameters())
    if params_a.keys() != params_b.keys():
        only = sorted(params_a.keys() ^ params_b.keys())[:4]
        raise MergeError(f"{cfg.a} and {cfg.b} have different tensors (e.g. {only})")
    for name, p in params_a.items():
        if p.shape != params_b[name].shape:
            raise MergeError(f"{name} has shape {tuple(p.shape)} in {cfg.a} but "
                             f"{tuple(params_b[name].shape)} in {cfg.b}")
    linear = []
    with torch.no_grad(), Progress(console=console, transient=True) as progress:
        task = progress.add_task("slerp", total=len(params_a))
        for name, p in params_a.items():
            merged, fell_back = slerp(p, params_b[name], cfg.t, cfg.eps)
            p.copy_(merged)
            if fell_back:
                linear.append(name)
            progress.advance(task)
    manifest_a, manifest_b = read_manifest(path_a), read_manifest(path_b)
    manifest: dict[str, Any] = {
        "stage": "merge", "method": "slerp", "t": cfg.t, "eps": cfg.eps,
        "parent": str(path_a), "parents": [str(path_a), str(path_b)],
        "parent_weights_sha256": [manifest_a.get("weights_sha256"),
                                  manifest_b.get("weights_sha256")],
        "target": manifest_a.get("target") or manifest_b.get("target"),
        "tensors": len(params_a), "linear_fallback": linear,
    }
    out = save_checkpoint(model_a, tok_a, cfg.out, manifest)
    return MergeResult(out, len(params_a), linear)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(MergeConfig, "python -m specdec.merge",
                           "SLERP merge of two drafts of the same shape.")
    cfg = config_from_args(MergeConfig, parser.parse_args(argv))
    console = Console()
    try:
        result = run(cfg, console)
    except (MergeError, ModelError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    table = Table(title=f"merge: {result.out}", show_header=False)
    table.add_row("a (t = 0)", cfg.a)
    table.add_row("b (t = 1)", cfg.b)
    table.add_row("t", str(cfg.t))
    table.add_row("tensors", str(result.tensors))
    table.add_row("linear fallback", str(len(result.linear_fallback)))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
