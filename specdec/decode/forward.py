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

    def __init__(self, model, head=None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.decoder = model.get_decoder()
        self.head = head if head is not None else model.lm_head  # a trimmed draft head or the LM head
        self.apply_rotary_pos_emb = apply_rotary_pos_emb
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads

    def __call__(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0):
        decoder = self.decoder
        batch, q = input_ids.shape
        hidden = decoder.embed_tokens(input_ids)
        cos, sin = decoder.rotary_emb(hidden, position_ids)
        layers = cache.layers
        past = layers[0].length
        mask = attention_mask
        if mask is None and q > 1 and past > 0:  # causal, aligned bottom-right
            kv = past + q
            mask = (torch.arange(kv, device=hidden.device)[None, :]
                    <= torch.arange(past, kv, device=hidden.device)[:, None])[None, None]
        is_causal = mask is None and q > 1  # prefill into an empty cache
        gqa = self.groups > 1 and (mask is None or hidden.device.type == "cpu")
        shape = (batch, q, -1, self.head_dim)
        for i, layer in enumerate(decoder.layers[: self.num_layers]):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            query = attn.q_proj(x).view(shape).transpose(1, 2)
            key = attn.k_proj(x).view(shape).transpose(1, 2)
            value = attn.v_proj(x).view(shape).transpose(1, 2)
            query, key = self.apply_rotary_pos_emb(query, key, cos, sin)
            key, value = layers[i].update(key, value)
            if self.groups > 1 and not gqa:
                key = _repeat_kv(key, self.groups)
                value = _repeat_kv(value, self.groups)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, scale=attn.scaling,
                is_causal=is_causal, enable_gqa=gqa,
            )
            out = out.transpose(1, 2).contiguous().reshape(batch, q, -1).contiguous()
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = decoder.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(hidden)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, n, d] -> [batch, kv_heads * groups, n, d], each head repeated in place."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def model_forward(model, lean: bool = True, head=None) -> Forward:
    """The fastest forward that computes exactly what ``model(...)`` computes (with `head`: the
    final hidden states through `head`, e.g. a trimmed draft vocabulary's sub-head)."""
    if lean and lean_supported(model) is None:
        return LeanLlamaForward(model, head)
    return hf_forward(model, head)
