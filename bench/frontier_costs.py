"""What bench/frontier.py measures and predicts with: c, v(k), prefill costs, and the cost model.

* c: one draft forward (1 token, batch 1, ending in the trimmed head if any) over one target
  forward, the median of paired ratios; v(k): a target forward of k + 1 positions over a
  1-position one; prefills: a fresh cache filled with prompt[:-1], as the engine starts (a
  draft's beside the target: the bottom layers it shares with the target taken from its prefill);
* `predict`: the end-to-end speedup of n new tokens, (p_t + n) / (p_t + p_d + n (k c + v) / tau)
  with the prefills p_t, p_d in target forwards; `tau_needed` inverts it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _forward_seconds(kv, ids: torch.Tensor, q: int) -> float:
    """One forward of the last q prompt tokens through a BatchKV, rolled back after."""
    t0 = time.perf_counter()
    kv.forward(ids[:, -q:])
    dt = time.perf_counter() - t0
    kv.reject(q, torch.zeros(1, dtype=torch.int64, device=ids.device), [0])
    return dt


@torch.inference_mode()
def verify_costs(target, prompt: list[int], ks: list[int], reps: int) -> dict[str, Any]:
    """v(k) = t(target, k + 1 tokens) / t(target, 1 token): medians of paired ratios."""
    from specdec.decode.forward import row_exact_default
    from specdec.decode.kv import BatchKV

    device = next(target.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kv = BatchKV(target, 1, device, row_exact=row_exact_default(target))  # as the engine verifies
    kv.forward(ids, logits_to_keep=1)
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    base = []
    for rep in range(reps + 2):
        for k in ks:
            t1, tk = _forward_seconds(kv, ids, 1), _forward_seconds(kv, ids, k + 1)
            if rep >= 2:
                ratios[k].append(tk / t1)
                base.append(t1)
    return {"target_forward_s": statistics.median(base),
            "v": {k: statistics.median(r) for k, r in ratios.items()}}


@torch.inference_mode()
def prefill_seconds(model, prompt: list[int], reps: int, target=None) -> float:
    """One prefill of prompt[:-1] into a fresh cache, as the engine starts a generation (median).
    With `target` (for a draft): as the engine prefills the draft beside that target -- the
    bottom layers they share (`forward.shared_layers`) copied from the target's prefill, only
    the layers above computed."""
    from specdec.decode.forward import shared_layers
    from specdec.decode.kv import BatchKV

    device = next(model.parameters()).device
    ids = torch.tensor([prompt[:-1]], device=device)
    shared = shared_layers(target, model) if target is not None else 0
    if shared:
        source = BatchKV(target, 1, device)
        shared = shared if source.lean and BatchKV(model, 1, device).lean else 0
    if shared:
        _, hidden = source.forward(ids, logits_to_keep=1, capture=shared)
    times = []
    for _ in range(reps + 1):
        kv = BatchKV(model, 1, device)
        t0 = time.perf_counter()
        if shared:
            kv.prefill_from(source, shared, hidden, ids, logits_to_keep=1)
        else:
            kv.forward(ids, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def predict(tau: float, k: int, c: float, v: float, prefill_target: float,
            prefill_draft: float, new_tokens: int) -> float:
    """The end-to-end speedup of `new_tokens` tokens after a prompt (prefills in target
    forwards): (p_t + n) / (p_t + p_d + n (k c + v) / tau)."""
    return (prefill_target + new_tokens) / (
        prefill_target + prefill_draft + new_tokens * (k * c + v) / tau)


def tau_needed(speedup: float, k: int, c: float, v: float, prefill_target: float,
               prefill_draft: float, new_tokens: int) -> float | None:
    """The tau at which `predict` reaches `speedup`; None when no tau does (the draft's
    prefill alone costs more than the speedup leaves)."""
    budget = (prefill_target + new_tokens) / speedup - prefill_target - prefill_draft
    return new_tokens * (k * c + v) / budget if budget > 0 else None


@torch.inference_mode()
def draft_cost(target, draft, prompt: list[int], reps: int, vocab=None) -> dict[str, float]:
    """c = t(draft, 1 token, trimmed head if any) / t(target, 1 token), paired."""
    from specdec.decode.kv import BatchKV

    device = next(target.parameters()).device
    ids = torch.tensor([prompt], device=device)
    head = vocab.sub_head(draft) if vocab is not None else None
    tkv, dkv = BatchKV(target, 1, device), BatchKV(draft, 1, device, head=head)
    tkv.forward(ids, logits_to_keep=1)
    dkv.forward(ids, logits_to_keep=1)
    ratios, draft_s = [], []
    for rep in range(reps + 2):
        t = _forward_seconds(tkv, ids, 1)
        d = _forward_seconds(dkv, ids, 1)
        if rep >= 2:
            ratios.append(d / t)
            draft_s.append(d)
    return {"c": statistics.median(ratios), "draft_forward_s": statistics.median(draft_s)}
