"""Shared pieces of the verification kernels: the output type, input checks, and the commit step.

Verification of one speculative step, for each batch row, looks at k draft tokens and k + 1
target positions and produces:

* accepted tokens: the leading draft tokens that pass the test (argmax match for greedy, the
  rejection-sampling test for sampling), ``num_accepted`` of them (0..k);
* then exactly one more token: the *recovered* token at the first rejected position, or the
  *bonus* token from target position k when all k drafts are accepted.

Both kernel families split the work the same way: a per-(row, position, vocab chunk) kernel
produces, for every position, a partial "best candidate" (value, index) per vocabulary chunk;
the commit kernel here (one program per batch row) reduces the chunks (max value, lowest index
on ties, exactly like ``torch.argmax``), finds the first rejection and writes ``tokens``
``[batch, k + 1]`` (-1 after the committed ones) and ``num_accepted`` ``[batch]``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .rng import HAS_TRITON, tl, triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class VerifyOutput:
    tokens: torch.Tensor  # [batch, k + 1] int64: accepted drafts, then recovered/bonus, then -1
    num_accepted: torch.Tensor  # [batch] int64, 0..k (a row commits num_accepted + 1 tokens)


# ------------------------------------------------------------------------------------ validation


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_logits(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(
            f"{name} must have shape {shape_doc}, got {tuple(x.shape)}; "
            f"reshape it to {ndim} dimensions"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got {x.dtype}; cast it with .float()"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension {tuple(x.shape)}")


def check_int64(name: str, x, shape: tuple[int, ...], shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {x.dtype}; convert it with .long()")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}; move them with .to()")


def check_triton_ready(**tensors: torch.Tensor) -> None:
    """The Triton launchers need triton, and CUDA tensors unless TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        raise ValueError(
            "triton is not installed; install it (Linux) or use the torch reference "
            "(SPECDEC_KERNELS=torch)"
        )
    for name, t in tensors.items():
        if not interpreting() and t.device.type != "cuda":
            raise ValueError(
                f"{name} is on {t.device}, but the Triton kernels need CUDA tensors; move the "
                "inputs to the GPU, set TRITON_INTERPRET=1 (slow CPU interpreter, for tests), "
                "or use the torch reference (SPECDEC_KERNELS=torch)"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")


def check_range(name: str, tokens: torch.Tensor, vocab: int) -> None:
    """Token ids in [0, vocab); skipped on CUDA because it would synchronise the device."""
    if tokens.device.type == "cuda" or tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{name} holds token ids in [{lo}, {hi}] but the vocabulary has {vocab} entries; "
            "the draft and target must share one tokenizer"
        )


# -------------------------------------------------------------------------------- commit (torch)


def commit_torch(
    candidates: torch.Tensor,  # [batch, k + 1] int64: the token each position would emit
    accepted: torch.Tensor,  # [batch, k] bool: per-position test result
    draft_tokens: torch.Tensor,  # [batch, k] int64
) -> VerifyOutput:
    """Accepted prefix of draft tokens, then the candidate at the first rejection, then -1."""
    batch, k1 = candidates.shape
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [batch]
    pos = torch.arange(k1, device=candidates.device)[None, :]
    n = num_accepted[:, None]
    padded_draft = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(pos < n, padded_draft, torch.where(pos == n, candidates, -1))
    return VerifyOutput(tokens=tokens, num_accepted=num_accepted)


# ------------------------------------------------------------------------------- commit (triton)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def plan_splits(rows: int, vocab: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, chunk): split the vocabulary so that about 4 programs per SM run at once.

    chunk is a multiple of block_v; num_splits = ceil(vocab / chunk) (no empty chunk).
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # interpreter: still exercise the split path, but keep programs few
    blocks = triton.cdiv(vocab, block_v)
    want = min(blocks, 64, max(1, triton.cdiv(4 * sms, rows)))
    chunk = triton.cdiv(blocks, want) * block_v
    return triton.cdiv(vocab, chunk), chunk


if HAS_TRITON:
    # Reductions: tl.reduce with triton's own standard combine functions, which the CPU
    # interpreter recognises and runs in numpy. Not tl.max / tl.argmax / tl.sum themselves:
    # those are jit functions fixed as interpreted-or-compiled when triton is first imported,
    # so they break the interpreter whenever triton was imported (e.g. by transformers) before
    # TRITON_INTERPRET=1 was set. On the GPU this is exactly what tl.max / tl.argmax compile to.
    # If a future triton renames the private combine functions, ours are used (same results,
    # only the interpreter gets slower).

    @triton.jit
    def _own_max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _own_min(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _own_sum(a, b):
        return a + b

    @triton.jit
    def _own_argmax(v1, i1, v2, i2):
        take2 = (v2 > v1) | ((v2 == v1) & (i2 < i1))  # lowest index wins ties
        return tl.where(take2, v2, v1), tl.where(take2, i2, i1)

    _std = tl.standard
    _max_combine = getattr(_std, "_elementwise_max", _own_max)
    _min_combine = getattr(_std, "_elementwise_min", _own_min)
    _sum_combine = getattr(_std, "_sum_combine", _own_sum)
    _argmax_combine = getattr(_std, "_argmax_combine_tie_break_left", _own_argmax)

    @triton.jit
    def reduce_max(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _max_combine)

    @triton.jit
    def reduce_min(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _min_combine)

    @triton.jit
    def reduce_sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _sum_combine)

    @triton.jit
    def reduce_argmax(x, axis: tl.constexpr):
        """Index of the first maximum of a 1-D tile (as torch.argmax; NaN unsupported)."""
        idx = tl.arange(0, x.shape[0])
        _, i = tl.reduce((x, idx), axis, _argmax_combine)
        return i

    @triton.jit
    def commit_kernel(
        part_val_ptr,  # [batch, k + 1, S] fp32: per-chunk best value
        part_idx_ptr,  # [batch, k + 1, S] int32: per-chunk best index
        fb_val_ptr,  # [batch, k + 1, S] fp32: fallback race (SAMPLE only)
        fb_idx_ptr,  # [batch, k + 1, S] int32
        accept_ptr,  # [batch, k] int32 (SAMPLE only)
        draft_ptr,  # [batch, k] int64
        tokens_ptr,  # [batch, k + 1] int64 out
        num_acc_ptr,  # [batch] int64 out
        K,
        S,
        SAMPLE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pos = tl.arange(0, BLOCK_K)
        sp = tl.arange(0, BLOCK_S)
        pmask = pos < K + 1
        m2 = pmask[:, None] & (sp[None, :] < S)
        off2 = b * (K + 1) * S + pos[:, None] * S + sp[None, :]
        big = 2147483647
        val = tl.load(part_val_ptr + off2, mask=m2, other=float("-inf"))
        idx = tl.load(part_idx_ptr + off2, mask=m2, other=big)
        vmax = reduce_max(val, 1)
        cand = reduce_min(tl.where((val == vmax[:, None]) & m2, idx, big), 1)
        if SAMPLE:
            # a residual that is zero everywhere (target == draft) falls back to the target race
            fval = tl.load(fb_val_ptr + off2, mask=m2, other=float("-inf"))
            fidx = tl.load(fb_idx_ptr + off2, mask=m2, other=big)
            fmax = reduce_max(fval, 1)
            fcand = reduce_min(tl.where((fval == fmax[:, None]) & m2, fidx, big), 1)
            cand = tl.where(vmax > 0.0, cand, fcand)
        dmask = pos < K
        draft = tl.load(draft_ptr + b * K + pos, mask=dmask, other=-1)
        if SAMPLE:
            acc = tl.load(accept_ptr + b * K + pos, mask=dmask, other=0) != 0
        else:
            acc = (cand.to(tl.int64) == draft) & dmask
        # first rejected position (K when all are accepted)
        n = reduce_min(tl.where(acc, BLOCK_K, pos), 0)
        n = tl.minimum(n, K)
        out = tl.where(pos < n, draft, tl.where(pos == n, cand.to(tl.int64), -1))
        tl.store(tokens_ptr + b * (K + 1) + pos, out, mask=pmask)
        tl.store(num_acc_ptr + b, n.to(tl.int64))


def commit_triton(
    part_val: torch.Tensor,  # [batch, k + 1, S] fp32
    part_idx: torch.Tensor,  # [batch, k + 1, S] int32
    draft_tokens: torch.Tensor,  # [batch, k] int64
    fb_val: torch.Tensor | None = None,  # [batch, k + 1, S] fp32 (sampling)
    fb_idx: torch.Tensor | None = None,  # [batch, k + 1, S] int32 (sampling)
    accept: torch.Tensor | None = None,  # [batch, k] int32 (sampling)
) -> VerifyOutput:
    batch, k1, splits = part_val.shape
    k = k1 - 1
    tokens = torch.empty((batch, k1), dtype=torch.int64, device=part_val.device)
    num_acc = torch.empty((batch,), dtype=torch.int64, device=part_val.device)
    sample = accept is not None
    commit_kernel[(batch,)](
        part_val,
        part_idx,
        fb_val if sample else part_val,
        fb_idx if sample else part_idx,
        accept if sample else draft_tokens,
        draft_tokens,
        tokens,
        num_acc,
        k,
        splits,
        SAMPLE=sample,
        BLOCK_K=next_pow2(k1),
        BLOCK_S=next_pow2(splits),
        num_warps=1,
        enable_fp_fusion=False,
    )
    return VerifyOutput(tokens=tokens, num_accepted=num_acc)
