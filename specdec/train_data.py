"""Training examples for healing: records chat-templated as at inference, response masks,
length-grouped batches. `specdec.finetune` trains on them and `specdec.logit_cache` scores the
same examples with the target, so both build them here, from the same `Selection`."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, fields

import torch

from specdec.data import DataError, chat_ids
from specdec.turns import first_turns

DEFAULT_MAX_PROMPT_TOKENS = 512
DEFAULT_MAX_SEQ_LEN = 1024


@dataclass(frozen=True)
class Selection:
    """Which records become examples and how long they may be (the fields finetune and
    logit_cache share, under the same names as their command-line flags)."""

    data: str
    n: int | None
    split: str
    max_prompt_tokens: int
    max_answer_tokens: int | None
    max_seq_len: int

    @classmethod
    def of(cls, cfg) -> "Selection":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass
class Example:
    id: str
    input_ids: list[int]  # prompt then response
    n_prompt: int  # the first n_prompt tokens carry no loss

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def special_ids(model, tokenizer) -> tuple[set[int], int]:
    """(stop ids, pad id): the tokenizer's eos plus the generation config's eos ids; pad is the
    tokenizer's, else the smallest stop id."""
    stop_ids = {t for t in (tokenizer.eos_token_id,) if t is not None}
    gen_eos = model.generation_config.eos_token_id
    stop_ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    return stop_ids, pad_id


def build_example(tokenizer, record_id: str, prompt: list[dict[str, str]], response: str,
                  stop_ids: set[int], max_seq_len: int) -> Example | str:
    """Token ids of prompt + response as the chat template renders them at inference, or why
    not ('prefix_mismatch', 'empty_response', 'too_long').

    The prompt is rendered with the generation prompt; the whole conversation must start with
    exactly those tokens. The response tokens are what follows, up to and including the first
    stop token (the template's end-of-turn); anything the template adds after it is dropped.
    """
    response = response.strip()
    if not response:
        return "empty_response"
    prefix = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": response}],
                    add_generation_prompt=False)
    if full[:len(prefix)] != prefix:
        return "prefix_mismatch"
    tail = full[len(prefix):]
    cut = next((i for i, t in enumerate(tail) if t in stop_ids), None)
    if cut is not None:
        tail = tail[:cut + 1]
    ids = (prefix + tail)[:max_seq_len]
    if len(ids) <= len(prefix):
        return "too_long"
    return Example(record_id, ids, len(prefix))


def build_examples(sel: Selection, tokenizer, stop_ids: set[int],
                   counts: Counter) -> list[Example]:
    turns = first_turns(sel.data, tokenizer, sel.n, sel.split, sel.max_prompt_tokens, counts,
                        sel.max_answer_tokens)
    examples = []
    for t in turns:
        ex = build_example(tokenizer, t.id, t.prompt, t.reference, stop_ids, sel.max_seq_len)
        if isinstance(ex, str):
            counts[ex] += 1
        else:
            examples.append(ex)
    if turns and counts["prefix_mismatch"] > 0.1 * len(turns):
        raise DataError(
            f"{counts['prefix_mismatch']} of {len(turns)} records render differently with and "
            f"without the generation prompt: the chat template does not put the response right "
            f"after the prompt, so the loss mask would be wrong. Fix the tokenizer's "
            f"chat_template (it must render the generation prompt as the start of the "
            f"assistant turn).")
    if not examples:
        raise DataError(f"no training examples in {sel.data} (skipped: {dict(counts)}); check "
                        f"--data, --split, --max-prompt-tokens and --max-seq-len")
    return examples


def examples_sha256(examples: list[Example]) -> str:
    """The examples by content (ids, tokens, masks): equal hashes mean equal loss positions."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.id, e.n_prompt, e.input_ids]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The global batches of one epoch: a seeded shuffle; with grouping, each run of
    16 batches' worth of examples is sorted by length before it is cut into batches, and the
    batches are shuffled again, so a batch holds similar lengths (little padding)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    mega = batch_size * 16
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, loss_mask, labels): right padded; loss_mask[b, j] marks
    positions j whose logits predict a response token (labels holds those tokens in order:
    row by row, so the rows of `response_logits` follow the examples' order)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, :len(e.input_ids)] = 1
        loss_mask[row, e.n_prompt - 1:len(e.input_ids) - 1] = True
    labels = torch.cat([torch.tensor(e.input_ids[e.n_prompt:]) for e in examples])
    return (input_ids.to(device), attention_mask.to(device), loss_mask.to(device),
            labels.to(device))
