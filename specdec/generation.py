"""Batched generation backends for data jobs (self-data distillation): transformers
`generate` with left padding and a KV cache (CPU or GPU), and vLLM's offline `LLM.generate`.

Both take chat-templated prompts as token ids and return `Generation`s: the new tokens without
the stop token, their text, and whether generation stopped on its own (False: cut off at
max_new_tokens, which the distillation filter rejects as truncated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, the stop token excluded
    text: str
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


class Generator(Protocol):
    def __call__(self, prompts: list[list[int]]) -> list[Generation]: ...


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


class TransformersGenerator:
    """Batched `model.generate`: left padding, KV cache, greedy or sampled."""

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        import torch

        self.torch = torch
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed, self.calls = seed, 0
        self.stop_ids = stop_token_ids(model.config, model.generation_config, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    def __call__(self, prompts: list[list[int]]) -> list[Generation]:
        torch = self.torch
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention_mask[row, width - len(p):] = 1
        sample = self.temperature > 0
        kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.pad_id, eos_token_id=self.stop_ids,
                                      use_cache=True)
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
            torch.manual_seed(self.seed + self.calls)
        else:  # silence the checkpoint's sampling defaults under greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
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
                 eager: bool = False, dtype: str = "auto"):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(
                "--engine vllm needs vLLM, which is not importable here "
                f"({exc}). Install it on a GPU machine (`pip install vllm`), or use "
                "--engine transformers."
            ) from exc
        self.stop_ids = set(stop_ids or [])
        kwargs: dict[str, Any] = {}
        if kv_cache_gib:  # a fixed KV cache instead of a share of all (GPU or CPU) memory
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        self.llm = LLM(model=str(model_path), seed=seed, max_model_len=max_model_len,
                       enforce_eager=eager, dtype=dtype, **kwargs)
        self.params = SamplingParams(temperature=temperature, top_p=top_p,
                                     max_tokens=max_new_tokens, seed=seed,
                                     stop_token_ids=sorted(self.stop_ids) or None)

    def __call__(self, prompts: list[list[int]]) -> list[Generation]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params,
                                 use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if tokens and tokens[-1] in self.stop_ids:
                tokens = tokens[:-1]  # vLLM keeps the stop token in token_ids
            results.append(Generation(tokens, c.text.strip(), c.finish_reason == "stop"))
        return results
