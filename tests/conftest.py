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


# ---------------------------------------------------------------------------- tiny chat models
# A character-level tokenizer with a chat template, and tiny Llamas saved with it, for the
# distill / finetune / merge tests.

import json  # noqa: E402
import string  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_chat_tokenizer(template: str = CHAT_TEMPLATE):
    """A character-level tokenizer (106 ids) with a chat template, built in memory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = template
    return tokenizer


def save_tiny_chat_model(path, seed=0, num_layers=2, manifest=None, **config):
    """A tiny random Llama with the tiny chat tokenizer, saved as a checkpoint dir."""
    from specdec.models import save_checkpoint

    tokenizer = tiny_chat_tokenizer()
    model = make_tiny_llama(seed, num_layers=num_layers, vocab_size=len(tokenizer), **config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_checkpoint(model, tokenizer, path, manifest or {"stage": "test"})


def write_chat_data(path, n=6):
    """JSONL records: n usable first turns plus three that selection must skip."""
    rows = [{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Say {'hi ' * (i % 3 + 1)}number {i}"},
        {"role": "assistant", "content": f"Hi {i}! Here is {i}."},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]}
        for i in range(n)]
    rows.insert(2, {"id": "mid", "messages": [{"role": "assistant", "content": "a"},
                                              {"role": "user", "content": "b"}]})
    rows.insert(3, {"id": "noanswer", "messages": [{"role": "user", "content": "alone"}]})
    rows.insert(4, {"id": "long", "messages": [{"role": "user", "content": "x" * 200},
                                               {"role": "assistant", "content": "y"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
