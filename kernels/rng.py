"""Counter-based random numbers shared bit for bit by the Triton kernels and the torch references.

Speculative sampling needs two kinds of randomness per verification step: one uniform per
draft position (the acceptance test) and one Exp(1) variate per vocabulary entry (the
exponential race that samples the recovered or bonus token without normalising). To make the
Triton kernels and the torch references emit *identical* tokens for the same inputs, nothing
comes from a stateful generator: every random number is a pure function of integers,

    h = hash(seed, offset, position, stream, vocab_index)            (uint32)

built from murmur3's 32-bit finaliser ``fmix32`` (a bijection on uint32 with full avalanche):

    key  = fmix32(fmix32(fmix32(fmix32(seed_lo ^ GOLDEN) ^ seed_hi) ^ offset_lo) ^ offset_hi)
    key  = fmix32(key ^ (position * 4 + stream))          # per (row, position, stream)
    h    = fmix32(fmix32(key ^ vocab_index) ^ key2)       # key2 = fmix32(key ^ GOLDEN)

``seed`` and ``offset`` are the engine's per-row int64 seed and step counter (both halves of
each are hashed, so any int64 works). ``stream`` separates the acceptance uniforms
(``STREAM_ACCEPT``, vocab_index 0) from the race exponentials (``STREAM_RACE``).

The hash maps to a uniform in the open interval (0, 1) with 24 bits of mantissa:

    u = (2 * (h >> 9) + 1) * 2**-24        # midpoints of a 2**23 grid, exact in fp32

so u is never 0 or 1, its mean is exactly 1/2, and the integer-to-float step is exact on every
backend. The acceptance test uses this u.

Exp(1) is ``-log(u)`` with ``u = 1 - v``, evaluated as ``-log1p(-v)`` where v keeps all 32 bits,
``v = (float32(h) + 0.5) * 2**-32``. The reason: the race is won by the *smallest* E, i.e. u
near 1, where a 24-bit u has a grid of 1.2e-7; at a 128k vocabulary the two smallest E would
then fall in one grid cell (a tie, lowest index wins) about 1% of the time: a visible bias. With v at 32 bits E is
resolved to ~1e-10 near 0. ``log1p`` is not in the Triton interpreter, so both backends use

    E = v * (1 + v * (1/2 + v * (1/3 + v / 4)))   if v < 2**-7   (truncation error < 1e-9)
    E = -log(1 - v)                                otherwise

step by step in fp32 (no FMA: the kernels are compiled with fp fusion off).

In torch the integer arithmetic is done in int64 and masked to 32 bits; the 32x32-bit multiply
is split in 16-bit halves so no intermediate overflows int64. In Triton it is plain uint32
arithmetic (wrapping multiply, logical shifts). Hashes and uniforms are bit-identical across
backends; exp/log differ by at most an ulp or so between numpy, Sleef, CUDA and Triton, so the
sampled tokens agree except on floating-point near-ties (two race scores, or u and the
acceptance ratio, within a few ulp: of order 1e-6 per draw or less).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the torch references still work without it
    triton = None
    tl = None
    HAS_TRITON = False

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2**32 / phi
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
STREAM_ACCEPT = 0
STREAM_RACE = 1
TWO_POW_M24 = 5.9604644775390625e-08  # 2**-24
TWO_POW_M32 = 2.3283064365386963e-10  # 2**-32
SMALL_V = 0.0078125  # 2**-7: below it E = -log1p(-v) by its Taylor series
THIRD_F32 = 0.3333333432674408  # float32(1/3), so torch and Triton use the same constant

# ----------------------------------------------------------------------------------------- torch


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on an int64 tensor holding uint32 values; returns the same."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    h = h ^ (h >> 16)
    return h


def row_key_torch(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[batch] int64 seeds, offsets -> [batch] int64 uint32 keys."""
    seeds = seeds.to(torch.int64)
    offsets = offsets.to(torch.int64)
    h = fmix32_torch((seeds & MASK32) ^ GOLDEN)
    h = fmix32_torch(h ^ ((seeds >> 32) & MASK32))
    h = fmix32_torch(h ^ (offsets & MASK32))
    return fmix32_torch(h ^ ((offsets >> 32) & MASK32))


def stream_key_torch(row_key: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """Broadcasting row_key [...] with position [...] -> per (row, position, stream) key."""
    return fmix32_torch(row_key ^ ((position * 4 + stream) & MASK32))


def element_hash_torch(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Broadcasting key [...] with index [...] (vocab indices) -> uint32 hashes as int64."""
    key2 = fmix32_torch(key ^ GOLDEN)
    return fmix32_torch(fmix32_torch(key ^ index) ^ key2)


def uniform_torch(h: torch.Tensor) -> torch.Tensor:
    """uint32 hashes (int64 tensor) -> fp32 uniforms in (0, 1), 24-bit midpoints."""
    return ((h >> 9) * 2 + 1).to(torch.float32) * TWO_POW_M24


def exponential_torch(h: torch.Tensor) -> torch.Tensor:
    """uint32 hashes (int64 tensor) -> fp32 Exp(1) variates, -log1p(-v) with a 32-bit v."""
    v = (h.to(torch.float32) + 0.5) * TWO_POW_M32
    series = ((((v * 0.25) + THIRD_F32) * v + 0.5) * v + 1.0) * v
    return torch.where(v < SMALL_V, series, -torch.log(1.0 - v))


def acceptance_uniforms_torch(seeds: torch.Tensor, offsets: torch.Tensor, k: int) -> torch.Tensor:
    """seeds, offsets [batch] -> [batch, k] fp32 uniforms for the acceptance test."""
    pos = torch.arange(k, device=seeds.device, dtype=torch.int64)
    key = stream_key_torch(row_key_torch(seeds, offsets)[:, None], pos[None, :], STREAM_ACCEPT)
    return uniform_torch(element_hash_torch(key, torch.zeros_like(key)))


def race_exponentials_torch(
    seeds: torch.Tensor, offsets: torch.Tensor, positions: int, vocab: int
) -> torch.Tensor:
    """seeds, offsets [batch] -> [batch, positions, vocab] fp32 Exp(1) variates."""
    dev = seeds.device
    pos = torch.arange(positions, device=dev, dtype=torch.int64)
    key = stream_key_torch(row_key_torch(seeds, offsets)[:, None], pos[None, :], STREAM_RACE)
    idx = torch.arange(vocab, device=dev, dtype=torch.int64)
    return exponential_torch(element_hash_torch(key[:, :, None], idx[None, None, :]))


# ---------------------------------------------------------------------------------------- triton

if HAS_TRITON:
    # jit functions may only read globals that are constexpr
    _MASK32_C = tl.constexpr(MASK32)
    _GOLDEN_C = tl.constexpr(GOLDEN)
    _FMIX_C1_C = tl.constexpr(FMIX_C1)
    _FMIX_C2_C = tl.constexpr(FMIX_C2)
    _TWO_POW_M24_C = tl.constexpr(TWO_POW_M24)
    _TWO_POW_M32_C = tl.constexpr(TWO_POW_M32)
    _SMALL_V_C = tl.constexpr(SMALL_V)
    _THIRD_F32_C = tl.constexpr(THIRD_F32)

    @triton.jit
    def fmix32_tl(h):
        """murmur3 fmix32 on uint32 tensors (wrapping multiply, logical shifts)."""
        h = h ^ (h >> 16)
        h = h * tl.full((), _FMIX_C1_C, tl.uint32)
        h = h ^ (h >> 13)
        h = h * tl.full((), _FMIX_C2_C, tl.uint32)
        h = h ^ (h >> 16)
        return h

    @triton.jit
    def _lo32(x):
        return (x.to(tl.int64) & _MASK32_C).to(tl.uint32)

    @triton.jit
    def _hi32(x):
        return ((x.to(tl.int64) >> 32) & _MASK32_C).to(tl.uint32)

    @triton.jit
    def row_key_tl(seed, offset):
        """int64 scalars -> uint32 row key (same as row_key_torch)."""
        h = fmix32_tl(_lo32(seed) ^ tl.full((), _GOLDEN_C, tl.uint32))
        h = fmix32_tl(h ^ _hi32(seed))
        h = fmix32_tl(h ^ _lo32(offset))
        return fmix32_tl(h ^ _hi32(offset))

    @triton.jit
    def stream_key_tl(row_key, position, stream: tl.constexpr):
        return fmix32_tl(row_key ^ (position * 4 + stream).to(tl.uint32))

    @triton.jit
    def element_hash_tl(key, index):
        """uint32 key scalar, int32 index tensor -> uint32 hashes."""
        key2 = fmix32_tl(key ^ tl.full((), _GOLDEN_C, tl.uint32))
        return fmix32_tl(fmix32_tl(key ^ index.to(tl.uint32)) ^ key2)

    @triton.jit
    def uniform_tl(h):
        return ((h >> 9) * 2 + 1).to(tl.float32) * _TWO_POW_M24_C

    @triton.jit
    def exponential_tl(h):
        v = (h.to(tl.float32) + 0.5) * _TWO_POW_M32_C
        series = ((((v * 0.25) + _THIRD_F32_C) * v + 0.5) * v + 1.0) * v
        return tl.where(v < _SMALL_V_C, series, -tl.log(1.0 - v))
