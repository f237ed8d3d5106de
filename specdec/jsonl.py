"""JSONL files written record by record: resumable (a torn last line from an interrupt is
dropped, any other bad line is an error), appended with fsync so a finished batch survives a
crash, or replaced atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from specdec.data import DataError


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Records already written to a JSONL file, by id. A last line cut off by an interrupt is
    dropped (the file is rewritten without it); a bad line elsewhere is an error."""
    if not path.is_file():
        return {}
    done: dict[str, dict[str, Any]] = {}
    lines = path.read_bytes().split(b"\n")
    good_bytes, bad = 0, None
    for i, raw in enumerate(lines):
        if not raw.strip():
            good_bytes += len(raw) + 1
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or "id" not in obj:
                raise ValueError("not a record")
        except ValueError:
            bad = i
            break
        done[str(obj["id"])] = obj
        good_bytes += len(raw) + 1
    if bad is not None:
        rest = [ln for ln in lines[bad + 1:] if ln.strip()]
        if rest:
            raise DataError(f"{path}:{bad + 1}: not a JSON record, and more lines follow; the "
                            f"file is damaged: delete it to start over")
        with open(path, "r+b") as f:  # drop the torn last line
            f.truncate(min(good_bytes, path.stat().st_size))
    return done


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records as JSONL and fsync, so a finished batch survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
