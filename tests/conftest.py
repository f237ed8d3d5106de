"""Shared fixtures: tiny random Llama models for mechanics, the real SmolLM2 for integration.

Tiny models are built in memory in milliseconds; they are for testing mechanics only, never
for a number anyone reports.
"""

from __future__ import annotations

import os

# Before anything imports triton (transformers does): Triton runs on the CPU only as its
# interpreter, and it reads this once at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama_config(
    num_layers: int = 4,
    vocab_size: int = 97,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_tiny_llama(seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM in fp32, eval mode, deterministic per seed."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs))
    return model.eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2_path():
    """The embedded default target as a converted checkpoint dir (fetched once per cache)."""
    from specdec.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
