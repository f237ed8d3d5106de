"""Faster linears for the lean forward on a CPU: bf16 prepacked for oneDNN, fp32 weight-major.

**bf16, prepacked** (`packed`).

``F.linear`` on a bf16 CPU tensor already runs oneDNN's matmul, but reorders the weight into
oneDNN's blocked layout on every call; for the batch-1 shapes of decoding that reorder is about
half of the call (SmolLM2's 49,152 x 576 head: 5.1 -> 2.05 ms; a 576 x 1536 projection: 76 ->
38 us, one thread). `packed(linear)` reorders the weight once and calls oneDNN's linear on the
packed copy: the same kernel on the same numbers, so the output is bitwise ``linear(x)`` (tested
for every projection shape of the tiny test Llamas and of SmolLM2), at the memory of a second
copy of the weights.

The packed copy is cached on the module and rebuilt when the weight changes (another tensor, or
an in-place update: its version counter), so a model healed after an engine was built is not
decoded with stale weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_CACHE = "_specdec_packed"


def packing_supported(model: nn.Module) -> str | None:
    """None when `model`'s linears can be prepacked here, else why not."""
    weight = next(model.parameters())
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, not the CPU"
    if weight.dtype != torch.bfloat16:
        return f"the model is {weight.dtype}, not bfloat16 (fp32 gains nothing here)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bf16 kernels on this CPU"
    return None


WEIGHT_MAJOR_ROWS = (2, 16)  # rows (tokens) for which weight_major takes the (W @ x^T)^T path


def weight_major_supported(model: nn.Module) -> str | None:
    """None when `model`'s fp32 linears take the weight-major few-row path here, else why not."""
    weight = next(model.parameters())
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, not the CPU"
    if weight.dtype != torch.float32:
        return f"the model is {weight.dtype}, not float32"
    return None


def weight_major(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> linear(x): for 2-16 rows as ``(W @ x^T)^T`` (see the module docstring), else
    ``linear(x)`` itself. Modules that are not fp32 ``nn.Linear`` (e.g. `specdec.quant`'s int8
    linears) are returned unchanged."""
    if type(linear) is not nn.Linear or linear.weight.dtype != torch.float32:
        return linear
    lo, hi = WEIGHT_MAJOR_ROWS

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not lo <= rows <= hi:
            return linear(x)
        out = torch.mm(linear.weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, out]
        if linear.bias is not None:
            out = out + linear.bias
        return out.contiguous().view(*x.shape[:-1], out.shape[-1])

    return forward


def packed(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> linear(x), bitwise, with `linear`'s weight reordered for oneDNN once (cached)."""
    weight = linear.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(linear, _CACHE, None)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            pw = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        cached = (key, pw)
        object.__setattr__(linear, _CACHE, cached)  # not a submodule, not a parameter
    pw, bias = cached[1], linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, pw, bias, "none", [], "")

    return forward
