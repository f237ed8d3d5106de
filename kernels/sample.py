"""Sampling verification: speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

For batch row b, position i < k, with temperature T (logits already top-k/top-p masked to -inf):

    target_probs = softmax(target_logits[b, i] / T),   draft_probs = softmax(draft_logits[b, i] / T)
    accept draft token x_i  iff  u_i * draft_probs(x_i) < target_probs(x_i)     (u_i ~ U(0, 1))

i.e. with probability min(1, target_probs / draft_probs) (the product form avoids dividing by
zero). At the first rejection the *recovered* token is drawn from the residual
``max(0, target_probs - draft_probs)`` (normalised implicitly); if all k are accepted the
*bonus* token is drawn from ``target_probs`` at position k. If the residual is zero everywhere
(target == draft) the recovered token is drawn from target_probs instead. The committed tokens
are then distributed exactly as the target's own samples, whatever the draft.

Sampling without normalising, by an exponential race: with E_x ~ Exp(1) i.i.d.,
``argmax_x w(x) / E_x`` is distributed as ``w / sum(w)`` (the Gumbel-max trick in another form).
Ties go to the lowest index. All randomness is counter-based (rng.py): u_i from
(seed, offset, i, stream 0), E_x from (seed, offset, i, stream 1, x).

Exact arithmetic shared by kernel and reference (so tokens agree bit for bit except on
floating-point near-ties, since exp/log/sum order differ by an ulp between backends):
``inv_T = 1 / T`` (computed once in torch), ``t = logit * inv_T``, ``mt = max t``,
``st = sum exp(t - mt)``, ``target_probs = exp(t - mt) * (1 / st)``, the same for the draft,
race scores ``residual / E`` and ``target_probs / E`` with IEEE division.

Triton path, grids ``(batch * (k + 1), num_splits)``, vocabulary tiled by ``BLOCK_V``:

1. ``sample_stats_kernel``: per vocab chunk, online max / sum of exp (fp32) of target and draft.
2. ``sample_race_kernel``: combines the chunk statistics, then races the residual and the
   target over its chunk (partial winners); chunk 0 also runs the acceptance test.
3. ``commit_kernel`` (common.py): reduces the winners, finds the first rejection, writes tokens.
"""

from __future__ import annotations

import torch

from . import rng
from .common import (
    VerifyOutput,
    check_int64,
    check_logits,
    check_range,
    check_same_device,
    check_triton_ready,
    commit_torch,
    commit_triton,
    next_pow2,
    plan_splits,
)
from .rng import HAS_TRITON, tl, triton

DEFAULT_BLOCK_V = 1024


def inverse_temperature(temperature, batch: int, device: torch.device) -> torch.Tensor:
    """float > 0 or [batch] float tensor -> [batch] fp32 tensor of 1 / T (shared by both paths)."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise ValueError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.dim() == 0:
            temperature = temperature.reshape(1).expand(batch)
        if tuple(temperature.shape) != (batch,):
            raise ValueError(
                f"temperature must be a float or a [batch] = ({batch},) tensor, "
                f"got shape {tuple(temperature.shape)}"
            )
        if temperature.device != device:
            raise ValueError(
                f"temperature is on {temperature.device} but the logits are on {device}; "
                "move it with .to()"
            )
        # checking values would synchronise a GPU: only done on the CPU
        if device.type != "cuda" and not bool((temperature > 0).all()):
            raise ValueError(
                "temperature must be > 0 in every row; use verify_greedy for temperature 0"
            )
        return (1.0 / temperature.to(torch.float32)).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(
            f"temperature must be a finite float > 0, got {temperature}; "
            "use verify_greedy for temperature 0"
        )
    t = torch.full((batch,), float(temperature), dtype=torch.float32, device=device)
    return 1.0 / t


def _validate(target_logits, draft_logits, draft_tokens, temperature, seeds, offsets):
    check_logits("target_logits", target_logits, 3, "[batch, k + 1, vocab]")
    batch, k1, vocab = target_logits.shape
    if k1 < 1:
        raise ValueError(f"target_logits needs k + 1 >= 1 positions, got {tuple(target_logits.shape)}")
    k = k1 - 1
    check_logits("draft_logits", draft_logits, 3, "[batch, k, vocab]")
    if tuple(draft_logits.shape) != (batch, k, vocab):
        raise ValueError(
            f"draft_logits must have shape [batch, k, vocab] = {(batch, k, vocab)} to match "
            f"target_logits {tuple(target_logits.shape)}, got {tuple(draft_logits.shape)}; "
            "draft and target must share one vocabulary (pad or slice the draft's logits)"
        )
    check_int64("draft_tokens", draft_tokens, (batch, k), "[batch, k]")
    check_int64("seeds", seeds, (batch,), "[batch]")
    check_int64("offsets", offsets, (batch,), "[batch]")
    check_same_device(
        target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens,
        seeds=seeds, offsets=offsets,
    )
    check_range("draft_tokens", draft_tokens, vocab)
    inv_t = inverse_temperature(temperature, batch, target_logits.device)
    return batch, k, vocab, inv_t


def _probs_torch(x: torch.Tensor) -> torch.Tensor:
    """fp32 scaled logits [..., vocab] -> exp(x - max) * (1 / sum), as the kernel computes it."""
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e * (1.0 / e.sum(dim=-1, keepdim=True))


def verify_sample_torch(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab] fp32 / bf16 / fp16
    draft_logits: torch.Tensor,  # [batch, k, vocab]
    draft_tokens: torch.Tensor,  # [batch, k] int64
    temperature,  # float > 0 or [batch] float tensor
    seeds: torch.Tensor,  # [batch] int64
    offsets: torch.Tensor,  # [batch] int64
) -> VerifyOutput:
    """Pure-torch reference of rejection-sampling verification (any device)."""
    batch, k, vocab, inv_t = _validate(
        target_logits, draft_logits, draft_tokens, temperature, seeds, offsets
    )
    scale = inv_t[:, None, None]
    target_probs = _probs_torch(target_logits.to(torch.float32) * scale)  # [batch, k + 1, vocab]
    draft_probs = _probs_torch(draft_logits.to(torch.float32) * scale)  # [batch, k, vocab]
    idx = draft_tokens[:, :, None]
    tp_x = target_probs[:, :k].gather(-1, idx)[..., 0]  # [batch, k]
    dp_x = draft_probs.gather(-1, idx)[..., 0]  # [batch, k]
    u = rng.acceptance_uniforms_torch(seeds, offsets, k)  # [batch, k]
    accepted = u * dp_x < tp_x
    exps = rng.race_exponentials_torch(seeds, offsets, k + 1, vocab)  # [batch, k + 1, vocab]
    no_draft = target_probs.new_zeros((batch, 1, vocab))  # position k races the target alone
    residual = (target_probs - torch.cat([draft_probs, no_draft], dim=1)).clamp_min(0.0)
    primary = residual / exps
    fallback = target_probs / exps
    candidates = torch.where(
        primary.amax(dim=-1) > 0, primary.argmax(dim=-1), fallback.argmax(dim=-1)
    )
    return commit_torch(candidates, accepted, draft_tokens)


if HAS_TRITON:
    from .common import reduce_argmax, reduce_max, reduce_sum

    @triton.jit
    def _online(m, s, x):
        """Fold one tile x (fp32, -inf padded) into a running (max, sum exp(x - max))."""
        m_new = tl.maximum(m, reduce_max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + reduce_sum(tl.exp(x - m_safe), 0)
        return m_new, s

    @triton.jit
    def sample_stats_kernel(
        target_ptr,  # [batch, k + 1, vocab]
        draft_ptr,  # [batch, k, vocab]
        inv_t_ptr,  # [batch] fp32
        part_ptr,  # [batch * (k + 1), 4, S] fp32 out: target max, target sum, draft max, draft sum
        K,
        V,
        S,
        CHUNK,
        BLOCK_V: tl.constexpr,
    ):
        r = tl.program_id(0)
        split = tl.program_id(1)
        b = r // (K + 1)
        i = r % (K + 1)
        has_draft = i < K
        d_limit = tl.where(has_draft, V, 0)  # position k has no draft row: mask all of it
        inv_t = tl.load(inv_t_ptr + b)
        t_base = target_ptr + r.to(tl.int64) * V
        d_base = draft_ptr + (b * K + i).to(tl.int64) * V
        offs = tl.arange(0, BLOCK_V)
        mt = tl.full((), float("-inf"), tl.float32)
        st = tl.full((), 0.0, tl.float32)
        md = tl.full((), float("-inf"), tl.float32)
        sd = tl.full((), 0.0, tl.float32)
        start = split * CHUNK
        for off in range(start, start + CHUNK, BLOCK_V):
            idx = off + offs
            mask = idx < V
            t = tl.load(t_base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            mt, st = _online(mt, st, t)
            d = tl.load(d_base + idx, mask=idx < d_limit, other=float("-inf")).to(tl.float32)
            md, sd = _online(md, sd, d * inv_t)
        out = part_ptr + r.to(tl.int64) * 4 * S + split
        tl.store(out, mt)
        tl.store(out + S, st)
        tl.store(out + 2 * S, md)
        tl.store(out + 3 * S, sd)

    @triton.jit
    def _combine(part_m, part_s, mask):
        """Chunk statistics [BLOCK_S] -> (max, 1 / sum) of the whole row (0 when empty)."""
        m = reduce_max(tl.where(mask, part_m, float("-inf")), 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = reduce_sum(tl.where(mask, part_s * tl.exp(part_m - m_safe), 0.0), 0)
        inv_s = tl.where(s > 0.0, tl.math.div_rn(1.0, tl.where(s > 0.0, s, 1.0)), 0.0)
        return m_safe, inv_s

    @triton.jit
    def sample_race_kernel(
        target_ptr,  # [batch, k + 1, vocab]
        draft_ptr,  # [batch, k, vocab]
        draft_tok_ptr,  # [batch, k] int64
        inv_t_ptr,  # [batch] fp32
        seed_ptr,  # [batch] int64
        offset_ptr,  # [batch] int64
        part_ptr,  # [batch * (k + 1), 4, S] fp32 (from sample_stats_kernel)
        val_ptr,  # [batch * (k + 1), S] fp32 out: best residual / E
        idx_ptr,  # [batch * (k + 1), S] int32 out
        fb_val_ptr,  # [batch * (k + 1), S] fp32 out: best target_probs / E
        fb_idx_ptr,  # [batch * (k + 1), S] int32 out
        accept_ptr,  # [batch, k] int32 out
        K,
        V,
        S,
        CHUNK,
        BLOCK_V: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        r = tl.program_id(0)
        split = tl.program_id(1)
        b = r // (K + 1)
        i = r % (K + 1)
        has_draft = i < K
        d_limit = tl.where(has_draft, V, 0)  # position k has no draft row: mask all of it
        inv_t = tl.load(inv_t_ptr + b)
        sp = tl.arange(0, BLOCK_S)
        smask = sp < S
        part = part_ptr + r.to(tl.int64) * 4 * S + sp
        mt, inv_st = _combine(tl.load(part, mask=smask), tl.load(part + S, mask=smask), smask)
        md, inv_sd = _combine(
            tl.load(part + 2 * S, mask=smask), tl.load(part + 3 * S, mask=smask), smask
        )
        inv_sd = tl.where(has_draft, inv_sd, 0.0)
        t_base = target_ptr + r.to(tl.int64) * V
        d_base = draft_ptr + (b * K + i).to(tl.int64) * V
        row_key = rng.row_key_tl(tl.load(seed_ptr + b), tl.load(offset_ptr + b))

        # acceptance test, once per (row, position)
        x = tl.load(draft_tok_ptr + b * K + i, mask=has_draft, other=0)
        tp_x = tl.exp(tl.load(t_base + x).to(tl.float32) * inv_t - mt) * inv_st
        d_x = tl.load(d_base + x, mask=has_draft, other=float("-inf")).to(tl.float32)
        dp_x = tl.exp(d_x * inv_t - md) * inv_sd
        acc_key = rng.stream_key_tl(row_key, i, 0)
        u = rng.uniform_tl(rng.element_hash_tl(acc_key, tl.full((), 0, tl.int32)))
        accepted = (u * dp_x < tp_x).to(tl.int32)
        tl.store(accept_ptr + b * K + i, accepted, mask=has_draft & (split == 0))

        # exponential races over this chunk: residual (recovered / bonus) and target (fallback)
        key = rng.stream_key_tl(row_key, i, 1)
        offs = tl.arange(0, BLOCK_V)
        best = tl.full((), -1.0, tl.float32)
        best_i = tl.full((), 0, tl.int32)
        fbest = tl.full((), -1.0, tl.float32)
        fbest_i = tl.full((), 0, tl.int32)
        start = split * CHUNK
        for off in range(start, start + CHUNK, BLOCK_V):
            idx = off + offs
            mask = idx < V
            t = tl.load(t_base + idx, mask=mask, other=float("-inf")).to(tl.float32)
            tp = tl.exp(t * inv_t - mt) * inv_st
            d = tl.load(d_base + idx, mask=idx < d_limit, other=float("-inf")).to(tl.float32)
            dp = tl.exp(d * inv_t - md) * inv_sd
            e = rng.exponential_tl(rng.element_hash_tl(key, idx))
            score = tl.where(mask, tl.math.div_rn(tl.maximum(tp - dp, 0.0), e), -1.0)
            fscore = tl.where(mask, tl.math.div_rn(tp, e), -1.0)
            m = reduce_max(score, 0)
            a = reduce_argmax(score, 0)
            better = m > best
            best_i = tl.where(better, off + a, best_i)
            best = tl.where(better, m, best)
            fm = reduce_max(fscore, 0)
            fa = reduce_argmax(fscore, 0)
            fbetter = fm > fbest
            fbest_i = tl.where(fbetter, off + fa, fbest_i)
            fbest = tl.where(fbetter, fm, fbest)
        out = r.to(tl.int64) * S + split
        tl.store(val_ptr + out, best)
        tl.store(idx_ptr + out, best_i)
        tl.store(fb_val_ptr + out, fbest)
        tl.store(fb_idx_ptr + out, fbest_i)


def _verify_sample_triton(
    target_logits, draft_logits, draft_tokens, temperature, seeds, offsets,
    block_v: int = DEFAULT_BLOCK_V, num_splits: int | None = None,
) -> VerifyOutput:
    batch, k, vocab, inv_t = _validate(
        target_logits, draft_logits, draft_tokens, temperature, seeds, offsets
    )
    check_triton_ready(
        target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens,
        seeds=seeds, offsets=offsets,
    )
    if batch == 0:
        return verify_sample_torch(target_logits, draft_logits, draft_tokens, temperature, seeds, offsets)
    rows = batch * (k + 1)
    if num_splits is None:
        splits, chunk = plan_splits(rows, vocab, block_v, target_logits.device)
    else:
        chunk = triton.cdiv(triton.cdiv(vocab, num_splits), block_v) * block_v
        splits = triton.cdiv(vocab, chunk)
    dev = target_logits.device
    part = torch.empty((rows, 4, splits), dtype=torch.float32, device=dev)
    val = torch.empty((batch, k + 1, splits), dtype=torch.float32, device=dev)
    idx = torch.empty((batch, k + 1, splits), dtype=torch.int32, device=dev)
    fb_val = torch.empty_like(val)
    fb_idx = torch.empty_like(idx)
    accept = torch.empty((batch, k), dtype=torch.int32, device=dev)
    grid = (rows, splits)
    warps = 8 if block_v >= 2048 else 4
    sample_stats_kernel[grid](
        target_logits, draft_logits, inv_t, part, k, vocab, splits, chunk,
        BLOCK_V=block_v, num_warps=warps, enable_fp_fusion=False,
    )
    sample_race_kernel[grid](
        target_logits, draft_logits, draft_tokens, inv_t, seeds, offsets, part,
        val, idx, fb_val, fb_idx, accept, k, vocab, splits, chunk,
        BLOCK_V=block_v, BLOCK_S=next_pow2(splits), num_warps=warps, enable_fp_fusion=False,
    )
    return commit_triton(val, idx, draft_tokens, fb_val, fb_idx, accept)


def verify_sample_triton(
    target_logits: torch.Tensor,  # [batch, k + 1, vocab] fp32 / bf16 / fp16, contiguous
    draft_logits: torch.Tensor,  # [batch, k, vocab], contiguous
    draft_tokens: torch.Tensor,  # [batch, k] int64
    temperature,  # float > 0 or [batch] float tensor
    seeds: torch.Tensor,  # [batch] int64
    offsets: torch.Tensor,  # [batch] int64
) -> VerifyOutput:
    """Triton rejection-sampling verification (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _verify_sample_triton(target_logits, draft_logits, draft_tokens, temperature, seeds, offsets)
