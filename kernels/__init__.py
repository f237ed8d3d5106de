"""Fused verification kernels for speculative decoding (installed as ``specdec.kernels``).

Public API (each dispatches once per process to Triton on CUDA or the torch reference, see
dispatch.py; ``SPECDEC_KERNELS=triton|torch`` forces one):

* ``verify_greedy(target_logits, draft_tokens) -> VerifyOutput``
* ``verify_sample(target_logits, draft_logits, draft_tokens, temperature, seeds, offsets)
  -> VerifyOutput``
* ``acceptance_stats(target_logits, draft_logits, temperature=1.0) -> (alpha, kl)``
* ``backend() -> "triton" | "torch"``

The references (``*_torch``) and the Triton launchers (``*_triton``) are exported as well; they
take the same arguments. Randomness is counter-based (rng.py), so both paths sample the same
tokens for the same (seeds, offsets).
"""

from __future__ import annotations

import torch

from .stats import acceptance_stats_torch, acceptance_stats_triton
from .common import VerifyOutput
from .dispatch import backend, choose_backend
from .dispatch import use_triton as _use_triton
from .greedy import verify_greedy_torch, verify_greedy_triton
from .sample import verify_sample_torch, verify_sample_triton


def verify_greedy(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab] fp32 / bf16 / fp16
    draft_tokens: torch.Tensor,  # [batch, k] int64
) -> VerifyOutput:
    """Greedy verification: accepted drafts match the target argmax; see greedy.py."""
    if _use_triton(target_logits):
        return verify_greedy_triton(target_logits, draft_tokens)
    return verify_greedy_torch(target_logits, draft_tokens)


def verify_sample(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab]
    draft_logits: torch.Tensor,  # [batch, k, vocab]
    draft_tokens: torch.Tensor,  # [batch, k] int64
    temperature,  # float > 0 or [batch] float tensor
    seeds: torch.Tensor,  # [batch] int64
    offsets: torch.Tensor,  # [batch] int64 (per-row step counter)
) -> VerifyOutput:
    """Rejection-sampling verification (lossless); see sample.py."""
    if _use_triton(target_logits):
        return verify_sample_triton(
            target_logits, draft_logits, draft_tokens, temperature, seeds, offsets
        )
    return verify_sample_torch(target_logits, draft_logits, draft_tokens, temperature, seeds, offsets)


def acceptance_stats(
    target_logits: torch.Tensor,  # [n, vocab]
    draft_logits: torch.Tensor,  # [n, vocab]
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha [n], kl [n]) fp32: expected acceptance 1 - TV and KL(target || draft)."""
    if _use_triton(target_logits):
        return acceptance_stats_triton(target_logits, draft_logits, temperature)
    return acceptance_stats_torch(target_logits, draft_logits, temperature)


__all__ = [
    "VerifyOutput",
    "acceptance_stats",
    "acceptance_stats_torch",
    "acceptance_stats_triton",
    "backend",
    "choose_backend",
    "verify_greedy",
    "verify_greedy_torch",
    "verify_greedy_triton",
    "verify_sample",
    "verify_sample_torch",
    "verify_sample_triton",
]
