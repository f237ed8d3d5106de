"""int8 drafts on the CPU: a draft's linears quantized once at load, for decoding only.

Two flavours. ``w8`` (`quantize_weights`): int8 weights only, activations fp32, every
projection and the head, on `specdec.decode.rowmm`'s few-row kernel -- no calibration, 96% greedy
agreement with fp32 for the whole SmolLM2, the faster and the better where that kernel runs (an
AVX2 CPU with a C compiler). ``int8`` (`quantize_linears`, below): PyTorch's dynamic
quantization, activations int8 too, which needs the smoothing and the fp32 exceptions described
here; the choice where rowmm cannot run.

A draft's forward costs what its weights cost to read: at batch 1 on a CPU each fp32 decoder
layer streams its 14 MB of weights for one token. Quantizing the *draft's* projections to int8
(per output channel, symmetric; activations quantized per call -- PyTorch's dynamic
quantization, fbgemm / x86 kernels) reads a quarter of those bytes.

What it costs is agreement with the target, and where is measured (SmolLM2, the whole 30-layer
model quantized, greedy agreement with the fp32 model on ShareGPT test text): every projection
and the head as they are, 0.44; with SmoothQuant's smoothing (alpha 0.5) 0.57, (0.8) 0.69; the
attention projections alone 0.95, the head alone 0.92, down_proj alone 0.71 -- its input,
SiLU(gate) * up, has outlier channels a per-tensor 7-bit activation scale cannot hold. So by
default the attention projections and gate / up are quantized, smoothed with alpha 0.8 on 16
ShareGPT *train* conversations (`calibration_ids`), and down_proj and the head stay fp32: 0.91
agreement at about 45% of an fp32 layer's bytes.

Lossless all the same: only the draft is quantized. Its tokens (and, sampling, its logits) are
proposals that the full-precision target verifies exactly as before, so greedy output is the
target's own and sampled output is distributed as the target's, whatever the draft computes.
Teacher-forced scoring runs the same quantized modules, so predicted acceptance still equals
the engine's.

`Int8Linear` keeps the module's fp32 ``weight`` (and ``bias``) as they were -- a tied
embedding stays tied, `specdec.vocab` cuts its sub-head from it, ``next(model.parameters())``
still says fp32 -- and computes its forward from the int8 copy alone. Quantization is a load
option (``draft_dtype="int8"``: `load_draft`), never a saved format: a quantized draft is saved,
served by vLLM and loaded by transformers as the plain fp32 checkpoint it came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

# the draft dtypes every consumer accepts: the torch dtypes by their short names, plus int8
# (activations int8 too, fbgemm) and w8 (int8 weights only, `specdec.decode.rowmm`)
DRAFT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "int8": "int8", "w8": "w8"}
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8",
              "w8": "w8"}
# the projections quantized by default: not down_proj, whose input (SiLU(gate) * up) has the
# outlier channels per-tensor activation quantization cannot hold (see the module docstring)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
SMOOTH_ALPHA = 0.8  # SmoothQuant's migration strength
CALIB_N, CALIB_TOKENS = 16, 256  # calibration sequences and tokens per sequence


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
    activations quantized per call; ``weight`` / ``bias`` stay the fp32 originals (not read).

    smooth: SmoothQuant's per-input-channel factors s (`smoothing`): the int8 copy is of
    ``W * s`` and the input is divided by s first, the same product in exact arithmetic, with
    the activations' outlier channels moved into the weights, where per-channel scales absorb
    them."""

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise QuantError(f"Int8Linear wraps nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.inv_smooth = None if smooth is None else (1.0 / smooth).float()  # [in]
        with torch.no_grad():
            w = linear.weight.detach().to("cpu", torch.float32)
            if smooth is not None:
                w = w * smooth.float()[None, :]
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
        xf = x.float() if self.inv_smooth is None else x.float() * self.inv_smooth
        out = torch.ops.quantized.linear_dynamic(xf, self._packed, self._reduce_range)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _linears(model: nn.Module, projections: Sequence[str] = PROJECTIONS, head: bool = False
             ) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear `quantize_linears` replaces: the decoder
    layers' `projections`, and the LM head if `head`."""
    out = []
    for layer in model.get_decoder().layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in projections:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear):
                    out.append((parent, name, child))
    lm_head = model.get_output_embeddings()
    if head and isinstance(lm_head, nn.Linear):
        out.append((model, "lm_head", lm_head))
    return out


@torch.inference_mode()
def smoothing(model: nn.Module, calib: Sequence[Sequence[int]], alpha: float = SMOOTH_ALPHA,
              linears: list[tuple[nn.Module, str, nn.Linear]] | None = None
              ) -> dict[int, torch.Tensor]:
    """SmoothQuant's factors for every linear `quantize_linears` replaces (keyed by id):
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), with max|x_j| the largest activation of
    input channel j over the calibration token sequences `calib` (the fp32 model's forward)."""
    if not calib:
        raise QuantError("int8 calibration needs at least one token sequence")
    amax: dict[int, torch.Tensor] = {}

    def record(module, inputs, _output):
        a = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
        key = id(module)
        amax[key] = torch.maximum(amax[key], a) if key in amax else a

    linears = _linears(model) if linears is None else linears
    hooks = [linear.register_forward_hook(record) for _, _, linear in linears]
    try:
        device = next(model.parameters()).device
        for ids in calib:
            model(torch.tensor([list(ids)], device=device))
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for _, _, linear in linears:
        w = linear.weight.detach().abs().amax(dim=0).float().clamp_min(1e-5)  # [in]
        x = amax[id(linear)].clamp_min(1e-5)
        scales[id(linear)] = (x.pow(alpha) / w.pow(1 - alpha)).clamp(1e-4, 1e4)
    return scales


def quantize_linears(model: nn.Module, calib: Sequence[Sequence[int]] | None = None,
                     projections: Sequence[str] = PROJECTIONS, head: bool = False) -> nn.Module:
    """Replace the decoder layers' `projections` (and the LM head if `head`) of a Llama-family
    model (in place) by `Int8Linear`s, smoothed (SmoothQuant) on the calibration token
    sequences `calib` when given; returns the model, marked ``model.specdec_int8 = True``."""
    reason = int8_supported()
    if reason is not None:
        raise QuantError(reason)
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise QuantError(f"int8 drafts are for fp32 models on the CPU; this one is {weight.dtype} "
                         f"on {weight.device.type} (load it in fp32 on the CPU, or use "
                         "--draft-dtype bf16 on a GPU)")
    linears = _linears(model, projections, head)
    scales = smoothing(model, calib, linears=linears) if calib is not None else {}
    for parent, name, linear in linears:
        quantized = Int8Linear(linear, scales.get(id(linear)))
        if parent is model:
            model.set_output_embeddings(quantized)
        else:
            setattr(parent, name, quantized)
    model.specdec_int8 = True
    return model


def calibration_ids(tokenizer, n: int = CALIB_N, max_tokens: int = CALIB_TOKENS,
                    source: str = "sharegpt") -> list[list[int]]:
    """Chat-templated ShareGPT *train* first turns with their answers (never an evaluation
    set), each cut to `max_tokens`: the text int8 smoothing calibrates on."""
    from specdec.data import chat_ids
    from specdec.turns import first_turns

    turns = first_turns(source, tokenizer, n=n, split="train")
    return [chat_ids(tokenizer, t.prompt + [{"role": "assistant", "content": t.reference}],
                     add_generation_prompt=False)[:max_tokens] for t in turns]


def like_head(head: nn.Module, sub: nn.Linear) -> nn.Module:
    """A sub-head cut from `head` (e.g. a trimmed draft vocabulary's rows) in the same form:
    int8 when `head` is."""
    from specdec.decode.rowmm import Int8RowLinear

    if isinstance(head, Int8RowLinear):
        return Int8RowLinear(sub)
    return Int8Linear(sub) if isinstance(head, Int8Linear) else sub


def quantize_weights(model: nn.Module) -> nn.Module:
    """``w8``: every decoder projection and the LM head of a Llama-family fp32 CPU model
    replaced (in place) by `specdec.decode.rowmm.Int8RowLinear` -- int8 weights, one scale per
    output channel, fp32 activations, no calibration; returns the model, marked
    ``model.specdec_int8 = "w8"``. Needs the rowmm kernel (AVX2 + a C compiler) to be fast;
    without it the same numbers come from dequantized fp32 weights."""
    from specdec.decode.rowmm import Int8RowLinear

    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise QuantError(f"w8 drafts are for fp32 models on the CPU; this one is {weight.dtype} "
                         f"on {weight.device.type} (load it in fp32 on the CPU, or use "
                         "--draft-dtype bf16 on a GPU)")
    projections = PROJECTIONS + ("down_proj",)
    for parent, name, linear in _linears(model, projections, head=True):
        quantized = Int8RowLinear(linear)
        if parent is model:
            model.set_output_embeddings(quantized)
        else:
            setattr(parent, name, quantized)
    model.specdec_int8 = "w8"
    return model


def load_draft(path: str | Path, dtype: str, device: str | torch.device = "cpu",
               calib: Sequence[Sequence[int]] | None = None):
    """(draft, tokenizer) with `dtype` a DRAFT_DTYPES name (``int8``: loaded in fp32, then its
    linears quantized, smoothed on `calib` token sequences, by default `calibration_ids`;
    ``w8``: loaded in fp32, then `quantize_weights`)."""
    from specdec.models import load_model

    dtype = LONG_NAMES.get(dtype, dtype)
    if dtype not in DRAFT_DTYPES:
        raise QuantError(f"draft dtype must be one of {', '.join(DRAFT_DTYPES)}, got {dtype!r}")
    if dtype not in ("int8", "w8"):
        return load_model(path, dtype=DRAFT_DTYPES[dtype], device=device)
    if torch.device(device).type != "cpu":
        raise QuantError(f"{dtype} drafts run on the CPU only, not {device}; use --draft-dtype "
                         "bf16")
    model, tokenizer = load_model(path, dtype=torch.float32, device="cpu")
    if dtype == "w8":
        return quantize_weights(model), tokenizer
    if calib is None:
        calib = calibration_ids(tokenizer)
    return quantize_linears(model, calib), tokenizer
