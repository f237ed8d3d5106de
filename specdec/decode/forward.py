"""One forward of a decoder over new cache slots: Hugging Face's, or a lean one for Llama.

`model_forward(model)` returns the function `BatchKV` calls for every forward:

    forward(input_ids [batch, q], attention_mask, position_ids [batch, q], cache, logits_to_keep)
        -> logits [batch, q or logits_to_keep, vocab]

* `hf_forward`: ``model(...)``, any Hugging Face causal LM.
* `LeanLlamaForward`: for ``LlamaForCausalLM`` with sdpa attention (the default), the same
  computation on the same modules -- the model's own embedding, RMSNorm, projections, MLP,
  rotary embedding and ``apply_rotary_pos_emb`` are called as they are, attention is the same
  ``scaled_dot_product_attention`` call Hugging Face's sdpa integration makes -- so the logits
  are bitwise identical to ``model(...)`` (tested), without the per-call machinery around
  them: the output-capturing decorators, ``create_causal_mask``, per-layer keyword plumbing,
  the cache's dispatch, output dataclasses. That machinery is a fixed cost per forward (about
  5-10% of a SmolLM2 step on a CPU), which a speculative step pays k + 1 times.
  It reads the `SlabLayer` buffers of the cache directly. The causal mask for q > 1 new slots
  after a non-empty cache (verification at batch 1) is built once per forward, not per layer;
  on the CPU grouped-query attention runs inside sdpa (``enable_gqa``, bitwise the same as
  repeating the KV heads first, tested) instead of copying the KV heads three times per layer.

Row-exact attention (``row_exact=True``, what the engine's target uses): a forward of q > 1 new
slots after a non-empty cache -- a verification -- computes each slot's attention as the
one-token forward at that position would (one sdpa call per slot over exactly the slots before
it), so its logits equal q one-token forwards bit for bit wherever the other ops are
row-invariant (norms and elementwise ops are; fp32 projections are on the CPU through rowmm.py;
bf16 / fp16 projections on the CPU are not on every CPU -- on an AVX-512 bf16 one, oneDNN rounds
an output of a 5-row product differently from the 1-row one now and then -- so there a
verification runs its linears slot by slot too, tested). A
single masked sdpa call over all q slots does not give that: its softmax reduces over W + q
keys (the masked ones as zeros) instead of W + j + 1, in another order, and in bf16 that flips
near-tied greedy choices (tokens of a bf16 speculative decode differed from the target alone's
before this). The price is q - 1 extra sdpa calls per layer (and, in bf16 / fp16 on the CPU, q
one-row products per linear instead of one q-row product), so the engine turns it on by
default only where it buys that bitwise identity: bf16 and fp16 (`row_exact_default`).

On a CPU in bf16 the projections and the head run on weights prepacked for oneDNN once
(`packed.py`: the same kernel without a weight reorder per call, bitwise the same outputs).
In fp32 on an AVX2 CPU, 1-16 rows go through `rowmm.py`'s kernel (weights streamed once,
tile-major; row-invariant, so a verification's logits equal one-token decoding's bit for bit,
and both equal ``model(...)``'s to rounding). There, a batch-1 forward of 1-16 new tokens after
the prompt -- every decode step and verification -- runs the whole decoder in one C call
(`fused.py`: the same kernels, the per-op overhead gone, still row-invariant).

Anything else -- another architecture, eager or flash attention, a model with accelerate hooks,
``pretraining_tp`` > 1, a cache without slab layers -- uses `hf_forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Forward = Callable[..., torch.Tensor]


def hf_forward(model, head=None) -> Forward:
    """``model(...)``; with `head` (e.g. a trimmed draft head), the decoder's final hidden
    states through `head` instead of the model's own LM head."""
    decoder = model.get_decoder() if head is not None else None

    def forward(input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0):
        if head is not None:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache,
                             use_cache=True).last_hidden_state
            return head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        ).logits

    return forward


def lean_supported(model) -> str | None:
    """None when `LeanLlamaForward` computes exactly what `model(...)` does, else why not."""
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not LlamaForCausalLM"
    config = model.config
    attn_implementation = getattr(config, "_attn_implementation", None)
    if attn_implementation != "sdpa":
        return f"attention implementation {attn_implementation!r} is not sdpa"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(model, "_hf_hook", None) is not None or any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules()
    ):
        return "the model has accelerate hooks (offloading / device map)"
    if model.training:
        return "the model is in training mode"
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(hasattr(attn, n) for n in projections):
            return "a decoder layer without q/k/v/o projections"
        if not hasattr(layer, "mlp") or not hasattr(layer, "input_layernorm"):
            return "a decoder layer without mlp / input_layernorm"
    return None


class LeanLlamaForward:
    """``model(...)`` for a Llama decoder with a slab cache, minus Hugging Face's per-call
    overhead (see the module docstring). Same modules, same kernels, same logits."""

    def __init__(self, model, head=None, row_exact: bool = False, pack: bool | None = None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from specdec.decode.fused import FusedLlama, fused_supported
        from specdec.decode.packed import (
            packed,
            packing_supported,
            weight_major,
            weight_major_supported,
        )
        from specdec.decode.rowmm import row_linear, rowmm_supported

        self.model = model
        self.decoder = model.get_decoder()
        head = head if head is not None else model.lm_head  # a trimmed draft head or the LM head
        # pack: bf16 linears prepacked for oneDNN (packed.py; bitwise the same outputs); None:
        # wherever supported, and fp32 CPU models take the few-row kernel (rowmm.py: 1-16 rows,
        # row-invariant) or, where it cannot run, the weight-major few-row path (packed.py;
        # one-row products unchanged); False: every linear as the module computes it
        self.pack = packing_supported(model) is None if pack is None else pack
        # row_exact in bf16 / fp16 on the CPU: linears slot by slot too (module docstring)
        weight = next(model.parameters())
        self.split_rows = weight.device.type == "cpu" and weight.dtype in (torch.bfloat16,
                                                                            torch.float16)
        fp32 = pack is None and not self.pack
        self.rowmm = fp32 and rowmm_supported(model) is None
        self.weight_major = fp32 and not self.rowmm and weight_major_supported(model) is None
        linear = (packed if self.pack else row_linear if self.rowmm
                  else weight_major if self.weight_major else (lambda module: module))
        self.head = linear(head)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.projections = [
            [linear(getattr(layer.self_attn, n)) for n in names]
            + [linear(getattr(layer.mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
            for layer in self.decoder.layers[: model.config.num_hidden_layers]
        ] if self.pack or self.rowmm or self.weight_major else None
        self.apply_rotary_pos_emb = apply_rotary_pos_emb
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.row_exact = row_exact
        # batch-1 decode steps and verifications in one C call (fused.py), where it runs
        self.fused = None
        if self.rowmm and fused_supported(model) is None:
            self.fused = FusedLlama(model)

    def __call__(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0,
                 *, capture: int | None = None, start: tuple[int, torch.Tensor] | None = None):
        """The logits; with `capture` = i, (logits, the hidden states entering layer i -- after
        the last layer when i = num_layers). `start` = (i, hidden): begin at layer i from those
        hidden states (the layers below already hold these slots, e.g. copied from a model that
        shares them: `shared_layers`)."""
        decoder = self.decoder
        batch, q = input_ids.shape
        first = 0 if start is None else start[0]
        layers = cache.layers
        if (self.fused is not None and capture is None and start is None
                and self.fused.applies(batch, q, layers[0].length, attention_mask)):
            hidden = self.fused(input_ids, position_ids, cache)
            return self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        hidden = decoder.embed_tokens(input_ids) if start is None else start[1]
        cos, sin = decoder.rotary_emb(hidden, position_ids)
        past = layers[first].length if first < self.num_layers else 0
        captured = None
        mask = attention_mask
        if mask is None and q > 1 and past > 0:  # causal, aligned bottom-right
            kv = past + q
            mask = (torch.arange(kv, device=hidden.device)[None, :]
                    <= torch.arange(past, kv, device=hidden.device)[:, None])[None, None]
        is_causal = mask is None and q > 1  # prefill into an empty cache
        rows = self.row_exact and q > 1 and past > 0  # a verification, slot by slot
        split = rows and self.split_rows  # and its linears slot by slot (bf16 / fp16 CPU)
        gqa = self.groups > 1 and (mask is None or hidden.device.type == "cpu")
        shape = (batch, q, -1, self.head_dim)
        for i in range(first, self.num_layers):
            if i == capture:
                captured = hidden
            layer = decoder.layers[i]
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q_proj, k_proj, v_proj, o_proj, *mlp = (
                self.projections[i] if self.projections is not None
                else (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
            if split:
                q_proj, k_proj, v_proj, o_proj, *mlp = map(
                    _slot_by_slot, (q_proj, k_proj, v_proj, o_proj, *mlp))
            query = q_proj(x).view(shape).transpose(1, 2)
            key = k_proj(x).view(shape).transpose(1, 2)
            value = v_proj(x).view(shape).transpose(1, 2)
            query, key = self.apply_rotary_pos_emb(query, key, cos, sin)
            key, value = layers[i].update(key, value)
            if self.groups > 1 and not gqa:
                key = _repeat_kv(key, self.groups)
                value = _repeat_kv(value, self.groups)
            if rows:
                out = torch.cat([self._attend_row(query, key, value, attention_mask, past, j,
                                                  attn.scaling, gqa) for j in range(q)], dim=2)
            else:
                out = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=mask, dropout_p=0.0, scale=attn.scaling,
                    is_causal=is_causal, enable_gqa=gqa,
                )
            out = out.transpose(1, 2).contiguous().reshape(batch, q, -1).contiguous()
            hidden = residual + o_proj(out)
            x = layer.post_attention_layernorm(hidden)
            if mlp:  # LlamaMLP's own computation, through the packed projections
                gate, up, down = mlp
                hidden = hidden + down(layer.mlp.act_fn(gate(x)) * up(x))
            else:
                hidden = hidden + (_slot_by_slot(layer.mlp) if split else layer.mlp)(x)
        if capture == self.num_layers:
            captured = hidden
        hidden = decoder.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = _slot_by_slot(self.head) if split else self.head
        return head(hidden) if capture is None else (head(hidden), captured)

    @staticmethod
    def _attend_row(query, key, value, attention_mask, past: int, j: int, scale: float,
                    gqa: bool) -> torch.Tensor:
        """Slot j's attention exactly as a one-token forward at width `past` + j computes it:
        over the first past + j + 1 cache slots, with the caller's mask row (None when dense)."""
        end = past + j + 1
        row_mask = None if attention_mask is None else attention_mask[..., j:j + 1, :end]
        return F.scaled_dot_product_attention(
            query[:, :, j:j + 1], key[:, :, :end], value[:, :, :end], attn_mask=row_mask,
            dropout_p=0.0, scale=scale, is_causal=False, enable_gqa=gqa,
        )


def _slot_by_slot(f):
    """x -> f(x) computed one slot (dim 1) at a time: what q one-token forwards compute."""
    return lambda x: torch.cat([f(x[:, j:j + 1]) for j in range(x.shape[1])], 1)


def shared_layers(target, draft) -> int:
    """How many bottom decoder layers `draft` shares with `target` exactly: the same embedding,
    rotary tables and, layer by layer from the bottom, the same parameters (a cut healed with
    ``--freeze-below-cut --freeze-embeddings``, a pruned-only cut, the target itself; 0 when the
    embeddings differ). A prefill of the draft can take those layers' keys and values and the
    hidden states above them from the target's prefill of the same tokens instead of computing
    them again (the engine does). The parameters compared are the full-precision ones: a w8
    draft's bottom layers then start from the target's exact keys and values where its own int8
    products would have computed them to rounding -- only its proposals can change, never the
    output, which the target verifies. 0 for models the lean forward does not take."""
    if lean_supported(target) is not None or lean_supported(draft) is not None:
        return 0
    if draft is target:
        return target.config.num_hidden_layers
    t, d = target.get_decoder(), draft.get_decoder()

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        sa, sb = ({**dict(m.named_parameters()), **dict(m.named_buffers())} for m in (a, b))
        return sa.keys() == sb.keys() and all(
            sa[n].shape == sb[n].shape and sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n])
            for n in sa)

    if not (same(t.embed_tokens, d.embed_tokens) and same(t.rotary_emb, d.rotary_emb)
            and getattr(t.rotary_emb, "attention_scaling", 1.0)
            == getattr(d.rotary_emb, "attention_scaling", 1.0)):
        return 0
    n = 0
    limit = min(target.config.num_hidden_layers, draft.config.num_hidden_layers)
    while n < limit and same(t.layers[n], d.layers[n]):
        n += 1
    return n


def row_exact_default(model) -> bool:
    """Whether the engine verifies `model`'s tokens row-exactly by default: where it buys bitwise
    identity with one-token decoding -- bf16 / fp16, whose projections, norms and MLP are
    row-invariant on the CPU -- and not in fp32, whose one-row and few-row matrix products take
    different paths anyway (equal to rounding, as they always were), so there the k extra
    attention calls per layer would buy nothing."""
    return next(model.parameters()).dtype != torch.float32


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, n, d] -> [batch, kv_heads * groups, n, d], each head repeated in place."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def model_forward(model, lean: bool = True, head=None, row_exact: bool = False,
                  pack: bool | None = None) -> Forward:
    """The fastest forward that computes exactly what ``model(...)`` computes (with `head`: the
    final hidden states through `head`, e.g. a trimmed draft vocabulary's sub-head; with
    `row_exact`: verifications slot by slot, see the module docstring; `pack`: bf16 linears
    prepacked for oneDNN, None = where supported, `packed.py` -- both lean forward only)."""
    if lean and lean_supported(model) is None:
        return LeanLlamaForward(model, head, row_exact=row_exact, pack=pack)
    return hf_forward(model, head)
