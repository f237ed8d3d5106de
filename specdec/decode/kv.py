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
  the mask is omitted altogether (the forward then applies plain causality).
* Dense state: while every slot of every row is valid (batch 1 always, and batches whose rows
  all kept the same counts) ``valid`` and ``next_pos`` are not kept at all (None): positions
  are ``width + arange(q)``, no mask, and rollback is a crop. The first hole materializes them.
* Rollback (`reject`) flips the rejected slots to invalid and crops the columns that are
  invalid in every row with ``DynamicCache.crop`` -- nothing is recomputed, and with
  `SlabLayer`s nothing is copied either. At batch 1 this *is* ``crop``: the rejected slots are
  always the trailing ones.
* Layers are `SlabLayer`s: preallocated buffers written in place, instead of Hugging Face's
  DynamicLayer, which concatenates (copies) the whole layer cache at every forward.
* The model is called through `forward.model_forward`: the lean Llama forward where it
  computes exactly what ``model(...)`` does, else ``model(...)`` itself.
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
from transformers.cache_utils import DynamicLayer

from specdec.decode.forward import LeanLlamaForward, model_forward

MASK_4D_IMPLEMENTATIONS = ("sdpa", "eager")


class SlabLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a preallocated buffer.

    Hugging Face's DynamicLayer concatenates every new slot onto a fresh tensor: a full copy of
    the layer's cache (and a large allocation) per layer per forward. Here ``update`` writes the
    new slots in place and returns ``buffer[:, :, :length]``; ``crop`` only moves ``length``.
    The buffer starts ``headroom`` slots past what the prompt needs and grows geometrically,
    never past ``capacity`` (the width the engine expects at most) unless a forward needs more,
    so a generation reallocates a few times at most and never holds more than twice what it
    uses. ``keys`` / ``values`` are the valid views, so code reading them sees a normal layer.
    """

    headroom = 256

    def __init__(self, capacity: int = 0, **kwargs):
        self._k: torch.Tensor | None = None  # [batch, kv_heads, allocated, head_dim]
        self._v: torch.Tensor | None = None
        self.length = 0
        self.capacity = capacity
        super().__init__(**kwargs)

    # DynamicLayer's code assigns keys/values (None on init and reset); they are derived here
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("SlabLayer.keys is a view of its buffer; use update / crop")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SlabLayer.values is a view of its buffer; use update / crop")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.length = 0
        need = key_states.shape[-2]
        size = need + self.headroom
        if self.capacity >= need:
            size = min(size, self.capacity)
        self._alloc(key_states, value_states, size)
        self.is_initialized = True

    def _alloc(self, key_states: torch.Tensor, value_states: torch.Tensor, size: int) -> None:
        b, h, _, dk = key_states.shape
        k = key_states.new_empty((b, h, size, dk))
        v = value_states.new_empty((b, h, size, value_states.shape[-1]))
        if self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._grow(end)
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def _grow(self, end: int) -> None:
        """Make the buffers hold at least `end` slots (geometric growth, capped at capacity)."""
        allocated = self._k.shape[2]
        if end > allocated:
            size = max(end, 2 * allocated)
            if end <= self.capacity < size:
                size = self.capacity
            self._alloc(self._k, self._v, size)

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the next `n` slots for a caller that writes them itself (`fused.FusedLlama`):
        returns the whole buffers [batch, kv_heads, allocated, head_dim], the new slots at
        length - n .. length - 1. The layer must hold something already."""
        if not self.is_initialized:
            raise RuntimeError("SlabLayer.reserve needs a layer that holds slots already")
        self._grow(self.length + n)
        self.length += n
        return self._k, self._v

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many trailing slots; positive: keep at most that many (the
        legacy form of DynamicLayer.crop). Nothing is copied."""
        if tokens_to_remove > 0:
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(self.length + tokens_to_remove, 0)

    def _reindex(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New buffers of the current allocated size holding rows k, v [n, h, length, d]."""
        size = self._k.shape[2]
        self._k = k.new_empty((k.shape[0], k.shape[1], size, k.shape[3]))
        self._v = v.new_empty((v.shape[0], v.shape[1], size, v.shape[3]))
        self._k[:, :, : self.length] = k
        self._v[:, :, : self.length] = v

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._reindex(self.keys[indices], self.values[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._reindex(self.keys.repeat_interleave(repeats, dim=0),
                          self.values.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def gather_slots(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` [batch, n] of each row, in that order, as the first n slots."""
        idx = index[:, None, :, None].expand(-1, self._k.shape[1], -1, self._k.shape[3])
        n = index.shape[1]
        keys, values = self.keys.gather(2, idx), self.values.gather(2, idx)
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.length = n


def make_cache(model, capacity: int = 0) -> DynamicCache:
    """A DynamicCache for `model` whose full-attention layers are `SlabLayer`s (other layer kinds,
    e.g. sliding-window ones, stay Hugging Face's own). capacity: slots per row expected at most."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        SlabLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class BatchKV:
    def __init__(self, model, batch: int, device: torch.device, capacity: int = 0,
                 lean: bool = True, head=None, row_exact: bool = False,
                 pack: bool | None = None):
        self.model = model
        self.cache = make_cache(model, capacity)
        self.device = device
        self.batch = batch
        self._width = 0  # host: cache slots per row
        self.lengths = [0] * batch  # host: valid slots per row (== next position id)
        # ``valid`` [batch, W] bool and ``next_pos`` [batch] int64 exist only while some row
        # has an invalid slot; while every slot is valid ("dense": batch 1 always) positions
        # follow from the width, no mask is built and rollback is a crop
        self.valid: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        self.mask_4d = attn in MASK_4D_IMPLEMENTATIONS
        self.additive_mask = attn == "eager"
        self.dtype = next(model.parameters()).dtype
        layers = self.cache.layers
        slab = bool(layers) and all(isinstance(layer, SlabLayer) for layer in layers)
        # the lean forward takes 4D boolean masks (sdpa's); it is used only where they are built
        # head: a module replacing the model's LM head (a trimmed draft vocabulary's sub-head)
        # row_exact: a q-slot forward's logits equal q one-slot forwards' (the target's, so that
        # verification sees exactly what decoding the target alone computes; forward.py)
        self._forward = model_forward(model, lean=lean and slab and self.mask_4d
                                      and not self.additive_mask, head=head, row_exact=row_exact,
                                      pack=pack)

    @property
    def width(self) -> int:
        return self._width

    @property
    def lean(self) -> bool:
        """Whether forwards run `forward.LeanLlamaForward` (which `prefill_from` needs)."""
        return isinstance(self._forward, LeanLlamaForward)

    def prefill_from(self, source: BatchKV, layers: int, hidden: torch.Tensor,
                     input_ids: torch.Tensor, input_valid: torch.Tensor | None = None,
                     n_valid: Sequence[int] | None = None, logits_to_keep: int = 0
                     ) -> torch.Tensor:
        """The first forward of an empty cache whose model shares its bottom `layers` layers
        with `source`'s model (`forward.shared_layers`), right after `source` ran the same
        input_ids into its own empty cache: those layers' keys and values are copied from
        `source`, and the forward starts at layer `layers` from `hidden`, the hidden states
        `source` captured entering that layer (``forward(..., capture=layers)``)."""
        if self._width or source.width != input_ids.shape[1]:
            raise ValueError("prefill_from needs an empty cache and a source that has just "
                             f"prefilled these {input_ids.shape[1]} slots (source holds "
                             f"{source.width}, this cache {self._width})")
        for mine, theirs in zip(self.cache.layers[:layers], source.cache.layers[:layers]):
            mine.update(theirs.keys, theirs.values)
        return self.forward(input_ids, input_valid, n_valid, logits_to_keep,
                            start=(layers, hidden))

    @property
    def dense(self) -> bool:
        return self.valid is None

    def _materialize(self) -> None:
        """Leave the dense state: every current slot is valid."""
        if self.valid is None:
            self.valid = torch.ones((self.batch, self._width), dtype=torch.bool, device=self.device)
            self.next_pos = torch.full((self.batch,), self._width, dtype=torch.int64,
                                       device=self.device)

    def _maybe_dense(self) -> None:
        if self.valid is not None and all(n == self._width for n in self.lengths):
            self.valid = self.next_pos = None

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, q] int64
        input_valid: torch.Tensor | None = None,  # [batch, q] bool; None = all valid
        n_valid: Sequence[int] | None = None,  # host: input_valid.sum(1); None = all valid
        logits_to_keep: int = 0,
        **options,
    ) -> torch.Tensor:
        """Run the model on q new slots per row; returns logits [batch, q or logits_to_keep, vocab].
        options: ``capture`` / ``start`` for `forward.LeanLlamaForward` (see `prefill_from`)."""
        batch, q = input_ids.shape
        if options and not self.lean:
            raise ValueError(f"{', '.join(options)} needs the lean forward, which this model lacks")
        width = self._width
        if n_valid is None or all(n == q for n in n_valid):
            input_valid, n_valid = None, [q] * batch
        if self.valid is None and input_valid is None:
            positions = torch.arange(width, width + q, device=self.device)[None, :].expand(batch, q)
            logits = self._forward(input_ids, None, positions, self.cache, logits_to_keep,
                                   **options)
        else:
            self._materialize()
            if input_valid is None:
                positions = self.next_pos[:, None] + torch.arange(q, device=self.device)[None, :]
                new_valid = torch.ones((batch, q), dtype=torch.bool, device=self.device)
                n_new = q
            else:
                positions = (self.next_pos[:, None] + input_valid.cumsum(1) - 1).clamp(min=0)
                new_valid = input_valid
                n_new = input_valid.sum(1)
            kv_valid = torch.cat([self.valid, new_valid], dim=1)
            needs_mask = any(length + n < width + q for length, n in zip(self.lengths, n_valid))
            mask = self._mask(kv_valid, q) if needs_mask else None
            logits = self._forward(input_ids, mask, positions, self.cache, logits_to_keep,
                                   **options)
            self.valid = kv_valid
            self.next_pos = self.next_pos + n_new
        self._width = width + q
        self.lengths = [length + n for length, n in zip(self.lengths, n_valid)]
        self._maybe_dense()
        return logits

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

    def reject(self, tail: int, num_accepted: torch.Tensor, kept: Sequence[int]) -> None:
        """Roll back the last `tail` slots but the first ``num_accepted[r]`` of each row r.

        num_accepted [batch] int64 on the device, ``kept`` the same on the host clipped to
        ``tail``; the tail's slots must all be valid (they were just fed). Columns invalid in
        every row are cropped from the cache; a row that keeps fewer than the best row gets
        holes. No host sync.
        """
        if tail == 0:
            return
        crop = tail - max(kept)  # trailing columns rejected by every row
        if self.valid is None and min(kept) == max(kept):  # stays dense: just crop
            if crop > 0:
                self.cache.crop(-crop)
                self._width -= crop
                self.lengths = [length - crop for length in self.lengths]
            return
        self._materialize()
        width = self._width
        keep = torch.arange(1, tail + 1, device=self.device)[None, :] <= num_accepted[:, None]
        self.valid = torch.cat([self.valid[:, : width - tail], keep], dim=1)
        self.next_pos = self.next_pos - (tail - keep.sum(1))
        self.lengths = [length - (tail - n) for length, n in zip(self.lengths, kept)]
        if crop > 0:
            self.cache.crop(-crop)
            self.valid = self.valid[:, : width - crop]
            self._width = width - crop
        self._maybe_dense()

    def truncate(self, width: int) -> None:
        """Keep the first `width` slots of a dense cache (batch 1 always is), drop the rest."""
        if self.valid is not None:
            raise ValueError("truncate needs a dense cache (every slot valid)")
        drop = self._width - width
        if drop > 0:
            self.cache.crop(-drop)
            self._width = width
            self.lengths = [length - drop for length in self.lengths]

    def select(self, rows: torch.Tensor, host_rows: Sequence[int]) -> None:
        """Keep only `rows` of the batch ([n] int64 on the device, `host_rows` the same)."""
        self.cache.batch_select_indices(rows)
        if self.valid is not None:
            self.valid = self.valid[rows]
            self.next_pos = self.next_pos[rows]
        self.lengths = [self.lengths[i] for i in host_rows]
        self.batch = len(self.lengths)
        self._maybe_dense()

    def waste(self) -> int:
        """Slots per row that hold no token in any row's longest sequence."""
        return self._width - max(self.lengths, default=0)

    def compact(self) -> None:
        """Move every row's valid slots to the right end of a cache of width max(lengths)."""
        new_width = max(self.lengths, default=0)
        if new_width == self._width or self.valid is None:
            return
        # stable sort by validity: invalid slots first, valid ones after in their order
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices
        index = order[:, self._width - new_width :]  # [batch, new_width]
        self.valid = self.valid.gather(1, index)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            if isinstance(layer, SlabLayer):
                layer.gather_slots(index)
                continue
            idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
        self._width = new_width
        self._maybe_dense()
