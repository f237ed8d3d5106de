"""A Llama decoder's decode steps and verifications in one C call (`fused.c`).

At batch 1 a CPU decode step of a small model is not only its matrix products: a SmolLM2 layer
is ~25 PyTorch calls (norms, rotary, cache writes, attention, activations, residuals), a fixed
~0.5 ms per layer on a 2-core EPYC -- a third of the target's step and most of a w8 draft's.
`FusedLlama` runs the whole decoder for 1..16 new tokens after a non-empty cache in one call:
the projections on `rowmm.c`'s kernels (fp32, or int8 for a w8 draft), the attention
vectorised and split over the threads by (row, head), the rest as plain loops in `fused.c`,
reading and writing the `SlabLayer` buffers in place. The embedding, the rotary
tables and the LM head stay in PyTorch (one call each).

Row-invariant: a row's result does not depend on the rows that share the call, so a
verification's logits equal one-token decoding's bit for bit (tested), and greedy speculative
output is the target's own. Against ``model(...)`` the logits agree to float rounding (another
accumulation order), like `rowmm`'s. A prefill (past == 0 or more than 16 rows), a batch, a mask
or anything `fused_supported` declines takes the lean PyTorch forward; ``SPECDEC_FUSED=0`` turns
this path off.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from specdec.decode.rowmm import MAX_ROWS, TILE, Mat, i8_group, kernel_weights, library

_NAMES = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
          ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def fused_supported(model: nn.Module) -> str | None:
    """None when `FusedLlama` computes `model`'s decoder here, else why not (the caller then
    keeps the lean PyTorch forward)."""
    if os.environ.get("SPECDEC_FUSED", "1") == "0":
        return "turned off (SPECDEC_FUSED=0)"
    if library() is None:
        from specdec.decode.rowmm import rowmm_supported

        return rowmm_supported()
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    decoder = model.get_decoder()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 2 or heads % kv_heads:
        return "head_dim is odd or the query heads are not a multiple of the kv heads"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    for layer in decoder.layers[: config.num_hidden_layers]:
        for owner, name in _NAMES:
            if kernel_weights(getattr(getattr(layer, owner), name)) is None:
                return f"{owner}.{name} is not a bias-free fp32 Linear or an int8 row linear"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ != "LlamaRMSNorm" or norm.weight.dtype != torch.float32:
                return "a norm is not an fp32 LlamaRMSNorm"
    return None


class FusedLlama:
    """The decoder (final norm included, head excluded) over 1..`MAX_ROWS` new tokens of one
    sequence whose cache already holds its prompt: ``__call__`` -> final hidden [1, q, hidden]."""

    def __init__(self, model: nn.Module):
        config = model.config
        self.decoder = model.get_decoder()
        self.num_layers = config.num_hidden_layers
        layers = self.decoder.layers[: self.num_layers]
        self.hidden = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.intermediate = config.intermediate_size
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.scaling = float(layers[0].self_attn.scaling)
        self._keep = []  # the tensors the C tables point into
        self._int8_group = None  # inputs per group of the int8 tiles, if any (rowmm.c)
        mats = (Mat * (len(layers) * len(_NAMES)))()
        for i, layer in enumerate(layers):
            for j, (owner, name) in enumerate(_NAMES):
                module = getattr(getattr(layer, owner), name)
                tiles, scale = kernel_weights(module)
                self._keep += [tiles, scale]
                if scale is not None:
                    self._int8_group = tiles.shape[2] // TILE
                mats[i * len(_NAMES) + j] = Mat(
                    tiles.data_ptr(), 0 if scale is None else scale.data_ptr(),
                    module.in_features, module.out_features)
        self._mats = mats
        norms = [w for layer in layers
                 for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        self._keep += norms
        self._norms = (ctypes.c_void_p * len(norms))(*[w.data_ptr() for w in norms])
        self._final_norm = self.decoder.norm.weight

    def applies(self, batch: int, q: int, past: int, attention_mask) -> bool:
        """Whether this forward is one the fused path takes (else the caller's PyTorch path)."""
        return batch == 1 and 1 <= q <= MAX_ROWS and past > 0 and attention_mask is None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        q = input_ids.shape[1]
        if self._int8_group not in (None, i8_group()):
            raise RuntimeError(
                "the int8 tiles were laid out for the other int8 kernel (rowmm.select_kernels "
                "was called after this model was quantized): select the kernels first, then "
                "load the draft")
        x = self.decoder.embed_tokens(input_ids).contiguous()  # a new tensor: written in place
        cos, sin = self.decoder.rotary_emb(x, position_ids)
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        layers = cache.layers[: self.num_layers]
        past = layers[0].length
        keys, values, alloc = [], [], []
        for layer in layers:
            k, v = layer.reserve(q)
            keys.append(k.data_ptr())
            values.append(v.data_ptr())
            alloc.append(k.shape[2])
        n = len(layers)
        rc = library().fused_llama(
            q, past, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, self._mats, self._norms,
            (ctypes.c_void_p * n)(*keys), (ctypes.c_void_p * n)(*values),
            (ctypes.c_int64 * n)(*alloc), self._final_norm.data_ptr(), self.eps, self.hidden,
            self.heads, self.kv_heads, self.head_dim, self.intermediate, self.scaling,
            torch.get_num_threads())
        if rc != 0:
            for layer in layers:  # give the slots back: nothing was written
                layer.crop(-q)
            raise MemoryError("fused_llama could not allocate its scratch memory")
        return x
