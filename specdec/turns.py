"""The records distill and finetune both start from: the first turn of each conversation (the
system messages and first user turn, with the original answer), selected alike by both stages,
and the hash that names a data source in provenance."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from specdec.data import BUILTIN, LoadReport, chat_ids, iter_records, source_file
from specdec.hub import SOURCES, file_sha256


@dataclass
class FirstTurn:
    """One training example: the prompt up to the first user turn, and the original answer."""

    id: str
    source: str
    prompt: list[dict[str, str]]  # system messages, then the first user turn
    reference: str  # the original answer to the first user turn
    category: str | None = None

    @property
    def instruction(self) -> str:
        return self.prompt[-1]["content"]


def first_turn(record) -> FirstTurn | str:
    """The first turn of a Record, or the reason it has none ('not_first_turn', 'no_reference')."""
    prompt = []
    for i, m in enumerate(record.messages):
        if m["role"] == "system":
            prompt.append(m)
            continue
        if m["role"] != "user":
            return "not_first_turn"  # a conversation part that starts mid-dialogue
        prompt.append(m)
        nxt = record.messages[i + 1] if i + 1 < len(record.messages) else None
        if nxt is None or nxt["role"] != "assistant" or not nxt["content"].strip():
            return "no_reference"
        return FirstTurn(record.id, record.source, prompt, nxt["content"], record.category)
    return "no_reference"


def first_turns(source: str, tokenizer, n: int | None = None, split: str = "train",
                max_prompt_tokens: int = 512, counts: Counter | None = None,
                max_answer_tokens: int | None = None) -> list[FirstTurn]:
    """The first n usable first turns of `source`, in data order.

    Built-in sources are read in `split`; local files whole. Records that start mid-dialogue,
    have no answer, whose chat-templated prompt exceeds `max_prompt_tokens`, or (if given)
    whose answer exceeds `max_answer_tokens` are skipped and counted in `counts`. distill and
    finetune both select with this, so an SFT run on `--data sharegpt --n N` trains on the same
    records that distill rewrote with `--n N`.
    """
    counts = counts if counts is not None else Counter()
    report = LoadReport()
    out: list[FirstTurn] = []
    for record in iter_records(source, split=split if source in BUILTIN else "all",
                               report=report):
        turn = first_turn(record)
        if isinstance(turn, str):
            counts[turn] += 1
            continue
        if len(chat_ids(tokenizer, turn.prompt)) > max_prompt_tokens:
            counts["prompt_too_long"] += 1
            continue
        if max_answer_tokens is not None and len(
                tokenizer(turn.reference, add_special_tokens=False)["input_ids"]) \
                > max_answer_tokens:
            counts["answer_too_long"] += 1
            continue
        out.append(turn)
        if n is not None and len(out) >= n:
            break
    if report.skipped:
        counts["malformed"] += report.skipped
    return out


def data_sha256(source: str) -> str:
    """The sha256 of a data source's file (pinned for built-ins, hashed for local files)."""
    if source in SOURCES:
        return SOURCES[source].sha256
    path, _ = source_file(source)  # a clear DataError for a missing or unsupported file
    return file_sha256(path)
