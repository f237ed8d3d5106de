"""Few-row matrix products for CPU decoding: `rowmm.c`, compiled once here with gcc.

Decoding at batch 1 multiplies 1 to k + 1 rows (the tokens of a step) by every weight matrix
of the model, so a forward costs what streaming the weights from memory costs. MKL's products
for that shape stream far below this machine's bandwidth and grow with the rows: on a 2-core
AVX2 EPYC (1 thread), SmolLM2's 30 layers of projections took 35 ms for 1 row, 53 for 2 and
66 for 3 (F.linear), and its 49,152 x 576 head 10.5 / 22 ms for 1 / 2 rows. `rowmm.c` keeps
each weight tile-major (16 outputs x all inputs, contiguous), streams it once per call whatever
the rows, and accumulates every output with one fused multiply-add per input, in order: 25.6 /
28.1 / 40 ms for the projections and 8.0 / 7.8 ms for the head. So a verification of k = 1
(2 rows) costs about what one token costs, and the target decoding alone gets faster too.

Row-invariant by construction: a row's outputs are computed the same way whatever rows share
the call, so the logits of a (k + 1)-row verification equal k + 1 one-row forwards bit for bit
(greedy identity does not rest on near-ties), tested. Against MKL they differ by rounding.

int8 weights (`Int8RowLinear`, the draft dtype ``w8``): the same kernel on int8 weights with
one fp32 scale per output channel, activations fp32: a quarter of the bytes, dequantized in
registers. Weight-only quantization needs no activation calibration and keeps down_proj and
the head (which per-tensor activation quantization cannot hold, `specdec.quant`) in int8 too.

Only for fp32 on x86-64 CPUs with AVX2 + FMA and a C compiler (``$CC``, default gcc); the
shared library is built into ``$SPECDEC_CACHE/ext/`` (named by the source's hash and flags,
written atomically). On a CPU with AVX-512 the products take 512-bit kernels instead
(`select_kernels`): fp32 four tiles at a time (the AVX2 kernel's results bit for bit, faster
where its chains of multiply-adds bound it), int8 one register per tile with the tiles holding
inputs in quads instead of pairs (`tile_major_i8`; equal to the AVX2 kernel's results to
rounding; on a Zen 5 EPYC 1.6x / 2.0x faster for 3 / 4 rows from memory on two threads,
`bench/rowmm.py`). ``SPECDEC_ROWMM_ISA=avx2`` keeps the AVX2 kernels. Anywhere else
`rowmm_supported` says why and the callers keep their other paths; ``SPECDEC_ROWMM=0`` turns
it off. Threads: ``torch.get_num_threads()`` of them (OpenMP, the libgomp PyTorch loads), each
taking a range of output tiles, so the thread count never changes a result (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TILE = 16  # outputs per tile (two AVX2 registers)
MAX_ROWS = 16  # rows (tokens) a call takes the kernel for; more (a prefill) go to F.linear
_SOURCES = [Path(__file__).with_name(n) for n in ("rowmm.c", "fused.c")]  # one library
_CACHE = "_specdec_rowmm"
_lib: ctypes.CDLL | None = None
_error: str | None = None
_group: int | None = None  # inputs per int8 tile group of the kernels in use (select_kernels)


class Mat(ctypes.Structure):
    """fused.c's mat_t: one weight matrix as the kernels take it (scale None: fp32 tiles)."""
    _fields_ = [("tiles", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64)]


def _build() -> ctypes.CDLL:
    from specdec.hub import cache_dir

    source = b"".join(path.read_bytes() for path in _SOURCES)
    compiler = os.environ.get("CC") or "gcc"
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
    tag = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    out = cache_dir() / "ext" / f"rowmm-{tag}.so"
    if not out.exists():
        if shutil.which(compiler) is None:
            raise OSError(f"no C compiler {compiler!r} on PATH (install gcc or set CC)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            done = subprocess.run([compiler, *flags, "-o", str(tmp_out), *map(str, _SOURCES),
                                   "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                names = " + ".join(path.name for path in _SOURCES)
                raise OSError(f"{compiler} failed on {names}: {done.stderr.strip()[:500]}")
            os.replace(tmp_out, out)
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.rowmm_f32.argtypes = [p, i, i, p, i, p, i, i]
    lib.rowmm_i8.argtypes = [p, i, i, p, p, i, p, i, i]
    lib.rowmm_f32.restype = lib.rowmm_i8.restype = None
    lib.rowmm_select.argtypes, lib.rowmm_select.restype = [ctypes.c_int], ctypes.c_int
    f, n = ctypes.c_float, ctypes.c_int
    lib.fused_llama.argtypes = [i, i, p, p, p, i, p, p, p, p, p, p, f, i, i, i, i, i, f, n]
    lib.rowmm_par.argtypes = [p, p, i, p, n]
    lib.rowmm_par.restype = None
    lib.fused_llama.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot run (see
    `rowmm_supported`)."""
    global _lib, _error
    if _lib is None and _error is None:
        if os.environ.get("SPECDEC_ROWMM", "1") == "0":
            _error = "turned off (SPECDEC_ROWMM=0)"
        elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            _error = (f"this CPU has no AVX2 + FMA (torch reports "
                      f"{torch.backends.cpu.get_cpu_capability()})")
        else:
            try:
                _lib = _build()
                select_kernels()
            except OSError as e:
                _error = f"the kernel could not be built: {e}"
    return _lib


def rowmm_supported(model: nn.Module | None = None) -> str | None:
    """None when `model`'s (fp32, CPU) linears can take the kernel here, else why not."""
    if model is not None:
        weight = next(model.parameters())
        if weight.device.type != "cpu":
            return f"the model is on {weight.device.type}, not the CPU"
        if weight.dtype != torch.float32:
            return f"the model is {weight.dtype}, not float32"
    return None if library() is not None else _error


def tile_major(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [ceil(out / 16), in, 16]: tile t holds outputs 16 t .. 16 t + 15, input by
    input (zero rows pad the last tile)."""
    out, inp = weight.shape
    tiles = -(-out // TILE)
    padded = weight.new_zeros(tiles * TILE, inp)
    padded[:out] = weight
    return padded.view(tiles, TILE, inp).transpose(1, 2).contiguous()


def select_kernels(isa: str | None = None) -> str:
    """Choose the kernels: "avx512" (where the CPU has AVX-512 F + BW) or "avx2"; None: the
    default, "avx512" where torch reports AVX-512 unless ``SPECDEC_ROWMM_ISA=avx2``. Returns the
    kernels in use. Int8 tiles are laid out for one int8 kernel (`tile_major_i8`): build them
    after choosing. Raises where there is no kernel at all."""
    global _group
    lib = library()
    if lib is None:
        raise RuntimeError(f"rowmm is not available: {_error}")
    if isa is None:
        isa = ("avx2" if os.environ.get("SPECDEC_ROWMM_ISA", "").lower() == "avx2"
               or torch.backends.cpu.get_cpu_capability() != "AVX512" else "avx512")
    if isa not in ("avx2", "avx512"):
        raise ValueError(f"the kernels are 'avx2' or 'avx512', not {isa!r}")
    _group = lib.rowmm_select(int(isa == "avx512"))
    return "avx512" if _group == 4 else "avx2"


def i8_group() -> int:
    """Inputs per group of the int8 tiles the int8 kernel in use takes: 2 (AVX2) or 4 (AVX-512); 2
    where there is no kernel (`Int8RowLinear` then never reads its tiles)."""
    library()  # which selects the default kernel
    return _group or 2


def tile_major_i8(q: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """int8 [out, in] -> [ceil(out / 16), ceil(in / G), 16 G], the int8 kernel's layout for
    input groups of G (default: the kernel in use's, `i8_group`; rowmm.c): pairs, byte 4 d + e =
    W[16 t + d + 8 (e & 1), 2 p + (e >> 1)]; quads, byte 4 d + e = W[16 t + d, 4 q + e]. Zero
    rows and zero inputs pad the edges."""
    group = i8_group() if group is None else group
    if group not in (2, 4):
        raise ValueError(f"int8 tiles group 2 or 4 inputs, not {group}")
    out, inp = q.shape
    tiles, groups = -(-out // TILE), -(-inp // group)
    padded = q.new_zeros(tiles * TILE, groups * group)
    padded[:out, :inp] = q
    if group == 4:  # [tile, d, quad, e] -> [tile, quad, d, e]
        return (padded.view(tiles, TILE, groups, 4).permute(0, 2, 1, 3)
                .reshape(tiles, groups, 4 * TILE).contiguous())
    # [tile, half h, d, pair, parity e'] -> [tile, pair, d, e', h]: byte 4 d + 2 e' + h
    return (padded.view(tiles, 2, 8, groups, 2).permute(0, 3, 2, 4, 1)
            .reshape(tiles, groups, 2 * TILE).contiguous())


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scale [out] fp32), weight ~ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _check(x: torch.Tensor, inp: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"rowmm takes fp32 CPU inputs, got {x.dtype} on {x.device.type}")
    if x.shape[-1] != inp:
        raise ValueError(f"rowmm: input has {x.shape[-1]} features, the weight {inp}")
    return x.reshape(-1, inp).contiguous()


def matmul_f32(x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T with W as `tile_major(W)`: [..., out_features]."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"rowmm is not available: {_error}")
    rows = _check(x, tiles.shape[1])
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    lib.rowmm_par(ctypes.byref(Mat(tiles.data_ptr(), None, rows.shape[1], out_features)),
                  rows.data_ptr(), rows.shape[0], y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def matmul_i8(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, out_features: int
              ) -> torch.Tensor:
    """x [..., in] @ (q * scale)^T with q as `tile_major_i8(q)` and `scale` padded to the tiles:
    [..., out_features]."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"rowmm is not available: {_error}")
    rows = _check(x, x.shape[-1])
    group = i8_group()
    if tiles.shape[2] != group * TILE:
        raise ValueError(f"rowmm: int8 tiles of {tiles.shape[2] // TILE}-input groups, the "
                         f"kernel takes {group} (tile_major_i8 lays them out)")
    if -(-rows.shape[1] // group) != tiles.shape[1]:
        raise ValueError(f"rowmm: input has {rows.shape[1]} features, the int8 tiles "
                         f"{group * tiles.shape[1]} (or up to {group - 1} less)")
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    lib.rowmm_par(ctypes.byref(Mat(tiles.data_ptr(), scale.data_ptr(), rows.shape[1],
                                   out_features)),
                  rows.data_ptr(), rows.shape[0], y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def _tiles(linear: nn.Linear) -> torch.Tensor:
    """`tile_major` of an fp32 ``nn.Linear``'s weight, cached on the module and rebuilt when the
    weight changes."""
    weight = linear.weight
    version = -1 if weight.is_inference() else weight._version  # inference tensors have none
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = getattr(linear, _CACHE, None)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, tile_major(weight.detach()))
        object.__setattr__(linear, _CACHE, cached)  # not a submodule, not a parameter
    return cached[1]


def kernel_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(tiles, scales or None) the kernel multiplies by for a bias-free fp32 ``nn.Linear`` (fp32
    tiles) or `Int8RowLinear` (int8 tiles and per-channel scales); None for anything else."""
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.bias is None:
        return _tiles(module), None
    if isinstance(module, Int8RowLinear) and module.bias is None:
        return module._tiles, module._scale
    return None


def row_linear(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> linear(x) through the kernel for up to `MAX_ROWS` rows (an fp32 ``nn.Linear``;
    its tile-major copy is cached on the module and rebuilt when the weight changes), else
    ``linear(x)``. `Int8RowLinear` and any other module are returned unchanged."""
    if type(linear) is not nn.Linear or linear.weight.dtype != torch.float32:
        return linear
    tiles, bias, out_features = _tiles(linear), linear.bias, linear.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > MAX_ROWS:
            return linear(x)
        y = matmul_f32(x, tiles, out_features)
        return y if bias is None else y + bias

    return forward


class Int8RowLinear(nn.Module):
    """``linear`` with int8 weights (symmetric, per output channel) and fp32 activations.

    Up to `MAX_ROWS` rows run `rowmm.c`'s int8 kernel (a quarter of the fp32 bytes); more rows
    (a prefill, teacher-forced scoring) run ``F.linear`` on the dequantized weights: the same
    model, so the draft's cache and its scores are the quantized draft's. ``weight`` / ``bias``
    stay the fp32 originals (a tied embedding stays tied; `specdec.vocab` cuts a sub-head from
    them, quantized again per row: the same rows, the same scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear) or linear.weight.dtype != torch.float32:
            raise ValueError("Int8RowLinear wraps an fp32 nn.Linear")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            q, scale = quantize_weight(linear.weight.detach().cpu())
            self._dequant = q.float() * scale[:, None]
            self._tiles = tile_major_i8(q)
            self._scale = torch.ones(self._tiles.shape[0] * TILE)
            self._scale[: self.out_features] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the int8 tiles could not tell 2P - 1 from 2P
            raise ValueError(f"Int8RowLinear: input has {x.shape[-1]} features, the layer "
                             f"{self.in_features}")
        if (x.numel() // x.shape[-1] > MAX_ROWS or x.dtype != torch.float32
                or library() is None):
            y = F.linear(x.float(), self._dequant)
        else:
            y = matmul_i8(x, self._tiles, self._scale, self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
