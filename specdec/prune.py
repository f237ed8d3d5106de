"""Layer-block pruning: score blocks, pick one, write the pruned draft as a plain HF checkpoint.

    python -m specdec.prune --target smollm2-135m-instruct --drop 6 --select acceptance \
        --out runs/x/pruned
    python -m specdec.prune --target smollm2-135m-instruct --keep 12 --out runs/x/deep
    python -m specdec.prune --target smollm2-135m-instruct --block-sizes 1-15 --out runs/x/table

1. Angular distance (Gromov et al. 2024, the rule of arXiv 2410.09982): d(l, n) =
   arccos(cos(h_l, h_{l+n})) / pi between the hidden state entering layer l and the one entering
   layer l+n (h_N is the last layer's output before the final norm), averaged over calibration
   samples: the paper's last-token form (one vector per sample, the last token) and an
   all-token form (every real token). Calibration: ShareGPT train conversations, chat-templated
   with the target's template, truncated to --max-len tokens.
2. Acceptance-aware selection: candidate blocks of size n are the --candidates best by
   last-token angular distance plus the blocks ending at the last layer and just before it. Each
   is scored against the target by teacher-forced top-1 agreement, alpha = sum_x min(target_probs,
   draft_probs) at --temperature, and greedy mean accepted length (specdec.acceptance), on
   held-out text: prompts of the ShareGPT test split, continued greedily by the target itself
   for --gen-len tokens (so greedy MAL is exact), scoring the continuation only. A candidate's
   draft output is computed exactly and cheaply: the hidden state entering layer l is shared
   with the target, so only layers l+n.. run per candidate.
   --select angular picks the smallest last-token d(l, n); --select acceptance the highest top-1
   agreement (alpha breaks ties). Both picks and every candidate's scores are always reported.
3. The draft: the chosen layers removed (the rest renumbered, self_attn.layer_idx included),
   config updated, tied embeddings kept tied, the target's tokenizer files copied byte for byte,
   plus specdec.json, angular_distance.json and angular_distance.png, in one atomic write.
Without --drop/--keep only the table and heatmap are written. The table, the held-out text and
finished candidate scores are cached under $SPECDEC_CACHE/prune (a rerun or an interrupted run
resumes; --no-cache turns it off).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from specdec import acceptance
from specdec.models import DEFAULT_TARGET, MANIFEST, write_json_atomic

SUPPORTED_MODEL_TYPES = ("llama",)
SELECT_RULES = ("angular", "acceptance")
NOT_TOKENIZER = {"config.json", "generation_config.json", MANIFEST, "angular_distance.json",
                 "angular_distance.png"}


@dataclass
class PruneConfig:
    target: str = DEFAULT_TARGET
    out: str = ""
    drop: int | None = None  # layers to remove
    keep: int | None = None  # or: layers to keep
    start: int | None = None  # force the block start (skips selection, still scores it)
    select: str = "acceptance"
    block_sizes: str = ""  # "1-15" or "1,2,6"; default 1..N-1
    forbid_last: bool = False  # never remove the last layer
    candidates: int = 4  # best blocks by angular distance to score by acceptance
    calib_source: str = "sharegpt"
    calib_split: str = "train"
    calib_n: int = 128
    max_len: int = 256
    heldout_source: str = "sharegpt"
    heldout_split: str = "test"
    heldout_n: int = 24
    gen_len: int = 64
    temperature: float = 1.0
    batch_size: int = 8
    device: str = "cpu"
    no_cache: bool = False


@dataclass
class Candidate:
    start: int
    size: int
    angular_last: float
    angular_all: float
    scores: dict[str, Any] = field(default_factory=dict)  # AcceptanceReport.to_json()

    @property
    def removed(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


@dataclass
class PruneResult:
    out: Path
    table: dict[str, Any]
    candidates: list[Candidate]
    picks: dict[str, int]  # rule -> block start
    removed: list[int]


# ------------------------------------------------------------------------------- validation


def parse_sizes(text: str, num_layers: int) -> list[int]:
    if not text:
        return list(range(1, num_layers))
    sizes: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            sizes.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--block-sizes {text!r}: use a range like 1-15 or a list like "
                             "1,2,6") from None
    bad = sorted(n for n in sizes if not 1 <= n < num_layers)
    if bad:
        raise ValueError(f"--block-sizes {bad} out of range: block sizes must be in "
                         f"1..{num_layers - 1} for a {num_layers}-layer target")
    return sorted(sizes)


def validate(cfg: PruneConfig, config) -> int | None:
    """Check every argument against the target's config before any work; the block size or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"target {cfg.target} is a {model_type!r} model; pruning supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (the Llama family)")
    n_layers = config.num_hidden_layers
    if not cfg.out:
        raise ValueError("--out is required: the folder for the pruned checkpoint (or the table)")
    if cfg.select not in SELECT_RULES:
        raise ValueError(f"--select must be one of {', '.join(SELECT_RULES)}, got {cfg.select!r}")
    if cfg.drop is not None and cfg.keep is not None:
        raise ValueError("give --drop or --keep, not both")
    for name in ("calib_n", "max_len", "heldout_n", "gen_len", "batch_size", "candidates"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {cfg.temperature}")
    parse_sizes(cfg.block_sizes, n_layers)
    from specdec.data import BUILTIN

    for flag, source, split in (("calib", cfg.calib_source, cfg.calib_split),
                                ("heldout", cfg.heldout_source, cfg.heldout_split)):
        if source not in BUILTIN and not Path(source).is_file():
            raise ValueError(f"--{flag}-source {source!r} is neither a built-in source "
                             f"({', '.join(BUILTIN)}) nor an existing .json/.jsonl file")
        if split not in ("all", "train", "test"):
            raise ValueError(f"--{flag}-split must be all, train or test, got {split!r}")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    size = None
    if cfg.drop is not None:
        if not 1 <= cfg.drop < n_layers:
            raise ValueError(f"--drop {cfg.drop} must be in 1..{n_layers - 1}: the target has "
                             f"{n_layers} layers and a draft keeps at least one")
        size = cfg.drop
    elif cfg.keep is not None:
        if not 1 <= cfg.keep < n_layers:
            raise ValueError(f"--keep {cfg.keep} must be in 1..{n_layers - 1} (the target has "
                             f"{n_layers} layers)")
        size = n_layers - cfg.keep
    if cfg.start is not None:
        if size is None:
            raise ValueError("--start needs --drop or --keep (the block size)")
        if not 0 <= cfg.start <= n_layers - size:
            raise ValueError(f"--start {cfg.start} with a block of {size} layers must be in "
                             f"0..{n_layers - size}")
        if cfg.forbid_last and cfg.start + size == n_layers:
            raise ValueError(f"block {cfg.start}..{n_layers - 1} removes the last layer, which "
                             f"--forbid-last forbids; use --start <= {n_layers - size - 1}")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        manifest = out / MANIFEST
        stage = json.loads(manifest.read_text()).get("stage") if manifest.is_file() else None
        if stage != "prune" and not (out / "angular_distance.json").is_file():
            raise ValueError(f"--out {out} exists and was not written by specdec.prune; pick a "
                             "new folder (nothing there is overwritten)")
    return size


# ------------------------------------------------------------------------ model surgery


def remove_layers(model, removed: list[int]):
    """Remove decoder layers in place and renumber the rest; returns the model."""
    n = model.config.num_hidden_layers
    if not removed or len(set(removed)) == n or any(not 0 <= i < n for i in removed):
        raise ValueError(f"removed layers {removed} must be a non-empty proper subset of "
                         f"0..{n - 1}")
    decoder = model.get_decoder()
    kept = [layer for i, layer in enumerate(decoder.layers) if i not in set(removed)]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    decoder.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types)
                                    if i not in set(removed)]
    return model


@torch.no_grad()
def all_hidden(model, input_ids, attention_mask) -> list[torch.Tensor]:
    """Hidden states entering layers 0..N-1 and the last layer's output before the final norm."""
    decoder = model.get_decoder()
    captured: dict[str, torch.Tensor] = {}
    hook = decoder.norm.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    return list(out.hidden_states[:-1]) + [captured["x"]]


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def angular_table(model, sequences: list[list[int]], sizes: list[int], batch_size: int = 8,
                  progress: Progress | None = None) -> dict[str, Any]:
    """d(l, n) for every n in sizes and l in 0..N-n, last-token and all-token forms."""
    n_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    data = acceptance.make_batches(sequences, None, batch_size)
    sums = {form: {n: torch.zeros(n_layers + 1 - n, dtype=torch.float64) for n in sizes}
            for form in ("last_token", "all_token")}
    counts = {"last_token": 0, "all_token": 0}
    task = progress.add_task("angular distances", total=len(data.batches)) if progress else None
    for batch in data.batches:
        mask = batch.attention_mask.to(device).bool()  # [b, L]
        hidden = all_hidden(model, batch.input_ids.to(device), mask.long())
        unit = torch.nn.functional.normalize(torch.stack(hidden).float(), dim=-1)  # [N+1, b, L, d]
        b, length = mask.shape
        vecs = unit.permute(1, 2, 0, 3).reshape(b * length, n_layers + 1, -1)
        gram = (vecs @ vecs.transpose(1, 2)).clamp(-1.0, 1.0)  # [b*L, N+1, N+1]
        last = (mask.sum(1) - 1) + torch.arange(b, device=device) * length
        flat_mask = mask.reshape(-1)
        for n in sizes:
            ang = torch.arccos(torch.diagonal(gram, offset=n, dim1=1, dim2=2)) / math.pi
            sums["all_token"][n] += ang[flat_mask].double().sum(0).cpu()
            sums["last_token"][n] += ang[last].double().sum(0).cpu()
        counts["all_token"] += int(flat_mask.sum())
        counts["last_token"] += b
        if progress is not None:
            progress.advance(task)
    table = {"num_layers": n_layers, "block_sizes": sizes, "samples": counts["last_token"],
             "tokens": counts["all_token"]}
    for form, per_n in sums.items():
        table[form] = {str(n): (s / counts[form]).tolist() for n, s in per_n.items()}
    return table


def subset_table(table: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    out = {k: v for k, v in table.items() if k not in ("last_token", "all_token", "block_sizes")}
    out["block_sizes"] = sizes
    for form in ("last_token", "all_token"):
        out[form] = {str(n): table[form][str(n)] for n in sizes}
    return out


def candidate_blocks(table: dict[str, Any], size: int, top: int, forbid_last: bool,
                     start: int | None = None) -> list[Candidate]:
    """The `top` blocks by last-token distance, plus the deepest blocks, plus a forced start."""
    n_layers = table["num_layers"]
    last, every = table["last_token"][str(size)], table["all_token"][str(size)]
    allowed = [l for l in range(n_layers - size + 1) if not (forbid_last and l + size == n_layers)]
    ranked = sorted(allowed, key=lambda l: last[l])
    starts = ranked[:top] + [l for l in (n_layers - size, n_layers - size - 1) if l in allowed]
    if start is not None:
        starts.insert(0, start)
    unique = list(dict.fromkeys(starts))
    return [Candidate(l, size, last[l], every[l]) for l in unique]


def score_candidates(model, data: acceptance.TeacherForcedData, candidates: list[Candidate],
                     temperature: float, progress: Progress | None = None,
                     on_scored=None) -> None:
    """Teacher-forced acceptance of each unscored candidate's draft (fills `scores` in place)."""
    todo = [c for c in candidates if not c.scores]

    def done(index: int, report: acceptance.AcceptanceReport) -> None:
        todo[index].scores = report.to_json()
        if on_scored is not None:
            on_scored(todo[index])

    acceptance.score_layer_skips(model, data, [(c.start, c.size) for c in todo], temperature,
                                 progress=progress, on_scored=done)


def pick(candidates: list[Candidate], rule: str) -> Candidate:
    if rule == "angular":
        return min(candidates, key=lambda c: c.angular_last)
    return max(candidates, key=lambda c: (c.scores["top1_agreement"], c.scores["alpha"]))


# ------------------------------------------------------------------------------ data


def calibration_ids(tokenizer, cfg: PruneConfig) -> list[list[int]]:
    from specdec.data import chat_ids, load_records

    records = load_records(cfg.calib_source, split=cfg.calib_split, n=cfg.calib_n)
    seqs = [chat_ids(tokenizer, r.messages, add_generation_prompt=False)[:cfg.max_len]
            for r in records]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError(f"no usable calibration records in {cfg.calib_source} "
                         f"(split {cfg.calib_split}); pass --calib-source with chat records")
    return seqs


@torch.no_grad()
def heldout_sequences(model, tokenizer, cfg: PruneConfig, progress: Progress | None = None
                      ) -> tuple[list[list[int]], list[int]]:
    """Held-out prompts continued greedily by the target: (sequences, prompt lengths)."""
    from specdec.data import chat_ids, load_records

    prompts = []
    for r in load_records(cfg.heldout_source, split=cfg.heldout_split, n=cfg.heldout_n * 4):
        ids = chat_ids(tokenizer, r.prompt(), add_generation_prompt=True)
        if len(ids) <= cfg.max_len:
            prompts.append(ids)
        if len(prompts) == cfg.heldout_n:
            break
    if not prompts:
        raise ValueError(f"no held-out prompts of at most {cfg.max_len} tokens in "
                         f"{cfg.heldout_source} (split {cfg.heldout_split}); raise --max-len")
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    seqs = acceptance.greedy_continuations(model, prompts, cfg.gen_len, eos, tokenizer.pad_token_id,
                                           cfg.batch_size, progress)
    return seqs, [len(p) for p in prompts]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def target_identity(path: Path) -> Any:
    manifest = path / MANIFEST
    if manifest.is_file():
        weights = json.loads(manifest.read_text()).get("weights_sha256")
        if weights:
            return weights
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(path.glob("*.safetensors"))]


# ------------------------------------------------------------------------------ output


class _TokenizerFiles:
    """Stands in for the tokenizer in save_checkpoint: copies the target's tokenizer files byte
    for byte and adds the score files, so all of it lands in the one atomic rename."""

    def __init__(self, source: Path, extra: dict[str, Path]):
        self.source, self.extra = source, extra

    def save_pretrained(self, directory) -> None:
        for f in sorted(self.source.iterdir()):
            if f.is_file() and f.name not in NOT_TOKENIZER and not f.name.startswith(".") \
                    and f.suffix not in (".safetensors", ".bin", ".pt", ".gguf") \
                    and not f.name.endswith(".index.json"):
                shutil.copyfile(f, Path(directory) / f.name)
        for name, path in self.extra.items():
            shutil.copyfile(path, Path(directory) / name)


def heatmap(table: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers, sizes = table["num_layers"], table["block_sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(sizes) + 2.5), constrained_layout=True)
    for ax, form in zip(axes, ("last_token", "all_token")):
        grid = np.full((len(sizes), n_layers), np.nan)
        for row, n in enumerate(sizes):
            values = table[form][str(n)]
            grid[row, :len(values)] = values
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis_r")
        ax.set_yticks(range(len(sizes)), [str(n) for n in sizes])
        ax.set_xlabel("first removed layer l")
        ax.set_ylabel("block size n")
        ax.set_title(f"{form.replace('_', '-')} d(l, n)")
        fig.colorbar(im, ax=ax, label="angular distance / pi")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_candidates(console: Console, candidates: list[Candidate], picks: dict[str, int]) -> None:
    table = Table(title="candidate blocks, teacher-forced against the target",
                  caption="d: angular distance; MAL4: greedy tokens per target forward at k=4; "
                          "tgt=txt: target argmax == text")
    for col in ("removed", "d last", "d all", "top1", "alpha", "MAL4", "tgt=txt", "pick"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in candidates:
        s = c.scores
        marks = "+".join(rule[:3] for rule, start in picks.items() if start == c.start)
        table.add_row(f"{c.start}..{c.start + c.size - 1}", f"{c.angular_last:.4f}",
                      f"{c.angular_all:.4f}", f"{s['top1_agreement']:.4f}", f"{s['alpha']:.4f}",
                      f"{s['mean_accepted_length'].get('4', float('nan')):.3f}",
                      f"{s['target_matches_text']:.3f}", marks)
    console.print(table)


# --------------------------------------------------------------------------------- run


def run(cfg: PruneConfig, console: Console | None = None) -> PruneResult:
    from specdec.models import load_config, load_model, resolve_model, save_checkpoint

    console = console or Console(stderr=True)
    target_config = load_config(cfg.target)
    size = validate(cfg, target_config)  # every argument checked before any work
    n_layers = target_config.num_hidden_layers
    sizes = sorted(set(parse_sizes(cfg.block_sizes, n_layers)) | ({size} if size else set()))
    target_path = resolve_model(cfg.target, console)
    model, tokenizer = load_model(target_path, device=cfg.device)
    key = _sha([target_identity(target_path), cfg.calib_source, cfg.calib_split, cfg.calib_n,
                cfg.max_len, str(model.dtype)])
    cache = None if cfg.no_cache else _cache_dir() / key
    with Progress(console=console, transient=True) as progress:
        full = _cached(cache, "table.json", lambda: _table_with_hash(  # all n: ~free
            model, tokenizer, cfg, list(range(1, n_layers)), progress))
        table = subset_table(full, sizes)
        candidates, picks, data_info = [], {}, {}
        if size is not None:
            candidates, data_info = _scored_candidates(model, tokenizer, cfg, table, size, key,
                                                       cache, progress)
            picks = {rule: pick(candidates, rule).start for rule in SELECT_RULES}
    chosen = cfg.start if cfg.start is not None else picks.get(cfg.select)
    out = Path(cfg.out)
    manifest = {
        "stage": "prune", "parent": str(target_path), "target": cfg.target,
        "target_weights": target_identity(target_path), "config": asdict(cfg),
        "calibration": {"source": cfg.calib_source, "split": cfg.calib_split,
                        "samples": table["samples"], "tokens": table["tokens"],
                        "max_len": cfg.max_len, "sha256": table["calibration_sha256"]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        table_file, png = Path(tmp) / "angular_distance.json", Path(tmp) / "angular_distance.png"
        write_json_atomic(table_file, table)
        heatmap(table, png, f"{cfg.target}: angular distance of layer blocks")
        if size is None:
            out.mkdir(parents=True, exist_ok=True)
            for f in (table_file, png):
                shutil.copyfile(f, out / f.name)
            console.print(f"angular distance table and heatmap written to {out}")
            return PruneResult(out, table, [], {}, [])
        _print_candidates(console, candidates, picks)
        removed = list(range(chosen, chosen + size))
        manifest.update({
            "removed_layers": removed, "block": {"start": chosen, "size": size},
            "select": "manual" if cfg.start is not None else cfg.select, "picks": picks,
            "heldout": data_info,
            "candidates": [{"start": c.start, "size": c.size, "removed": c.removed,
                            "angular_last": c.angular_last, "angular_all": c.angular_all,
                            **c.scores} for c in candidates],
        })
        remove_layers(model, removed)
        model.config.name_or_path = str(out)
        files = _TokenizerFiles(target_path, {f.name: f for f in (table_file, png)})
        save_checkpoint(model, files, out, manifest)
    console.print(f"removed layers {removed[0]}..{removed[-1]} ({manifest['select']}): "
                  f"{n_layers} -> {n_layers - size} layers, written to {out}")
    return PruneResult(out, table, candidates, picks, removed)


def _scored_candidates(model, tokenizer, cfg: PruneConfig, table: dict[str, Any], size: int,
                       key: str, cache: Path | None, progress: Progress
                       ) -> tuple[list[Candidate], dict[str, Any]]:
    """Candidates for this block size scored on held-out text; finished scores are cached."""
    hkey = _sha([key, cfg.heldout_source, cfg.heldout_split, cfg.heldout_n, cfg.gen_len])
    held = _cached(cache, f"heldout-{hkey[:16]}.json", lambda: dict(zip(
        ("sequences", "prompt_lens"), heldout_sequences(model, tokenizer, cfg, progress))))
    data = acceptance.make_batches(held["sequences"], held["prompt_lens"], cfg.batch_size,
                                   tokenizer.pad_token_id or 0)
    candidates = candidate_blocks(table, size, cfg.candidates, cfg.forbid_last, cfg.start)
    score_file = cache / f"scores-{_sha([hkey, cfg.temperature])[:16]}.json" if cache else None
    done = json.loads(score_file.read_text()) if score_file and score_file.is_file() else {}
    for c in candidates:
        c.scores = done.get(f"{c.start},{c.size}", {})

    def save_score(c: Candidate) -> None:
        if score_file is not None:
            done[f"{c.start},{c.size}"] = c.scores
            write_json_atomic(score_file, done)

    score_candidates(model, data, candidates, cfg.temperature, progress, save_score)
    info = {"source": cfg.heldout_source, "split": cfg.heldout_split,
            "sequences": len(held["sequences"]), "scored_tokens": data.num_scored,
            "gen_len": cfg.gen_len, "sha256": _sha(held),
            "text": "target's own greedy continuations of the prompts (greedy MAL exact)"}
    return candidates, info


def _table_with_hash(model, tokenizer, cfg, sizes, progress) -> dict[str, Any]:
    seqs = calibration_ids(tokenizer, cfg)
    table = angular_table(model, seqs, sizes, cfg.batch_size, progress)
    table["calibration_sha256"] = _sha(seqs)
    return table


def _cache_dir() -> Path:
    from specdec.hub import cache_dir

    return cache_dir() / "prune"


def _cached(cache: Path | None, name: str, make):
    if cache is not None and (cache / name).is_file():
        return json.loads((cache / name).read_text())
    value = make()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache / name, value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.prune",
                                     description="Prune a block of decoder layers into a draft.")
    defaults = PruneConfig()
    for f in fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = {"drop": int, "keep": int, "start": int}.get(f.name, type(value))
            parser.add_argument(flag, type=kind, default=value, required=f.name == "out",
                                help=f"default: {value}" if value not in (None, "") else None)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        run(PruneConfig(**vars(args)), console)
    except (ValueError, RuntimeError) as exc:  # DataError is a ValueError, ModelError Runtime
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
