"""Cache the target's top-k log-probs on every response token of a data file, once, so that KD
epochs do not run the target.

    python -m specdec.logit_cache --target smollm2-135m-instruct \
        --data runs/x/distilled.jsonl --top-k 32 --out runs/x/distilled.logits
    python -m specdec.finetune --draft runs/x/pruned --data runs/x/distilled.jsonl \
        --kd 0.5 --kd-cache runs/x/distilled.logits --out runs/x/sd-kd

The examples are built exactly as `specdec.finetune` builds them (`specdec.train_data`, the same
selection flags with the same defaults), so cache positions are finetune's loss positions. Per
response token the cache holds the target's top-k ids (int32), their log-probs at
--temperature (float32, or float16 with --dtype float16) and the log of the mass outside them:
the (k + 1)-way partition `specdec.kd` computes its losses on.

Layout: `<out>/shard-00000.safetensors`, ... (--shard-examples examples each, written
atomically; a rerun skips the shards already written and recomputes any that are damaged) and
`<out>/manifest.json`, written last: the target and its weights' hashes, the data file's sha256,
the selection, the tokenizer and chat template hashes, the examples' hash, top-k, temperature,
and each shard's sha256. finetune checks all of it before training and refuses a cache made for
another target, data file, selection or template, naming the file and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdec.cli import config_from_args, config_parser
from specdec.data import DataError
from specdec.turns import data_sha256
from specdec.hub import file_sha256
from specdec.kd import TopK, response_logits, topk_of
from specdec.models import DEFAULT_TARGET, ModelError, load_model, resolve_model, \
    write_json_atomic
from specdec.train_data import (DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_SEQ_LEN, Example,
                                Selection, build_examples, collate, examples_sha256,
                                special_ids)

FORMAT = "specdec-logit-cache/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class CacheError(ValueError):
    """A logit cache that cannot be used as it is (the message says how to fix it)."""


@dataclass
class LogitCacheConfig:
    data: str = field(metadata={"help": "the data file finetune will train on (or sharegpt)"})
    out: str = field(metadata={"help": "output dir (e.g. runs/x/distilled.logits)"})
    target: str = field(default=DEFAULT_TARGET, metadata={"help": "the KD teacher"})
    n: int | None = field(default=None, metadata={"help": "records to use (as finetune --n)"})
    split: str = field(default="train", metadata={
        "help": "split of a built-in source (as finetune --split)",
        "choices": ["train", "test", "all"]})
    max_prompt_tokens: int = field(default=DEFAULT_MAX_PROMPT_TOKENS,
                                   metadata={"help": "as finetune --max-prompt-tokens"})
    max_answer_tokens: int | None = field(default=None,
                                          metadata={"help": "as finetune --max-answer-tokens"})
    max_seq_len: int = field(default=DEFAULT_MAX_SEQ_LEN,
                             metadata={"help": "as finetune --max-seq-len"})
    top_k: int = field(default=32, metadata={"help": "target ids kept per token"})
    temperature: float = field(default=1.0, metadata={"help": "as finetune --kd-temperature"})
    dtype: str = field(default="float32", metadata={
        "help": "storage of the log-probs", "choices": list(DTYPES)})
    batch_size: int = field(default=8, metadata={"help": "sequences per target forward"})
    shard_examples: int = field(default=256, metadata={"help": "examples per shard file"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the target"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size", "shard_examples", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")


@dataclass
class LogitCacheResult:
    out: Path
    manifest: dict[str, Any]
    computed_shards: int
    seconds: float


# ---------------------------------------------------------------------------- identity


def target_identity(path: Path) -> Any:
    """The target's weights by content, as `specdec.prune` records it for a draft's target."""
    from specdec.prune import target_identity as identity

    return identity(Path(path))


def tokenizer_identity(tokenizer, stop_ids: set[int], pad_id: int) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template or ""
    return {"vocab_size": len(tokenizer), "vocab_sha256": _sha(vocab),
            "chat_template_sha256": _sha(template), "stop_ids": sorted(stop_ids),
            "pad_id": pad_id}


def settings(sel: Selection, data_hash: str, tokenizer: dict[str, Any],
             examples: list[Example], top_k: int, temperature: float) -> dict[str, Any]:
    """Everything the cached values depend on, besides the target: what a consumer checks."""
    return {"format": FORMAT, "data_sha256": data_hash,
            "selection": {k: v for k, v in vars(sel).items() if k != "data"},
            "tokenizer": tokenizer, "examples": len(examples),
            "response_tokens": sum(e.n_response for e in examples),
            "examples_sha256": examples_sha256(examples), "top_k": top_k,
            "temperature": temperature}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _key(obj: Any) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str))[:16]


def command(cfg: LogitCacheConfig) -> str:
    """The command line that builds (or completes, or repairs) the cache `cfg` describes."""
    parts = ["python -m specdec.logit_cache", f"--target {cfg.target}", f"--data {cfg.data}"]
    defaults = LogitCacheConfig(data="", out="")
    for name in ("n", "split", "max_prompt_tokens", "max_answer_tokens", "max_seq_len",
                 "top_k", "temperature"):
        value = getattr(cfg, name)
        if name in ("top_k", "temperature") or value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {'none' if value is None else value}")
    return " ".join(parts + [f"--out {cfg.out}"])


# ---------------------------------------------------------------------------- build


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_ok(path: Path, key: str, sha: str | None) -> bool:
    """Whether a shard already written for this cache can be kept."""
    if not path.is_file():
        return False
    if sha is not None:
        return file_sha256(path) == sha
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("key") == key
    except (SafetensorError, OSError):
        return False


def score(target, examples: list[Example], pad_id: int, top_k: int, temperature: float,
          batch_size: int, device, autocast) -> list[TopK]:
    """The target's top-k partition on each example's response tokens, in example order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out: list[TopK | None] = [None] * len(examples)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        input_ids, attention_mask, loss_mask, _ = collate([examples[i] for i in idx], pad_id,
                                                          device)
        with torch.no_grad(), autocast:
            logits = response_logits(target, input_ids, attention_mask, loss_mask)
        top = topk_of(logits, top_k, temperature)
        start = 0
        for i in idx:
            n = examples[i].n_response
            out[i] = TopK(top.ids[start:start + n], top.logprobs[start:start + n],
                          top.residual[start:start + n])
            start += n
    return out  # type: ignore[return-value]


def run(cfg: LogitCacheConfig, console: Console | None = None) -> LogitCacheResult:
    console = console or Console(stderr=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    target_path = resolve_model(cfg.target, console)
    target, tokenizer = load_model(target_path, dtype=torch.float32, device=device)
    stop_ids, pad_id = special_ids(target, tokenizer)
    sel = Selection.of(cfg)
    counts: Counter = Counter()
    examples = build_examples(sel, tokenizer, stop_ids, counts)
    top_k = min(cfg.top_k, target.config.vocab_size - 1)
    plan = {**settings(sel, data_sha256(cfg.data), tokenizer_identity(tokenizer, stop_ids,
                                                                     pad_id),
                       examples, top_k, cfg.temperature),
            "target": cfg.target, "target_weights": target_identity(target_path),
            "dtype": cfg.dtype, "bf16": cfg.bf16, "shard_examples": cfg.shard_examples}
    key = _key(plan)
    plan["key"] = key

    out.mkdir(parents=True, exist_ok=True)
    old_shas: dict[str, str] = {}
    for name in (MANIFEST, PLAN):
        if not (out / name).is_file():
            continue
        try:
            old = json.loads((out / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("key") != key:
            raise CacheError(f"{out} holds a logit cache made with other settings (target, "
                             f"data, selection, top-k, temperature or dtype); choose another "
                             f"--out, or delete {out} to replace it")
        if name == MANIFEST:
            old_shas = {s["file"]: s["sha256"] for s in old.get("shards", [])}
    write_json_atomic(out / PLAN, plan)

    n_shards = (len(examples) + cfg.shard_examples - 1) // cfg.shard_examples
    todo = [i for i in range(n_shards)
            if not _shard_ok(out / _shard_name(i), key, old_shas.get(_shard_name(i)))]
    todo_tokens = sum(e.n_response for i in todo
                      for e in examples[i * cfg.shard_examples:(i + 1) * cfg.shard_examples])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    t0 = time.perf_counter()
    columns = [TextColumn("[bold]logit cache"), BarColumn(), MofNCompleteColumn(),
               TextColumn("response tokens"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("cache", total=todo_tokens)
        for i in todo:
            first = i * cfg.shard_examples
            part = examples[first:first + cfg.shard_examples]
            tops = score(target, part, pad_id, top_k, cfg.temperature, cfg.batch_size, device,
                         autocast)
            tensors = {
                "ids": torch.cat([t.ids for t in tops]).to(torch.int32).contiguous(),
                "logprobs": torch.cat([t.logprobs for t in tops]).to(DTYPES[cfg.dtype]),
                "residual": torch.cat([t.residual for t in tops]).to(DTYPES[cfg.dtype]),
                "lengths": torch.tensor([e.n_response for e in part], dtype=torch.int64)}
            tmp = out / f".{_shard_name(i)}.tmp-{os.getpid()}"
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"key": key, "first": str(first), "count": str(len(part))})
            os.replace(tmp, out / _shard_name(i))
            progress.update(task, advance=sum(e.n_response for e in part))
    seconds = time.perf_counter() - t0

    shards = []
    for i in range(n_shards):
        first = i * cfg.shard_examples
        part = examples[first:first + cfg.shard_examples]
        shards.append({"file": _shard_name(i), "first": first, "count": len(part),
                       "tokens": sum(e.n_response for e in part),
                       "sha256": file_sha256(out / _shard_name(i))})
    manifest = {**plan, "data": cfg.data, "skipped": dict(sorted(counts.items())),
                "shards": shards, "computed_shards": len(todo),
                "seconds_this_run": round(seconds, 2),
                "tokens_per_s_this_run": round(todo_tokens / seconds, 2) if todo else None,
                "command": command(cfg)}
    write_json_atomic(out / MANIFEST, manifest)
    return LogitCacheResult(out, manifest, len(todo), seconds)


# ---------------------------------------------------------------------------- read


class LogitCache:
    """A checked cache, in memory: `lookup(i)` gives example i's `TopK` (fp32 log-probs)."""

    def __init__(self, path: Path, manifest: dict[str, Any], ids: torch.Tensor,
                 logprobs: torch.Tensor, residual: torch.Tensor, offsets: list[int]):
        self.path, self.manifest = path, manifest
        self.ids, self.logprobs, self.residual, self.offsets = ids, logprobs, residual, offsets

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def lookup(self, index: int) -> TopK:
        a, b = self.offsets[index], self.offsets[index + 1]
        return TopK(self.ids[a:b].long(), self.logprobs[a:b], self.residual[a:b])

    def targets(self, indices: list[int]) -> TopK:
        """The targets of these examples' response tokens, concatenated in order: [n, k]."""
        parts = [self.lookup(i) for i in indices]
        return TopK(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                    torch.cat([p.residual for p in parts]))


def peek(path: str | Path) -> dict[str, Any]:
    """The manifest (else the plan) of a cache dir as far as it can be read; {} if neither."""
    for name in (MANIFEST, PLAN):
        try:
            found = json.loads((Path(path) / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(found, dict):
            return found
    return {}


def open_cache(path: str | Path, expected: dict[str, Any], fix: str) -> LogitCache:
    """Read and check a cache against `expected` (`settings(...)` of the run that will use it,
    plus optional 'target_weights' / 'target'). Every refusal names the file and says `fix`
    (the command that rebuilds the cache)."""
    path = Path(path)
    manifest_file = path / MANIFEST

    def fail(what: str, file: Path = manifest_file) -> CacheError:
        return CacheError(f"logit cache {file}: {what}; rebuild it with: {fix}")

    if not manifest_file.is_file():
        if (path / PLAN).is_file():
            raise fail("is incomplete (no manifest.json: the build was interrupted); rerun "
                       "the build to finish it", path)
        raise fail("does not exist" if not path.exists() else "has no manifest.json", path)
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise fail(f"has format {manifest.get('format')!r}, this specdec reads {FORMAT!r}")
    labels = {"data_sha256": "another data file (sha256 differs)",
              "selection": "another record selection", "tokenizer": "another tokenizer or "
              "chat template", "examples_sha256": "other examples (tokens or masks differ)",
              "top_k": "another --kd-top-k", "temperature": "another --kd-temperature",
              "target_weights": "another target (weights differ)", "target": "another target"}
    for name, label in labels.items():
        if name not in expected:
            continue
        have, want = manifest.get(name), expected[name]
        if json.dumps(have, sort_keys=True) != json.dumps(want, sort_keys=True):
            detail = ""
            if isinstance(have, dict) and isinstance(want, dict):
                diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
                detail = ": " + ", ".join(f"{k}={have.get(k)!r} in the cache, {want.get(k)!r} "
                                          f"here" for k in diff)
            elif not isinstance(have, (dict, list)):
                detail = f": {have!r} in the cache, {want!r} here"
            raise fail(f"was made for {label}{detail}")

    ids, logprobs, residual, lengths = [], [], [], []
    for shard in manifest.get("shards", []):
        file = path / shard["file"]
        if not file.is_file():
            raise fail("is incomplete (the shard is missing)", file)
        if file_sha256(file) != shard["sha256"]:
            raise fail("is corrupt (its sha256 differs from manifest.json)", file)
        try:
            t = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise fail(f"cannot be read ({exc})", file) from exc
        n = int(t["lengths"].sum())
        if t["ids"].shape != (n, manifest["top_k"]) or t["logprobs"].shape != t["ids"].shape \
                or t["residual"].shape != (n,) or len(t["lengths"]) != shard["count"]:
            raise fail("has tensors of the wrong shape", file)
        ids.append(t["ids"])
        logprobs.append(t["logprobs"].float())
        residual.append(t["residual"].float())
        lengths += t["lengths"].tolist()
    if len(lengths) != manifest.get("examples") or sum(lengths) != manifest.get(
            "response_tokens"):
        raise fail(f"covers {len(lengths)} examples ({sum(lengths)} tokens), manifest.json "
                   f"says {manifest.get('examples')} ({manifest.get('response_tokens')})")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return LogitCache(path, manifest, torch.cat(ids), torch.cat(logprobs), torch.cat(residual),
                      offsets)


class CachedTeacher:
    """Stands in for the online teacher in finetune's loop: looks the targets up."""

    def __init__(self, cache: LogitCache, device):
        self.cache, self.device = cache, device

    def __call__(self, indices, input_ids, attention_mask, loss_mask) -> TopK:
        return self.cache.targets(list(indices)).to(self.device)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(LogitCacheConfig, "python -m specdec.logit_cache",
                           "Cache the target's top-k log-probs on a data file's response tokens "
                           "for KD without the target.")
    cfg = config_from_args(LogitCacheConfig, parser.parse_args(argv))
    console = Console()
    try:
        result = run(cfg, console=console)
    except (DataError, ModelError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    m = result.manifest
    table = Table(title=f"logit cache: {result.out}", show_header=False)
    table.add_row("target", cfg.target)
    table.add_row("data", f"{cfg.data} ({m['examples']} examples)")
    for reason, count in m["skipped"].items():
        table.add_row(f"  skipped: {reason}", str(count))
    table.add_row("response tokens", f"{m['response_tokens']:,}")
    table.add_row("top-k, temperature", f"{m['top_k']}, {m['temperature']}")
    table.add_row("shards computed / total", f"{result.computed_shards} / {len(m['shards'])}")
    size = sum((result.out / s["file"]).stat().st_size for s in m["shards"])
    table.add_row("size", f"{size / 2**20:.1f} MiB")
    table.add_row("seconds", f"{result.seconds:.1f}")
    table.add_row("response tokens/s", str(m["tokens_per_s_this_run"] or "- (nothing to do)"))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
