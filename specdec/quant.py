"""int8 drafts on the CPU: a draft's linears quantized once at load, for decoding only.

A draft's forward costs what its weights cost to read: at batch 1 on a CPU each fp32 decoder
layer streams its 14 MB of weights for one token. Quantizing the *draft's* projections and head
to int8 (per output channel, symmetric; activations quantized per call -- PyTorch's dynamic
quantization, fbgemm / x86 kernels) reads a quarter of the bytes: measured on a 2-core AVX2 EPYC,
one thread, a 12-layer SmolLM2 draft with an 8,192-id head went from c = 0.38 to 0.22 of a
target forward, a 24-layer one from 0.70 to 0.37.

Lossless all the same: only the draft is quantized. Its tokens (and, sampling, its logits) are
proposals that the full-precision target verifies exactly as before, so greedy output is the
target's own and sampled output is distributed as the target's, whatever the draft computes.
What quantization may cost is acceptance, which the frontier measures with the same int8 draft
(teacher-forced scoring runs the quantized modules too, so predicted acceptance still equals
the engine's).

`Int8Linear` keeps the module's fp32 ``weight`` (and ``bias``) as they were -- a tied
embedding stays tied, `specdec.vocab` cuts its sub-head from it, ``next(model.parameters())``
still says fp32 -- and computes its forward from the int8 copy alone. Quantization is a load
option (``draft_dtype="int8"``: `load_draft`), never a saved format: a quantized draft is saved,
served by vLLM and loaded by transformers as the plain fp32 checkpoint it came from.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

# the draft dtypes every consumer accepts: the torch dtypes by their short names, plus int8
DRAFT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "int8": "int8"}
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantError(ValueError):
    """A model or machine that int8 drafts cannot run on, with the fix."""


def int8_supported() -> str | None:
    """None when this torch build has dynamic int8 linears on this CPU, else why not."""
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        return (f"this torch build has no quantized CPU engine (supported: {engines}); use "
                "--draft-dtype fp32")
    return None


class Int8Linear(nn.Module):
    """``linear(x)`` from an int8 copy of its weight (per output channel, symmetric) with the
    activations quantized per call; ``weight`` / ``bias`` stay the fp32 originals (not read)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise QuantError(f"Int8Linear wraps nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            w = linear.weight.detach().to("cpu", torch.float32)
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
            zero = torch.zeros(w.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch 2.13 deprecates the quantized-tensor API
                warnings.simplefilter("ignore", UserWarning)  # its fbgemm kernels remain
                qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            bias = None if linear.bias is None else linear.bias.detach().float().cpu()
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # fbgemm / x86 multiply u8 x s8 pairs into int16: a 7-bit activation range avoids
        # their saturation (what torch.ao's dynamic quantization does on these engines)
        self._reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self._reduce_range)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace the decoder layers' projections and the LM head of a Llama-family model (in
    place) by `Int8Linear`s; returns the model, marked ``model.specdec_int8 = True``."""
    reason = int8_supported()
    if reason is not None:
        raise QuantError(reason)
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise QuantError(f"int8 drafts are for fp32 models on the CPU; this one is {weight.dtype} "
                         f"on {weight.device.type} (load it in fp32 on the CPU, or use "
                         "--draft-dtype bf16 on a GPU)")
    for layer in model.get_decoder().layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear(head))
    model.specdec_int8 = True
    return model


def like_head(head: nn.Module, sub: nn.Linear) -> nn.Module:
    """A sub-head cut from `head` (e.g. a trimmed draft vocabulary's rows) in the same form:
    int8 when `head` is."""
    return Int8Linear(sub) if isinstance(head, Int8Linear) else sub


def load_draft(path: str | Path, dtype: str, device: str | torch.device = "cpu"):
    """(draft, tokenizer) with `dtype` a DRAFT_DTYPES name (``int8``: loaded in fp32, then its
    linears quantized)."""
    from specdec.models import load_model

    dtype = LONG_NAMES.get(dtype, dtype)
    if dtype not in DRAFT_DTYPES:
        raise QuantError(f"draft dtype must be one of {', '.join(DRAFT_DTYPES)}, got {dtype!r}")
    if dtype != "int8":
        return load_model(path, dtype=DRAFT_DTYPES[dtype], device=device)
    if torch.device(device).type != "cpu":
        raise QuantError(f"int8 drafts run on the CPU only, not {device}; use --draft-dtype bf16")
    model, tokenizer = load_model(path, dtype=torch.float32, device="cpu")
    return quantize_linears(model), tokenizer
