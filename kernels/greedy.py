"""Greedy verification: argmax of the target logits fused with the comparison to the drafts.

For each batch row and target position i (0..k) the target's greedy token is
``argmax_x target_logits[b, i, x]`` (ties: lowest index, as ``torch.argmax``). Draft token i is
accepted while it equals the target's token at i; the first mismatch emits the target's token
there (the *recovered* token); if all k match, the target's token at position k is the *bonus*.
Committed tokens are therefore exactly what the target alone would have decoded greedily.

Triton path (memory-bound; every logit is read once, in its own dtype):

1. ``greedy_argmax_kernel``, grid ``(batch * (k + 1), num_splits)``: each program scans one
   vocabulary chunk of one row in ``BLOCK_V`` tiles, keeping a running (max, index) with
   strict ``>`` across tiles and a first-index argmax inside a tile, so the lowest
   index wins ties. Splitting the vocabulary keeps the GPU busy at batch 1.
2. ``commit_kernel`` (common.py), one program per batch row: reduces the chunks, compares with
   the draft tokens, finds the first mismatch and writes tokens / num_accepted.

NaN logits are not supported (torch.argmax would pick the NaN; the kernel ignores it).
"""

from __future__ import annotations

import torch

from .common import (
    VerifyOutput,
    check_int64,
    check_logits,
    check_range,
    check_same_device,
    check_triton_ready,
    commit_torch,
    commit_triton,
    plan_splits,
)
from .rng import HAS_TRITON, tl, triton

DEFAULT_BLOCK_V = 2048


def _validate(target_logits, draft_tokens) -> tuple[int, int, int]:
    check_logits("target_logits", target_logits, 3, "[batch, k + 1, vocab]")
    batch, k1, vocab = target_logits.shape
    if k1 < 1:
        raise ValueError(f"target_logits needs k + 1 >= 1 positions, got shape {tuple(target_logits.shape)}")
    check_int64("draft_tokens", draft_tokens, (batch, k1 - 1), "[batch, k]")
    check_same_device(target_logits=target_logits, draft_tokens=draft_tokens)
    check_range("draft_tokens", draft_tokens, vocab)
    return batch, k1 - 1, vocab


def verify_greedy_torch(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab] fp32 / bf16 / fp16
    draft_tokens: torch.Tensor,  # [batch, k] int64
) -> VerifyOutput:
    """Pure-torch reference of greedy verification (any device)."""
    _validate(target_logits, draft_tokens)
    target_tokens = target_logits.argmax(dim=-1)  # [batch, k + 1]
    accepted = target_tokens[:, :-1] == draft_tokens  # [batch, k]
    return commit_torch(target_tokens, accepted, draft_tokens)


if HAS_TRITON:
    from .common import reduce_argmax, reduce_max

    @triton.jit
    def greedy_argmax_kernel(
        logits_ptr,  # [rows, vocab] any float dtype, contiguous
        part_val_ptr,  # [rows, S] fp32 out
        part_idx_ptr,  # [rows, S] int32 out
        V,
        S,
        CHUNK,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        start = split * CHUNK
        base = logits_ptr + row * V
        offs = tl.arange(0, BLOCK_V)
        best_val = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        for off in range(start, start + CHUNK, BLOCK_V):
            idx = off + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            m = reduce_max(x, 0)
            a = reduce_argmax(x, 0)
            better = m > best_val
            best_idx = tl.where(better, off + a, best_idx)
            best_val = tl.where(better, m, best_val)
        tl.store(part_val_ptr + row * S + split, best_val)
        tl.store(part_idx_ptr + row * S + split, best_idx)


def _verify_greedy_triton(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab]
    draft_tokens: torch.Tensor,  # [batch, k] int64
    block_v: int = DEFAULT_BLOCK_V,
    num_splits: int | None = None,
) -> VerifyOutput:
    batch, k, vocab = _validate(target_logits, draft_tokens)
    check_triton_ready(target_logits=target_logits, draft_tokens=draft_tokens)
    if batch == 0:
        return verify_greedy_torch(target_logits, draft_tokens)
    rows = batch * (k + 1)
    if num_splits is None:
        splits, chunk = plan_splits(rows, vocab, block_v, target_logits.device)
    else:
        chunk = triton.cdiv(triton.cdiv(vocab, num_splits), block_v) * block_v
        splits = triton.cdiv(vocab, chunk)
    dev = target_logits.device
    part_val = torch.empty((batch, k + 1, splits), dtype=torch.float32, device=dev)
    part_idx = torch.empty((batch, k + 1, splits), dtype=torch.int32, device=dev)
    greedy_argmax_kernel[(rows, splits)](
        target_logits, part_val, part_idx, vocab, splits, chunk,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, enable_fp_fusion=False,
    )
    return commit_triton(part_val, part_idx, draft_tokens)


def verify_greedy_triton(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab] fp32 / bf16 / fp16, contiguous
    draft_tokens: torch.Tensor,  # [batch, k] int64, contiguous
) -> VerifyOutput:
    """Triton greedy verification (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _verify_greedy_triton(target_logits, draft_tokens)
