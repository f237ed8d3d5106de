"""Knowledge-distillation losses for healing a draft, and the online teacher.

Two divergences between target_probs and draft_probs at temperature T, summed over response
tokens (each in fp32):

- KL(target || draft), the usual KD term, weighted kd * T^2;
- total variation TV = 1/2 sum |target_probs - draft_probs|, weighted kd_tv. 1 - TV is the
  expected acceptance alpha of speculative decoding, so this term trains what decoding accepts.

Either is computed on the full vocabulary (`TopK` absent: the teacher's logits are at hand), or
on the (k + 1)-way partition of the vocabulary into the target's top-k ids and one bucket for
everything else (the residual mass). On that partition both are proper divergences between two
distributions, and the target side needs only k ids, k log-probs and one residual log-prob per
token: what `specdec.logit_cache` stores, so cached and online KD compute the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopK:
    """The target's distribution at temperature T on a (k + 1)-way partition, per token."""

    ids: torch.Tensor  # [n_tokens, k] int64: the target's top-k token ids
    logprobs: torch.Tensor  # [n_tokens, k] fp32: target log-probs of those ids
    residual: torch.Tensor  # [n_tokens] fp32: log of the target mass outside them (-inf: none)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device) -> "TopK":
        return TopK(self.ids.to(device), self.logprobs.to(device), self.residual.to(device))


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """Logits at the loss positions only: [n_response_tokens, vocab]. The LM head runs on the
    selected hidden states, not the whole sequence (the prompt needs no logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state  # [batch, seq, hidden]
    return base.get_output_embeddings()(hidden[loss_mask])


def topk_of(target_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The top-k partition of target_probs = softmax(target_logits / T), exactly (the residual
    is a log-sum-exp over the other ids, not 1 - sum). target_logits: [n_tokens, vocab]."""
    target_logp = F.log_softmax(target_logits.float() / temperature, dim=-1)
    k = min(k, target_logp.shape[-1] - 1)  # the residual bucket is never empty of ids
    logprobs, ids = target_logp.topk(k, dim=-1, sorted=True)
    residual = target_logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopK(ids, logprobs, residual)


def _partition(draft_logits: torch.Tensor, target: TopK, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, draft) log-probs on the partition: [n_tokens, k + 1], the last column the
    residual bucket."""
    draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)  # [n, vocab]
    ids = target.ids.long()
    draft_top = draft_logp.gather(-1, ids)
    draft_rest = draft_logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    target_part = torch.cat([target.logprobs.float(), target.residual.float()[:, None]], -1)
    return target_part, torch.cat([draft_top, draft_rest[:, None]], -1)


def _kl(target_logp: torch.Tensor, draft_logp: torch.Tensor) -> torch.Tensor:
    """sum target_probs * (log target_probs - log draft_probs), with 0 log 0 = 0."""
    target_probs = target_logp.exp()
    terms = target_probs * (target_logp - draft_logp)
    return torch.where(target_probs > 0, terms, torch.zeros_like(terms)).sum()


def kd_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor,
          temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of KL(target_probs || draft_probs) on the full vocabulary at
    `temperature`, in fp32. draft_logits, target_logits: [n_tokens, vocab]."""
    draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)
    target_logp = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return _kl(target_logp, draft_logp)


def kd_losses(draft_logits: torch.Tensor, target: torch.Tensor | TopK,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(target || draft), TV(target, draft)), each summed over tokens, in fp32.

    draft_logits: [n_tokens, vocab]; target: the target's logits [n_tokens, vocab] (full
    vocabulary) or its `TopK` partition (both sides on the k + 1 buckets)."""
    if isinstance(target, TopK):
        target_logp, draft_logp = _partition(draft_logits, target, temperature)
    else:
        draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)
        target_logp = F.log_softmax(target.float() / temperature, dim=-1)
    tv = 0.5 * (target_logp.exp() - draft_logp.exp()).abs().sum()
    return _kl(target_logp, draft_logp), tv


class OnlineTeacher:
    """The target run on every micro-batch (no gradients): its logits at the loss positions,
    or their top-k partition when `top_k` is set."""

    def __init__(self, model, top_k: int | None, temperature: float, autocast):
        self.model, self.top_k, self.temperature, self.autocast = model, top_k, temperature, \
            autocast

    def __call__(self, examples, input_ids, attention_mask, loss_mask) -> torch.Tensor | TopK:
        with torch.no_grad(), self.autocast:
            logits = response_logits(self.model, input_ids, attention_mask, loss_mask)
        if self.top_k is None:
            return logits
        return topk_of(logits, self.top_k, self.temperature)
