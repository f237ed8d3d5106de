"""Trimmed draft vocabularies: the draft drafts only among the tokens its target emits most.

    python -m specdec.vocab build --draft runs/x/sd --data runs/x/distilled.jsonl --coverage 0.98
    python -m specdec.vocab coverage --data runs/x/distilled.jsonl        # the coverage curve
    python -m specdec.vocab show --draft runs/x/sd

A draft's LM head is a large share of its cost on a small model (SmolLM2's tied 49,152 x 576
head is 21% of the target's weights and 57% of a 6-layer draft's). Most of those rows are
tokens the target almost never emits, so the draft computes logits only over the N ids the
target emits most often (FR-Spec's idea), ranked by frequency in *target-written* text: the
self-distilled answers that passed the filter (``origin == "distilled"``), never an
evaluation set. N is chosen by coverage of those tokens (95%, 98%, 99%, ...).

Lossless whatever N is: draft tokens outside the subset have draft_probs = 0, so the draft never
proposes them, and verification is unchanged -- greedy output is the target's argmax; sampled
output is distributed as the target's, since the residual max(0, target_probs - draft_probs)
that a rejection resamples from covers every token, the ones outside the subset included.

The subset is a sidecar file, ``draft_vocab.json``, in the draft's checkpoint dir; the weights
stay full-vocabulary, so transformers and vLLM load the dir unchanged (vLLM uses the full head).
Its provenance (source file and sha256, coverage, N) is also written into the draft's
``specdec.json`` under ``draft_vocab``, with the sidecar's sha256, so a missing or edited sidecar
is caught at load (`load_draft_vocab`) with the command that rebuilds it.

Consumers: `SpeculativeEngine(..., draft_vocab=...)` builds the sub-head once (the head's rows
for those ids) and computes draft logits only over it; `specdec.acceptance` scores a draft with
the same subset (`DraftVocab.masked_head`), so teacher-forced acceptance predicts the engine's
exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIDECAR = "draft_vocab.json"
FORMAT = 1
DEFAULT_COVERAGES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# how `build_draft_vocab(fill=True)` pads a vocabulary its ranking text leaves short
FILL_ORDER = "lowest token ids first (byte-level BPE merge order)"


class DraftVocabError(ValueError):
    """A draft vocabulary that is missing, corrupt or does not fit the model: the message says
    which file and how to rebuild it."""


def _rebuild_hint(draft_dir: str | Path) -> str:
    return (f"rebuild it with: python -m specdec.vocab build --draft {draft_dir} --data "
            "<self-distilled JSONL> --coverage 0.98 (or delete 'draft_vocab' from its specdec.json "
            "to draft over the full vocabulary)")


@dataclass
class DraftVocab:
    """The sorted token ids a draft drafts among, out of a vocabulary of `vocab_size`."""

    ids: torch.Tensor  # [n] int64, sorted, unique, in [0, vocab_size)
    vocab_size: int
    coverage: float | None = None  # share of the ranking text's tokens inside the subset
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = torch.as_tensor(self.ids, dtype=torch.int64).flatten()
        if ids.numel() == 0:
            raise DraftVocabError("a draft vocabulary needs at least one token id")
        ids = torch.unique(ids)  # sorted
        if int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size:
            raise DraftVocabError(f"draft vocabulary ids must lie in [0, {self.vocab_size}); got "
                                  f"{int(ids[0])}..{int(ids[-1])}")
        self.ids = ids

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    def to(self, device) -> DraftVocab:
        return DraftVocab(self.ids.to(device), self.vocab_size, self.coverage, self.provenance)

    # ------------------------------------------------------------------ heads

    def sub_head(self, model) -> nn.Module:
        """A Linear over the subset: the rows of `model`'s output head for these ids (a copy:
        N x d, made once; the full head stays as it is; int8 for an int8 draft)."""
        head = model.get_output_embeddings()
        weight = head.weight
        if weight.shape[0] != self.vocab_size:
            raise DraftVocabError(
                f"the draft vocabulary was made for a vocabulary of {self.vocab_size} but the model's "
                f"head has {weight.shape[0]} rows; rebuild it for this model's tokenizer")
        ids = self.ids.to(weight.device)
        bias = getattr(head, "bias", None)
        sub = nn.Linear(weight.shape[1], self.n, bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            sub.weight.copy_(weight.index_select(0, ids))
            if bias is not None:
                sub.bias.copy_(bias.index_select(0, ids))
        sub.requires_grad_(False)
        from specdec.quant import like_head

        return like_head(head, sub)  # int8 when the draft's head is (specdec.quant)

    def scatter(self, sub_logits: torch.Tensor) -> torch.Tensor:
        """[..., n] logits over the subset -> [..., vocab_size], -inf outside it (draft_probs = 0)."""
        shape = (*sub_logits.shape[:-1], self.vocab_size)
        full = torch.full(shape, float("-inf"), dtype=sub_logits.dtype, device=sub_logits.device)
        return full.index_copy_(-1, self.ids.to(sub_logits.device), sub_logits)

    def masked_head(self, model) -> nn.Module:
        """A head computing the same full-vocabulary logits the engine's trimmed draft implies
        (the subset's logits, -inf elsewhere): for teacher-forced acceptance."""
        return _MaskedHead(self.sub_head(model), self)

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "vocab_size": self.vocab_size, "n": self.n,
                "coverage": self.coverage, "provenance": self.provenance,
                "ids": self.ids.tolist()}

    def save(self, draft_dir: str | Path) -> Path:
        """Write the sidecar into `draft_dir` (atomically) and record it in its specdec.json."""
        from specdec.models import MANIFEST, read_manifest, write_json_atomic

        draft_dir = Path(draft_dir)
        if not (draft_dir / "config.json").is_file():
            raise DraftVocabError(f"{draft_dir} is not a checkpoint dir (no config.json)")
        path = draft_dir / SIDECAR
        write_json_atomic(path, self.to_json())
        manifest = read_manifest(draft_dir)
        manifest["draft_vocab"] = {"file": SIDECAR, "sha256": _sha256(path), "n": self.n,
                                   "vocab_size": self.vocab_size, "coverage": self.coverage,
                                   **{k: v for k, v in self.provenance.items() if k != "counts"}}
        write_json_atomic(draft_dir / MANIFEST, manifest)
        return path


class _MaskedHead(nn.Module):
    def __init__(self, sub: nn.Linear, vocab: DraftVocab):
        super().__init__()
        self.sub = sub
        self.vocab = vocab
        self.weight = sub.weight  # specdec.acceptance reads head.weight for dtype and device

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab.scatter(self.sub(hidden))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_sidecar(path: str | Path, vocab_size: int | None = None) -> DraftVocab:
    """A `draft_vocab.json` file; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DraftVocabError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DraftVocabError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("ids"), list):
        raise DraftVocabError(f"{path} is not a specdec draft vocabulary (format {FORMAT} with 'ids')")
    if len(obj["ids"]) != obj.get("n"):
        raise DraftVocabError(f"{path} lists {len(obj['ids'])} ids but says n = {obj.get('n')}")
    if vocab_size is not None and obj.get("vocab_size") != vocab_size:
        raise DraftVocabError(f"{path} was made for a vocabulary of {obj.get('vocab_size')} tokens, "
                              f"but the model has {vocab_size}")
    return DraftVocab(torch.tensor(obj["ids"], dtype=torch.int64), int(obj["vocab_size"]),
                      obj.get("coverage"), obj.get("provenance") or {})


def load_draft_vocab(draft_dir: str | Path, vocab_size: int | None = None) -> DraftVocab | None:
    """The draft vocabulary a draft dir's specdec.json names (None when it names none),
    checked against the sidecar's sha256 and the model's vocabulary size."""
    from specdec.models import read_manifest

    draft_dir = Path(draft_dir)
    entry = read_manifest(draft_dir).get("draft_vocab")
    if not entry:
        return None
    path = draft_dir / entry.get("file", SIDECAR)
    hint = _rebuild_hint(draft_dir)
    if not path.is_file():
        raise DraftVocabError(f"{draft_dir}/specdec.json names a draft vocabulary {path.name}, but "
                              f"{path} is missing; {hint}")
    if entry.get("sha256") and _sha256(path) != entry["sha256"]:
        raise DraftVocabError(f"{path} does not match the sha256 recorded in {draft_dir}/specdec.json "
                              f"(the file was changed or replaced); {hint}")
    try:
        return read_sidecar(path, vocab_size)
    except DraftVocabError as exc:
        raise DraftVocabError(f"{exc}; {hint}") from None


def resolve_draft_vocab(spec: str | int | DraftVocab | None, draft_dir: str | Path | None,
                        vocab_size: int | None) -> DraftVocab | None:
    """What a command line's ``--draft-vocab`` means: "auto" (the draft dir's sidecar if it has
    one), "full" / "" / None (no trimming), a path to a sidecar file, or a DraftVocab."""
    if isinstance(spec, DraftVocab) or spec is None:
        return spec
    text = str(spec).strip()
    if text in ("", "full", "none", "0"):
        return None
    if text == "auto":
        return load_draft_vocab(draft_dir, vocab_size) if draft_dir else None
    path = Path(text)
    if path.is_dir():
        found = load_draft_vocab(path, vocab_size)
        if found is None:
            raise DraftVocabError(f"{path}/specdec.json names no draft vocabulary; "
                                  f"{_rebuild_hint(path)}")
        return found
    return read_sidecar(path, vocab_size)


# ------------------------------------------------------------------ ranking


def count_target_tokens(records: Iterable[dict[str, Any]], tokenizer,
                        kept_only: bool = True) -> tuple[Counter, int, int]:
    """Token counts of the assistant answers the target wrote (records of `specdec.distill`;
    with `kept_only`, only ``origin == "distilled"``, since a fallback is the data set's text).
    Returns (counts, records used, records skipped)."""
    counts: Counter = Counter()
    used = skipped = 0
    for record in records:
        if kept_only and record.get("origin", "distilled") != "distilled":
            skipped += 1
            continue
        answers = [m["content"] for m in record.get("messages", []) if m.get("role") == "assistant"]
        if not answers:
            skipped += 1
            continue
        for text in answers:
            counts.update(tokenizer.encode(text, add_special_tokens=False))
        used += 1
    return counts, used, skipped


def coverage_curve(counts: Counter, coverages: Sequence[float] = DEFAULT_COVERAGES
                   ) -> list[dict[str, float]]:
    """For each coverage: the smallest N whose top-N ids hold that share of the tokens."""
    total = sum(counts.values())
    if total == 0:
        raise DraftVocabError("no target-written tokens to rank (is the data file empty, or are "
                              "all its records fallbacks to the original answers?)")
    ranked = [c for _, c in counts.most_common()]
    out, running, i = [], 0, 0
    for cov in sorted(coverages):
        while i < len(ranked) and running < cov * total:
            running += ranked[i]
            i += 1
        out.append({"coverage": cov, "n": i, "actual": running / total})
    return out


def build_draft_vocab(counts: Counter, vocab_size: int, *, n: int | None = None,
                      coverage: float | None = None, always: Iterable[int] = (),
                      provenance: dict[str, Any] | None = None, fill: bool = False
                      ) -> DraftVocab:
    """The top-`n` ids by count (or the fewest reaching `coverage` of the counted tokens), plus
    the ids in `always` (EOS and other special tokens the target emits).

    fill: when the ranking text has fewer than `n` distinct ids, pad with the lowest ids it
    does not have (`FILL_ORDER`): a small distilled set leaves out rare tokens the target does
    write elsewhere, and a byte-level BPE vocabulary numbers its tokens in merge order, most
    frequent first in the tokenizer's own training text."""
    if (n is None) == (coverage is None):
        raise DraftVocabError("give exactly one of n (token ids) or coverage (e.g. 0.98)")
    total = sum(counts.values())
    if total == 0:
        raise DraftVocabError("no target-written tokens to rank")
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise DraftVocabError(f"coverage must be in (0, 1], got {coverage}")
        n = coverage_curve(counts, [coverage])[0]["n"]
    if n < 1:
        raise DraftVocabError(f"n must be >= 1, got {n}")
    top = [t for t, _ in counts.most_common(n) if 0 <= t < vocab_size]
    ids = set(top) | {int(t) for t in always if 0 <= int(t) < vocab_size}
    filled = 0
    if fill:
        for t in range(vocab_size):
            if len(ids) >= n:
                break
            if t not in ids:
                ids.add(t)
                filled += 1
    ids = sorted(ids)
    covered = sum(counts[t] for t in ids) / total
    prov = dict(provenance or {})
    prov.setdefault("ranked_tokens", total)
    if fill:
        prov["fill"] = {"order": FILL_ORDER, "ids": filled}
    return DraftVocab(torch.tensor(ids, dtype=torch.int64), vocab_size, covered, prov)


def special_ids(tokenizer, model=None) -> set[int]:
    """EOS ids (tokenizer, generation config) and the tokenizer's special tokens."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for source in (tokenizer, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(t) for t in eos)
    return ids


def from_data(data: str | Path, tokenizer, vocab_size: int, *, n: int | None = None,
              coverage: float | None = None, model=None, fill: bool = False
              ) -> tuple[DraftVocab, list[dict]]:
    """Rank a distilled JSONL's kept rewrites; (vocab, coverage curve). fill: as
    `build_draft_vocab`."""
    from specdec.data import iter_jsonl
    from specdec.hub import file_sha256

    data = Path(data)
    if not data.is_file():
        raise DraftVocabError(f"--data {data} does not exist; give the self-distilled JSONL "
                              "(python -m specdec.distill writes one)")
    counts, used, skipped = count_target_tokens((r for r, _ in iter_jsonl(data)), tokenizer)
    curve = coverage_curve(counts)
    prov = {"source": str(data), "source_sha256": file_sha256(data), "records": used,
            "records_skipped": skipped, "ranking": "kept target rewrites (origin == distilled)"}
    vocab = build_draft_vocab(counts, vocab_size, n=n, coverage=coverage,
                              always=special_ids(tokenizer, model), provenance=prov, fill=fill)
    vocab.provenance["requested"] = {"n": n, "coverage": coverage}
    return vocab, curve


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.vocab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="rank target-written tokens and write the draft's sidecar")
    b.add_argument("--draft", required=True, help="the draft's checkpoint dir")
    b.add_argument("--data", required=True, help="self-distilled JSONL (kept rewrites are ranked)")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--coverage", type=float, default=None, help="e.g. 0.98 (default)")
    group.add_argument("--n", type=int, default=None, help="keep exactly the top-N ids")
    b.add_argument("--fill", action="store_true",
                   help="with --n: pad to N with the lowest unranked ids when the data has fewer "
                        "distinct ids (byte-level BPE ids are in merge order)")
    c = sub.add_parser("coverage", help="print the coverage curve of a data file")
    c.add_argument("--data", required=True)
    c.add_argument("--tokenizer", default=None, help="default: the target's (smollm2-135m-instruct)")
    s = sub.add_parser("show", help="a draft's vocabulary")
    s.add_argument("--draft", required=True)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from specdec.models import DEFAULT_TARGET, load_config, resolve_model

    try:
        if args.cmd == "build":
            if args.n is None and args.coverage is None:
                args.coverage = 0.98
            tok = AutoTokenizer.from_pretrained(resolve_model(args.draft))
            vocab_size = int(load_config(args.draft).vocab_size)
            if args.fill and args.n is None:
                raise DraftVocabError("--fill pads to --n ids; give --n")
            vocab, curve = from_data(args.data, tok, vocab_size, n=args.n, coverage=args.coverage,
                                     fill=args.fill)
            path = vocab.save(args.draft)
            _print_curve(curve)
            print(json.dumps({"draft_vocab": str(path), "n": vocab.n, "vocab_size": vocab_size,
                              "coverage": round(vocab.coverage, 5)}))
        elif args.cmd == "coverage":
            tok = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer or DEFAULT_TARGET))
            _, curve = from_data(args.data, tok, len(tok), coverage=0.99)
            _print_curve(curve)
            print(json.dumps({"coverage_curve": curve}))
        else:
            vocab = load_draft_vocab(args.draft)
            if vocab is None:
                print(f"{args.draft}: full vocabulary (no draft_vocab in its specdec.json)")
            else:
                print(json.dumps({k: v for k, v in vocab.to_json().items() if k != "ids"}, indent=2))
    except (DraftVocabError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_curve(curve: list[dict[str, float]]) -> None:
    print("coverage of target-written tokens -> draft vocabulary size N")
    for row in curve:
        print(f"  {row['coverage']:.3f}: N = {row['n']:>6} (covers {row['actual']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
