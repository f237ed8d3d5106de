"""A Hugging Face DynamicCache for a batch whose rows keep different numbers of tokens.

Speculative decoding appends k + 1 (target) or up to k (draft) slots per step to every row,
then rows reject different numbers of them. `BatchKV` keeps one shared cache width W and a
validity mask instead of per-row lengths:

* ``valid`` [batch, W] bool marks the slots holding a committed token. Left padding of shorter
  prompts, rejected draft slots (holes) and "no token here" input slots are False.
* Positions are per row: a token's position id is the number of valid slots before it, so
  RoPE sees every row as a contiguous sequence whatever its holes (keys are stored already
  rotated, so a slot never has to move for its position to stay right).
* The forward gets a 4D mask: causal over slots AND ``valid`` (built here for the sdpa and
  eager attention implementations, a 2D padding mask for the others). When no row has a hole
  the mask is omitted altogether (batch 1 always: Hugging Face then uses sdpa's is_causal).
* Rollback (`reject`) flips the rejected slots to invalid and crops the columns that are
  invalid in every row with ``DynamicCache.crop`` -- nothing is recomputed. At batch 1 this
  *is* ``crop``: the rejected slots are always the trailing ones.
* Holes left by rows that accepted less than the best row cost attention width; `compact`
  gathers every row's valid slots right-aligned into a narrower cache when the waste exceeds a
  threshold (one gather per layer, a few times per generation).
* Finished rows leave the batch with `select` (``batch_select_indices``).

Host/device split: the number of valid slots per row is known on the host (``lengths``), kept
in step with the device tensors from host-known acceptance counts, so deciding whether a mask
is needed, how much to crop and when to compact never reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

MASK_4D_IMPLEMENTATIONS = ("sdpa", "eager")


class BatchKV:
    def __init__(self, model, batch: int, device: torch.device):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.device = device
        self.valid = torch.zeros((batch, 0), dtype=torch.bool, device=device)  # [batch, W]
        self.next_pos = torch.zeros((batch,), dtype=torch.int64, device=device)  # [batch]
        self.lengths = [0] * batch  # host: valid slots per row (== next position id)
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        self.mask_4d = attn in MASK_4D_IMPLEMENTATIONS
        self.additive_mask = attn == "eager"
        self.dtype = next(model.parameters()).dtype

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, q] int64
        input_valid: torch.Tensor | None = None,  # [batch, q] bool; None = all valid
        n_valid: Sequence[int] | None = None,  # host: input_valid.sum(1); None = all valid
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run the model on q new slots per row; returns logits [batch, q or logits_to_keep, vocab]."""
        batch, q = input_ids.shape
        if input_valid is None:
            positions = self.next_pos[:, None] + torch.arange(q, device=self.device)[None, :]
            new_valid = torch.ones((batch, q), dtype=torch.bool, device=self.device)
            n_valid = [q] * batch
        else:
            positions = (self.next_pos[:, None] + input_valid.cumsum(1) - 1).clamp(min=0)
            new_valid = input_valid
        width = self.width
        needs_mask = any(length + n < width + q for length, n in zip(self.lengths, n_valid))
        mask = self._mask(torch.cat([self.valid, new_valid], dim=1), q) if needs_mask else None
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + (q if input_valid is None else input_valid.sum(1))
        self.lengths = [length + n for length, n in zip(self.lengths, n_valid)]
        return out.logits

    def _mask(self, kv_valid: torch.Tensor, q: int) -> torch.Tensor:
        """kv_valid [batch, W + q] -> the attention mask the model's attention expects."""
        if not self.mask_4d:
            return kv_valid.long()  # 2D padding mask; Hugging Face adds causality
        kv = kv_valid.shape[1]
        q_slots = torch.arange(kv - q, kv, device=self.device)
        causal = torch.arange(kv, device=self.device)[None, :] <= q_slots[:, None]  # [q, kv]
        mask = kv_valid[:, None, None, :] & causal[None, None, :, :]  # [batch, 1, q, kv]
        if self.additive_mask:
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            return torch.where(mask, zero, torch.finfo(self.dtype).min)
        return mask

    def reject(self, tail: int, keep: torch.Tensor, kept: Sequence[int]) -> None:
        """Roll back the last `tail` slots where keep [batch, tail] is False.

        ``keep`` must only be True on slots that are currently valid; ``kept`` is
        keep.sum(1) on the host. Columns invalid in every row are cropped from the cache.
        """
        if tail == 0:
            return
        width = self.width
        rejected = [tail - n for n in kept]
        self.valid = torch.cat([self.valid[:, : width - tail], keep], dim=1)
        self.next_pos = self.next_pos - (tail - keep.sum(1))
        self.lengths = [length - r for length, r in zip(self.lengths, rejected)]
        # trailing columns rejected by every row: with kept slots a prefix of the tail,
        # tail - max(kept) columns are empty
        crop = tail - max(kept) if kept else tail
        if crop > 0:
            self.cache.crop(-crop)
            self.valid = self.valid[:, : width - crop]

    def select(self, rows: torch.Tensor, host_rows: Sequence[int]) -> None:
        """Keep only `rows` of the batch ([n] int64 on the device, `host_rows` the same)."""
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]
        self.lengths = [self.lengths[i] for i in host_rows]

    def waste(self) -> int:
        """Slots per row that hold no token in any row's longest sequence."""
        return self.width - max(self.lengths, default=0)

    def compact(self) -> None:
        """Move every row's valid slots to the right end of a cache of width max(lengths)."""
        new_width = max(self.lengths, default=0)
        if new_width == self.width:
            return
        # stable sort by validity: invalid slots first, valid ones after in their order
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices
        index = order[:, self.width - new_width :]  # [batch, new_width]
        self.valid = self.valid.gather(1, index)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
