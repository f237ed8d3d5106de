"""Per-position acceptance statistics of a draft against its target, straight from the logits.

For each row n (one token position), with temperature T:

    target_probs = softmax(target_logits[n] / T),  draft_probs = softmax(draft_logits[n] / T)
    alpha[n] = sum_x min(target_probs, draft_probs)      (= 1 - TV: expected acceptance)
    kl[n]    = KL(target_probs || draft_probs) = sum_x target_probs * (log target_probs - log draft_probs)

alpha is the probability that speculative sampling accepts the draft's token at this position
(Leviathan et al.); the teacher-forced acceptance metrics average it over a corpus.

Triton path, one program per row, vocabulary tiled by ``BLOCK_V``, fp32 accumulation, no
probability tensor is ever written:

1. pass 1: online max and sum of exp for both rows (running max, rescaled running sum);
2. pass 2: with ``log Z = max + log(sum)`` known, ``log target_probs = t - log Zt`` per tile;
   accumulate ``min(target_probs, draft_probs)`` and ``target_probs * (log target_probs -
   log draft_probs)`` (terms with target_probs = 0 contribute 0; a token the draft masked but
   the target did not makes kl = +inf, as it should).
"""

from __future__ import annotations

import torch

from .common import check_logits, check_same_device, check_triton_ready
from .rng import HAS_TRITON, tl, triton

DEFAULT_BLOCK_V = 2048


def _validate(target_logits, draft_logits, temperature) -> tuple[int, int]:
    check_logits("target_logits", target_logits, 2, "[n, vocab]")
    check_logits("draft_logits", draft_logits, 2, "[n, vocab]")
    if draft_logits.shape != target_logits.shape:
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} must match target_logits "
            f"{tuple(target_logits.shape)}; flatten [batch, seq, vocab] with .reshape(-1, vocab) "
            "and make sure draft and target share one vocabulary"
        )
    check_same_device(target_logits=target_logits, draft_logits=draft_logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    return target_logits.shape


def acceptance_stats_torch(
    target_logits: torch.Tensor,  # [n, vocab] fp32 / bf16 / fp16
    draft_logits: torch.Tensor,  # [n, vocab]
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: (alpha [n] fp32, kl [n] fp32)."""
    _validate(target_logits, draft_logits, temperature)
    inv_t = 1.0 / temperature
    target_logp = torch.log_softmax(target_logits.to(torch.float32) * inv_t, dim=-1)
    draft_logp = torch.log_softmax(draft_logits.to(torch.float32) * inv_t, dim=-1)
    target_probs, draft_probs = target_logp.exp(), draft_logp.exp()
    alpha = torch.minimum(target_probs, draft_probs).sum(dim=-1)
    terms = torch.where(target_probs > 0, target_probs * (target_logp - draft_logp), 0.0)
    return alpha, terms.sum(dim=-1)


if HAS_TRITON:
    from .common import reduce_max, reduce_sum

    @triton.jit
    def _online(m, s, x):
        m_new = tl.maximum(m, reduce_max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + reduce_sum(tl.exp(x - m_safe), 0)
        return m_new, s

    @triton.jit
    def acceptance_stats_kernel(
        target_ptr,  # [n, vocab]
        draft_ptr,  # [n, vocab]
        alpha_ptr,  # [n] fp32 out
        kl_ptr,  # [n] fp32 out
        V,
        inv_t,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t_base = target_ptr + row * V
        d_base = draft_ptr + row * V
        offs = tl.arange(0, BLOCK_V)
        mt = tl.full((), float("-inf"), tl.float32)
        st = tl.full((), 0.0, tl.float32)
        md = tl.full((), float("-inf"), tl.float32)
        sd = tl.full((), 0.0, tl.float32)
        for off in range(0, V, BLOCK_V):
            idx = off + offs
            mask = idx < V
            t = tl.load(t_base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            d = tl.load(d_base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            mt, st = _online(mt, st, t)
            md, sd = _online(md, sd, d)
        log_zt = mt + tl.log(st)
        log_zd = md + tl.log(sd)
        alpha = tl.full((BLOCK_V,), 0.0, tl.float32)
        kl = tl.full((BLOCK_V,), 0.0, tl.float32)
        for off in range(0, V, BLOCK_V):
            idx = off + offs
            mask = idx < V
            t = tl.load(t_base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            d = tl.load(d_base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            t_logp = t - log_zt
            d_logp = d - log_zd
            tp = tl.exp(t_logp)
            alpha += tl.minimum(tp, tl.exp(d_logp))
            # clamp keeps -inf - -inf (masked in both) out of the arithmetic; those terms are 0
            diff = tl.where(tp > 0.0, tl.maximum(t_logp, -1.0e30) - d_logp, 0.0)
            kl += tp * diff
        tl.store(alpha_ptr + row, reduce_sum(alpha, 0))
        tl.store(kl_ptr + row, reduce_sum(kl, 0))


def _acceptance_stats_triton(
    target_logits, draft_logits, temperature: float = 1.0, block_v: int = DEFAULT_BLOCK_V
) -> tuple[torch.Tensor, torch.Tensor]:
    n, vocab = _validate(target_logits, draft_logits, temperature)
    check_triton_ready(target_logits=target_logits, draft_logits=draft_logits)
    alpha = torch.empty((n,), dtype=torch.float32, device=target_logits.device)
    kl = torch.empty((n,), dtype=torch.float32, device=target_logits.device)
    if n == 0:
        return alpha, kl
    acceptance_stats_kernel[(n,)](
        target_logits, draft_logits, alpha, kl, vocab, 1.0 / temperature,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, enable_fp_fusion=False,
    )
    return alpha, kl


def acceptance_stats_triton(
    target_logits: torch.Tensor,  # [n, vocab] fp32 / bf16 / fp16, contiguous
    draft_logits: torch.Tensor,  # [n, vocab], contiguous
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton acceptance statistics (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _acceptance_stats_triton(target_logits, draft_logits, temperature)
