"""Split a pipeline run's data to the records whose rewrite passed the filter.

    python scripts/kept_only.py runs/paper     # writes kept-distilled.jsonl, kept-original.jsonl

`distilled.jsonl` mixes the target's rewrites with originals it fell back to; this writes the
rewrites alone and, for the SFT baseline, the original answers of the same prompts (same ids,
same order), so the two differ only in who wrote the answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specdec.data import iter_jsonl


def read_jsonl(path: Path) -> list[dict]:
    return [obj for obj, _ in iter_jsonl(path)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    tmp.replace(path)


def main(run: str) -> None:
    run_dir = Path(run)
    distilled = read_jsonl(run_dir / "distilled.jsonl")
    original = {r["id"]: r for r in read_jsonl(run_dir / "original.jsonl")}
    kept = [r for r in distilled if r["origin"] == "distilled"]
    missing = [r["id"] for r in kept if r["id"] not in original]
    if missing:
        raise SystemExit(f"{len(missing)} kept ids are not in original.jsonl (e.g. {missing[:3]})")
    write_jsonl(run_dir / "kept-distilled.jsonl", kept)
    write_jsonl(run_dir / "kept-original.jsonl", [original[r["id"]] for r in kept])
    print(f"{len(kept)} of {len(distilled)} records kept: wrote {run_dir}/kept-distilled.jsonl "
          f"and {run_dir}/kept-original.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
