"""Can a specdec draft serve as vLLM's `draft_model` for a target? Read from checkpoint files
only (no vLLM needed): architecture, vocabulary size, tokenizer vocabulary and merges, special
tokens and EOS, context length. `python -m specdec.vllm config --draft D` prints the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from specdec.models import (REGISTRY, SUPPORTED_ARCHITECTURES, ModelError, read_manifest,
                            resolve_model)


class DraftMismatchError(ValueError):
    """A draft that vLLM cannot use with this target; the message lists each problem and fix."""


# ------------------------------------------------------------------------------ the check


@dataclass
class CheckRow:
    name: str
    target: str
    draft: str
    ok: bool | None  # None: shown for information, never fails
    fix: str = ""


@dataclass
class DraftCheck:
    draft: Path  # local checkpoint dir
    target: Path  # local checkpoint dir
    target_name: str  # as given, or from the draft's manifest
    vllm_target: str  # what `vllm serve` is told: a hub id or an absolute path
    k: int
    max_model_len: int | None  # passed to vLLM only when the draft needs it
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok is not False for row in self.rows)

    @property
    def problems(self) -> list[str]:
        return [f"{r.name}: target {r.target}, draft {r.draft}. Fix: {r.fix}"
                for r in self.rows if r.ok is False]

    def raise_if_failed(self) -> None:
        if not self.ok:
            lines = "\n".join(f"- {p}" for p in self.problems)
            raise DraftMismatchError(
                f"draft {self.draft} cannot serve as vLLM draft_model for {self.target_name}:\n"
                f"{lines}")

    def speculative_config(self) -> dict[str, Any]:
        return speculative_config(self.draft, self.k)

    def serve_argv(self, host: str = "127.0.0.1", port: int = 8000,
                   extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        argv = ["vllm", "serve", self.vllm_target, "--speculative-config",
                json.dumps(self.speculative_config()), "--host", host, "--port", str(port)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        return argv + list(extra)


def speculative_config(draft: str | Path, k: int) -> dict[str, Any]:
    """vLLM's speculative_config for a specdec draft (absolute path) and k draft tokens."""
    if k < 1:
        raise ValueError(f"k (num_speculative_tokens) must be >= 1, got {k}")
    return {"method": "draft_model", "model": str(Path(draft).resolve()),
            "num_speculative_tokens": int(k)}


def target_of(draft: str | Path) -> str:
    """The target a draft was made from: its manifest's "target", following "parent" links."""
    path, seen = Path(draft), set()
    while path is not None and str(path) not in seen:
        seen.add(str(path))
        manifest = read_manifest(path)
        if manifest.get("target"):
            return str(manifest["target"])
        parent = manifest.get("parent")
        path = Path(parent) if parent and (Path(parent) / "config.json").is_file() else None
    raise ModelError(f"{draft} does not say which target it was made from (no \"target\" in its "
                     f"specdec.json); pass --target NAME_OR_DIR")


def vllm_model_name(name: str, path: Path) -> str:
    """How vLLM should be told about a model: the hub id for hub models, else the local dir."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.hub_id and not Path(name).is_dir():
        return spec.hub_id
    if spec is None and not Path(name).exists() and name.count("/") == 1:
        return name  # a hub id: vLLM downloads it itself
    return str(path.resolve())


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class TokenizerFingerprint:
    size: int  # tokens in the vocabulary, added tokens included
    vocab_sha: str  # the token -> id map and the merges
    added_sha: str  # added / special tokens (id, text, special flag)
    special: dict[str, str]  # bos/eos/pad/unk token text from tokenizer_config.json


def tokenizer_fingerprint(path: str | Path) -> TokenizerFingerprint:
    """Hashes of a checkpoint's tokenizer, from tokenizer.json (or the loaded token->id map)."""
    path = Path(path)
    config = _load_json(path / "tokenizer_config.json")
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            special[key] = str(value)
    file = path / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        vocab = model.get("vocab") or {}
        added = [(t.get("id"), t.get("content"), bool(t.get("special")))
                 for t in data.get("added_tokens") or []]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        size = len(ids | {a[0] for a in added})
        return TokenizerFingerprint(size, _sha([model.get("type"), vocab, model.get("merges")]),
                                    _sha(sorted(added)), special)
    from transformers import AutoTokenizer  # e.g. a sentencepiece tokenizer.model

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} has no loadable tokenizer ({exc}); save the checkpoint with "
                         f"its tokenizer (specdec.models.save_checkpoint(model, tokenizer, ...))"
                         ) from exc
    added = sorted((i, t, True) for t, i in tokenizer.get_added_vocab().items())
    return TokenizerFingerprint(len(tokenizer), _sha(sorted(tokenizer.get_vocab().items())),
                                _sha(added), special)


def _eos_ids(config: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    value = generation.get("eos_token_id", config.get("eos_token_id"))
    values = value if isinstance(value, list) else [value]
    return sorted(int(v) for v in values if v is not None)


def _row(name: str, target: Any, draft: Any, ok: bool | None, fix: str = "") -> CheckRow:
    return CheckRow(name, str(target), str(draft), ok, fix if ok is False else "")


def check_draft(draft: str | Path, target: str | None = None, k: int = 4,
                max_model_len: int | None = None, console: Console | None = None) -> DraftCheck:
    """Check a draft against its target for vLLM's draft_model method; never raises on a
    mismatch (see DraftCheck.ok / raise_if_failed), only on unreadable input."""
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if max_model_len is not None and max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {max_model_len}")
    draft_path = resolve_model(draft, console)
    target_name = target if target is not None else target_of(draft_path)
    target_path = resolve_model(target_name, console)
    if draft_path.resolve() == target_path.resolve():
        raise ValueError(f"the draft {draft_path} is the target itself; pass a draft checkpoint "
                         f"(e.g. one written by python -m specdec.prune)")
    tc, dc = _load_json(target_path / "config.json"), _load_json(draft_path / "config.json")
    tg = _load_json(target_path / "generation_config.json")
    dg = _load_json(draft_path / "generation_config.json")
    rows: list[CheckRow] = []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)

    def archs(c):
        return ",".join(c.get("architectures") or []) or "unknown"

    for who, c in (("target", tc), ("draft", dc)):
        ok = any(a in SUPPORTED_ARCHITECTURES for a in c.get("architectures") or [])
        rows.append(_row(f"{who} architecture", archs(tc), archs(dc), ok,
                         f"specdec supports {supported}; use a Llama-family {who}"))
    rows.append(_row("vocab_size (config)", tc.get("vocab_size"), dc.get("vocab_size"),
                     tc.get("vocab_size") == dc.get("vocab_size"),
                     "vLLM's draft_model method needs equal vocab sizes: cut the draft from "
                     "this target (python -m specdec.prune --target T) so it keeps its "
                     "embeddings and tokenizer"))
    tt, dt = tokenizer_fingerprint(target_path), tokenizer_fingerprint(draft_path)
    rows.append(_row("tokenizer vocab+merges", f"{tt.size} tokens {tt.vocab_sha[:12]}",
                     f"{dt.size} tokens {dt.vocab_sha[:12]}",
                     (tt.size, tt.vocab_sha) == (dt.size, dt.vocab_sha),
                     "vLLM drafts with the TARGET's tokenizer, so the draft's ids would mean "
                     "other text: make the draft from this target, or train it on the "
                     "target's tokenizer"))
    rows.append(_row("added/special tokens", tt.added_sha[:12], dt.added_sha[:12],
                     tt.added_sha == dt.added_sha,
                     "the draft's added tokens differ: copy the target's tokenizer.json and "
                     "tokenizer_config.json into the draft dir if the base vocabulary matches"))
    for key in sorted(set(tt.special) | set(dt.special)):
        a, b = tt.special.get(key), dt.special.get(key)
        rows.append(_row(f"tokenizer {key}", a, b, a == b,
                         "copy the target's tokenizer_config.json into the draft dir"))
    for key in ("bos_token_id", "pad_token_id"):
        if key in tc or key in dc:
            rows.append(_row(key, tc.get(key), dc.get(key), tc.get(key) == dc.get(key),
                             "copy the target's config.json special-token ids into the draft"))
    te, de = _eos_ids(tc, tg), _eos_ids(dc, dg)
    rows.append(_row("EOS ids", te, de, te == de,
                     "copy the target's generation_config.json into the draft dir"))
    t_len, d_len = tc.get("max_position_embeddings"), dc.get("max_position_embeddings")
    need = max_model_len or t_len
    len_ok = None if need is None or d_len is None else d_len >= need
    passed = None
    if max_model_len is not None and t_len is not None and max_model_len > t_len:
        len_ok = False
        hint = f"--max-model-len {max_model_len} exceeds the target's {t_len}; pass at most {t_len}"
    elif len_ok is False:
        hint = (f"pass --max-model-len {d_len} (or less) to vllm serve "
                f"(python -m specdec.vllm config --max-model-len {d_len}), or set the draft's "
                f"max_position_embeddings to {need} if its RoPE is the target's (a pruned "
                f"draft's is)")
    else:
        hint = ""
        if max_model_len is not None:
            passed = max_model_len
    rows.append(_row("max_position_embeddings",
                     t_len if max_model_len is None else f"{t_len}, serving {max_model_len}",
                     d_len, len_ok, hint))
    weights = sorted(draft_path.glob("*.safetensors")) + sorted(draft_path.glob("*.bin"))
    rows.append(_row("draft weights", "", ", ".join(w.name for w in weights) or "none",
                     bool(weights), "write the draft with specdec.models.save_checkpoint"))
    for key in ("num_hidden_layers", "hidden_size"):
        rows.append(_row(key, tc.get(key), dc.get(key), None))
    rows.append(_row("dtype",
                     tc.get("dtype", tc.get("torch_dtype")), dc.get("dtype", dc.get("torch_dtype")),
                     None))
    return DraftCheck(draft_path, target_path, target_name,
                      vllm_model_name(target_name, target_path), k, passed, rows)


def check_table(check: DraftCheck) -> Table:
    table = Table(title=f"draft {check.draft} vs target {check.target_name}")
    for col in ("check", "target", "draft", ""):
        table.add_column(col, overflow="fold")
    for r in check.rows:
        mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[dim]info[/dim]"}[r.ok]
        table.add_row(r.name, r.target, r.draft, mark)
    return table
