"""The settings a frontier run picked for a draft, recorded in its `specdec.json`.

    {"recommended": {"k": 2, "draft_vocab_n": 8192, "dtype": "float32", "draft_dtype": "bfloat16",
                     "predicted_speedup": 1.12, "measured_speedup": 1.08, "by": "bench/frontier.py ...",
                     "date": "..."}}

`bench/frontier.py --write-recommended` writes it (and the draft's `draft_vocab.json` of that
size); `specdec.serve`, `bench/latency.py`, `bench/acceptance.py` and `python -m specdec.vllm
config` default to it: every explicit command-line value wins over it, and a draft without it
gets the old defaults. Losslessness never depends on these settings.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

KEY = "recommended"
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def recommended(draft_dir: str | Path | None) -> dict[str, Any]:
    """The draft's recommended settings ({} when none are recorded or it is not a dir)."""
    from specdec.models import read_manifest

    if not draft_dir or not Path(draft_dir).is_dir():
        return {}
    rec = read_manifest(draft_dir).get(KEY) or {}
    return rec if isinstance(rec, dict) else {}


def write_recommended(draft_dir: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Merge `settings` into the draft's specdec.json under "recommended" (atomically)."""
    from specdec.models import MANIFEST, read_manifest, write_json_atomic

    draft_dir = Path(draft_dir)
    manifest = read_manifest(draft_dir)
    rec = {**settings, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest[KEY] = rec
    write_json_atomic(draft_dir / MANIFEST, manifest)
    return rec


def recommended_k(draft_dir: str | Path | None, default: int = 4) -> int:
    k = recommended(draft_dir).get("k")
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else default


def dtype_of(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / ... -> torch dtype; '' or None -> default."""
    if not name:
        return default
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None
