"""Paired timing statistics for the benchmarks: two decoders timed on the same prompts, in the
same rotation, compared prompt by prompt (what run-to-run noise cannot fake)."""

from __future__ import annotations

import random
import statistics
from typing import Any


def head_to_head(a_seconds: list[float], b_seconds: list[float], resamples: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Per-prompt paired ratios b/a (> 1: A faster): their median, a 95% bootstrap interval of
    the median (seeded, so a rerun of the same numbers prints the same interval) and how many
    pairs A won."""
    if len(a_seconds) != len(b_seconds) or not a_seconds:
        raise ValueError("head_to_head needs the same, non-zero number of runs of A and B")
    ratios = [b / a for a, b in zip(a_seconds, b_seconds)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                     for _ in range(resamples))
    lo, hi = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return {"ratio": statistics.median(ratios), "ci95": [lo, hi],
            "a_faster": sum(r > 1 for r in ratios), "of": len(ratios)}


def versus_pairs(specs: list[str], labels: list[str]) -> list[tuple[str, str]]:
    """'A:B' -> (A, B), both labels of --draft."""
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b or a == b:
            raise ValueError(f"--versus {spec!r}: give two different draft labels as A:B")
        missing = [x for x in (a, b) if x not in labels]
        if missing:
            raise ValueError(f"--versus {spec!r}: no draft labelled {', '.join(missing)}; the "
                             f"labels are {', '.join(labels)} (name drafts label=path)")
        pairs.append((a, b))
    return pairs


def versus_lines(result: dict[str, Any]) -> list[str]:
    """One printable line per head-to-head pair of a frontier result."""
    return [f"{v['a']} vs {v['b']}: {v['b']}'s time / {v['a']}'s = {v['ratio']:.3f} (95% "
            f"{v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}), {v['a']} faster on {v['a_faster']} of "
            f"{v['of']} runs" for v in result.get("versus", [])]
