"""Sampling parameters, logit processing and the draft's token choice.

One request's decoding is described by `SamplingParams` (temperature 0 means greedy). The
speculative engine needs three things from it, all batched over rows with per-row parameters:

* `process_logits` / `apply_top_k_top_p`: the top-k / top-p mask, applied the *same way* to the
  target and to the draft. Masked entries become -inf; the logits are otherwise returned
  unscaled (the verification kernel divides by the temperature itself). Top-p is computed on
  the temperature-scaled distribution (as Hugging Face and vLLM do), top-k first, then top-p
  over what top-k kept. Greedy rows are never masked (neither mask can remove the argmax).
  The target distribution the engine is lossless against is therefore
  ``softmax(process_logits(target_logits) / temperature)``.
* `sample`: one token per row from ``softmax(logits / temperature)`` (argmax for greedy rows),
  used by the draft (and by target-only decoding). Randomness is counter based, never a
  stateful generator: the exponential race ``argmax_x logits[x] / T - log(E_x)`` with
  ``E_x = Exp(1)`` drawn from the same hash as the kernels (`specdec.kernels.rng`):
  ``hash(seed, offset, position, stream, x)``, on streams the kernels do not use
  (`STREAM_DRAFT`, `STREAM_TARGET`). So a row's draws depend only on its own seed and step
  counter, never on the batch it shares, the device or earlier calls; no host sync happens.
* `SamplingTensors`: the per-row parameters as device tensors, built once per `generate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdec.kernels.rng import (
    element_hash_torch,
    exponential_torch,
    row_key_torch,
    stream_key_torch,
)

# The kernels use streams 0 (acceptance uniforms) and 1 (recovered / bonus race); the hash
# mixes ``position * 4 + stream``, so streams 2 and 3 are disjoint from theirs.
STREAM_DRAFT = 2
STREAM_TARGET = 3
MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    """How to decode one request.

    temperature: 0 for greedy decoding, else the softmax temperature (> 0).
    top_p: nucleus sampling mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 (or -1) disables it.
    max_tokens: the most tokens generated (>= 1); never exceeded, even when one speculative
        step commits several tokens.
    stop: strings that end the generation (needs the engine's tokenizer); the returned text
        stops before the stop string, the token ids end with the token that completed it.
    stop_token_ids: token ids that end the generation (kept in the output, like EOS).
    seed: per-request seed (int in [0, 2**63)); None draws one from torch's default generator.
    ignore_eos: keep generating past EOS tokens (stop_token_ids still apply).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}"
            )
        self.temperature = float(self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        self.top_p = float(self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of token ids (ints >= 0), got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = list(self.stop_token_ids)
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh one from torch's default generator (so torch.manual_seed
    makes unseeded requests reproducible too)."""
    if params.seed is not None:
        return params.seed
    return int(torch.randint(0, 2**62, (1,)).item())


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, plus host flags that pick code paths."""

    temperature: torch.Tensor  # [batch] fp32, 0 for greedy rows
    top_k: torch.Tensor  # [batch] int64, 0 = off (always 0 for greedy rows)
    top_p: torch.Tensor  # [batch] fp32, 1 = off (always 1 for greedy rows)
    seeds: torch.Tensor  # [batch] int64
    greedy: list[bool]  # host copy, per row
    filtered: list[bool]  # host copy, per row: top_k or top_p on (never for greedy rows)

    @property
    def needs_filter(self) -> bool:
        return any(self.filtered)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        seeds: Sequence[int] | None = None,
    ) -> SamplingTensors:
        if seeds is None:
            seeds = [resolve_seed(p) for p in params]
        greedy = [p.greedy for p in params]
        top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        return cls(
            temperature=torch.tensor(
                [p.temperature for p in params], dtype=torch.float32, device=device
            ),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=device),
            greedy=greedy,
            filtered=[k > 0 or p < 1.0 for k, p in zip(top_k, top_p)],
        )

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)

    @property
    def any_greedy(self) -> bool:
        return any(self.greedy)

    def select(self, rows: torch.Tensor, host_rows: Sequence[int]) -> SamplingTensors:
        """Keep only `rows` ([n] int64 on the device; `host_rows` the same as a list)."""
        return SamplingTensors(
            temperature=self.temperature[rows],
            top_k=self.top_k[rows],
            top_p=self.top_p[rows],
            seeds=self.seeds[rows],
            greedy=[self.greedy[i] for i in host_rows],
            filtered=[self.filtered[i] for i in host_rows],
        )


def apply_top_k_top_p(
    logits: torch.Tensor,  # [batch, ..., vocab]
    temperature: torch.Tensor,  # [batch] fp32, 0 for greedy rows
    top_k: torch.Tensor,  # [batch] int64, 0 = off
    top_p: torch.Tensor,  # [batch] fp32, 1 = off
) -> torch.Tensor:
    """Logits with the entries outside top-k / top-p set to -inf (same shape and dtype).

    Top-k first, then top-p on the temperature-scaled softmax of what top-k kept; the most
    likely token is always kept. Ties at the top-k boundary are broken by the sort, the same
    way every time for the same input.
    """
    shape = logits.shape
    batch, vocab = shape[0], shape[-1]
    x = logits.reshape(batch, -1, vocab).float()  # [batch, n, vocab]
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    sorted_vals, sorted_idx = torch.sort(x / scale[:, None, None], dim=-1)  # ascending
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    remove = rank[None, None, :] < (vocab - k)[:, None, None]  # [batch, 1, vocab]
    sorted_vals = sorted_vals.masked_fill(remove, float("-inf"))
    cum = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
    remove = remove | (cum <= (1.0 - top_p)[:, None, None])
    remove[..., -1] = False  # keep the most likely token
    mask = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask.reshape(shape), float("-inf"))


def process_logits(
    logits: torch.Tensor,  # [batch, vocab] or [batch, n, vocab]
    params: SamplingParams | Sequence[SamplingParams],
) -> torch.Tensor:
    """Top-k / top-p masking with one `SamplingParams` for all rows or one per row."""
    if isinstance(params, SamplingParams):
        params = [params] * logits.shape[0]
    if len(params) != logits.shape[0]:
        raise ValueError(
            f"got {len(params)} SamplingParams for {logits.shape[0]} logit rows; pass one "
            "SamplingParams or one per row"
        )
    t = SamplingTensors.from_params(params, logits.device, seeds=[0] * len(params))
    if not t.needs_filter:
        return logits
    return apply_top_k_top_p(logits, t.temperature, t.top_k, t.top_p)


def sampling_exponentials(
    seeds: torch.Tensor,  # [batch] int64
    offsets: torch.Tensor,  # [batch] int64
    position: int,
    vocab: int,
    stream: int,
) -> torch.Tensor:
    """[batch, vocab] fp32 Exp(1) variates from hash(seed, offset, position, stream, x)."""
    pos = torch.full_like(offsets, position)
    key = stream_key_torch(row_key_torch(seeds, offsets), pos, stream)  # [batch]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    return exponential_torch(element_hash_torch(key[:, None], idx[None, :]))


def sample(
    logits: torch.Tensor,  # [batch, vocab], already through process_logits
    temperature: torch.Tensor | float,  # [batch] fp32 (0 = greedy row) or one float
    seeds: torch.Tensor | None = None,  # [batch] int64
    offsets: torch.Tensor | None = None,  # [batch] int64 (the engine's per-row step counter)
    position: int = 0,
    stream: int = STREAM_DRAFT,
) -> torch.Tensor:
    """One token per row ([batch] int64): argmax for greedy rows, else a draw from
    softmax(logits / temperature) by the exponential race on counter-hash randomness."""
    greedy_tokens = logits.argmax(dim=-1)
    if not isinstance(temperature, torch.Tensor):
        if temperature == 0:
            return greedy_tokens
        temperature = torch.full((logits.shape[0],), float(temperature), device=logits.device)
    if seeds is None or offsets is None:
        raise ValueError("sample() needs seeds and offsets ([batch] int64) for sampled rows")
    exps = sampling_exponentials(seeds, offsets, position, logits.shape[-1], stream)
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    race = logits.float() / scale[:, None] - torch.log(exps)
    sampled_tokens = race.argmax(dim=-1)
    return torch.where(temperature > 0, sampled_tokens, greedy_tokens)
