"""Slow, readable references the fast engine is checked against.

* `speculative_step`: one step of speculative decoding in the style of gpt-fast's generate.py,
  batch 1, no KV cache (every forward sees the whole sequence): draft k tokens one at a time,
  run the target once over the k + 1 new positions, accept draft token i with probability
  min(1, target_probs / draft_probs), replace the first rejected one by a *recovered* token
  drawn from normalize(max(target_probs - draft_probs, 0)), or append a *bonus* token from the
  target's last position when all k are accepted. Greedy (temperature 0) accepts while the
  draft token is the target's argmax.
* `reference_generate`: `speculative_step` in a loop (randomness from a torch.Generator).
* `target_generate`: plain target-only decoding with a KV cache, one token per forward: the
  ground truth for greedy losslessness. Sampled tokens come from `sampling.sample` on
  `STREAM_TARGET` with offset = token index, which is exactly what `SpeculativeEngine` with
  draft=None draws, so the two agree token for token for the same seed as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache

from specdec.decode.sampling import (
    STREAM_TARGET,
    SamplingParams,
    SamplingTensors,
    apply_top_k_top_p,
    resolve_seed,
    sample,
)


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits -> the distribution the request samples from (float32)."""
    t = SamplingTensors.from_params([params], logits.device, seeds=[0])
    if t.needs_filter:
        logits = apply_top_k_top_p(logits[None], t.temperature, t.top_k, t.top_p)[0]
    return torch.softmax(logits.float() / params.temperature, dim=-1)


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from [vocab] logits: argmax when greedy, else a draw."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(_probs(logits, params), 1, generator=generator))


@torch.inference_mode()
def speculative_step(
    target,
    draft,
    input_ids: torch.Tensor,  # [1, n] int64: the prompt and everything committed so far
    k: int,
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[list[int], int]:
    """One speculative step. Returns (new tokens, number of accepted draft tokens)."""
    seq = input_ids
    draft_tokens, draft_logits = [], []
    for _ in range(k):  # draft k tokens autoregressively
        logits = draft(seq).logits[0, -1]  # [vocab]
        token = _pick(logits, params, generator)
        draft_tokens.append(token)
        draft_logits.append(logits)
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
    target_logits = target(seq).logits[0, -k - 1 :]  # [k + 1, vocab], one forward
    for i, token in enumerate(draft_tokens):  # verify
        if params.greedy:
            if int(target_logits[i].argmax()) == token:
                continue
            return draft_tokens[:i] + [int(target_logits[i].argmax())], i  # recovered
        target_probs = _probs(target_logits[i], params)
        draft_probs = _probs(draft_logits[i], params)
        ratio = target_probs[token] / draft_probs[token]
        if float(torch.rand((), generator=generator)) < float(ratio):
            continue
        residual = (target_probs - draft_probs).clamp(min=0)
        if float(residual.sum()) <= 0:  # draft == target here: the residual is empty
            residual = target_probs
        recovered = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return draft_tokens[:i] + [recovered], i
    return draft_tokens + [_pick(target_logits[k], params, generator)], k  # bonus


def _stop_ids(params: SamplingParams, eos_token_ids: Iterable[int]) -> set[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= set(eos_token_ids)
    return ids


def reference_generate(
    target,
    draft,
    prompt: list[int],
    params: SamplingParams,
    k: int = 4,
    eos_token_ids: Iterable[int] = (),
) -> tuple[list[int], list[int]]:
    """`speculative_step` until max_tokens or an EOS / stop token id.

    Returns (generated token ids, accepted count of every step). No stop strings.
    """
    generator = torch.Generator().manual_seed(resolve_seed(params))
    stop_ids = _stop_ids(params, eos_token_ids)
    device = next(target.parameters()).device
    out: list[int] = []
    accepted_per_step: list[int] = []
    while True:
        ids = torch.tensor([prompt + out], dtype=torch.int64, device=device)
        new, accepted = speculative_step(target, draft, ids, k, params, generator)
        accepted_per_step.append(accepted)
        for token in new:
            out.append(token)
            if token in stop_ids or len(out) >= params.max_tokens:
                return out, accepted_per_step


@torch.inference_mode()
def target_generate(
    target,
    prompt: list[int],
    params: SamplingParams,
    eos_token_ids: Iterable[int] = (),
) -> list[int]:
    """Target-only decoding with a KV cache, one token per forward (batch 1). No stop strings."""
    device = next(target.parameters()).device
    t = SamplingTensors.from_params([params], device)
    stop_ids = _stop_ids(params, eos_token_ids)
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([prompt], dtype=torch.int64, device=device)
    out: list[int] = []
    while True:
        logits = target(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        if t.needs_filter:
            logits = apply_top_k_top_p(logits, t.temperature, t.top_k, t.top_p)
        offsets = torch.full((1,), len(out), dtype=torch.int64, device=device)
        temperature = 0.0 if params.greedy else t.temperature
        token = int(sample(logits, temperature, t.seeds, offsets, stream=STREAM_TARGET))
        out.append(token)
        if token in stop_ids or len(out) >= params.max_tokens:
            return out
        ids = ids.new_tensor([[token]])
