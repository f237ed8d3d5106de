"""A rehearsal of every stage on Llama-3.1's real tokenizer and shapes (issue #13).

The rehearsal target `llama-3.1-8b-rehearsal` is Llama-3.1-8B-Instruct's tokenizer, chat
template, vocabulary (128,256), GQA ratio (4), llama3 rope scaling, untied head and three EOS
ids at hidden 64 / 8 layers with random weights: what differs from SmolLM2 where bugs hide,
small enough for a CPU test. The tokenizer and chat template are checked token for token
against Meta's own code (`llama-models`' Tokenizer and ChatFormat, run from the pinned wheel).
"""

from __future__ import annotations

import sys

import pytest

from specdec.llama3 import EOS_TOKEN_IDS, special_tokens, system_header

REHEARSAL = "llama-3.1-8b-rehearsal"


@pytest.fixture(scope="module")
def meta():
    """llama-models' Tokenizer and ChatFormat, imported from the pinned wheel (a zip)."""
    pytest.importorskip("tiktoken", reason="tiktoken runs llama-models' reference tokenizer")
    from specdec.hub import fetch_source, fetch_wheel

    wheel = str(fetch_wheel("llama-models==0.3.0"))
    sys.path.insert(0, wheel)
    try:
        from llama_models.datatypes import RawMessage
        from llama_models.llama3.chat_format import ChatFormat
        from llama_models.llama3.tokenizer import Tokenizer
    finally:
        sys.path.remove(wheel)
    tokenizer = Tokenizer(fetch_source("llama3-tokenizer"))
    return tokenizer, ChatFormat(tokenizer), RawMessage


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.llama3 import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def target_path():
    from specdec.models import resolve_model

    return resolve_model(REHEARSAL)


TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs, 12345 numbers and 3.14159",
    "naïve café, 日本語, Ελληνικά, emoji 😀👍🏽",
    "def f(x):\n    return x ** 2  # comment\r\n",
    "I'm sure you're right; they'll say WE'D",
    "a" * 300 + " " * 20 + "b\n\n\n",
    "<|eot_id|> written as text",
    "",
]


def test_special_tokens_at_their_real_ids(tokenizer, meta):
    ref, _, _ = meta
    assert len(tokenizer) == 128256
    names = special_tokens()
    assert len(names) == 256
    assert ref.special_tokens == {s: 128000 + i for i, s in enumerate(names)}
    assert tokenizer.convert_tokens_to_ids(names) == list(range(128000, 128256))
    assert tokenizer.bos_token_id == ref.bos_id == 128000
    assert tokenizer.eos_token_id == ref.eot_id == 128009
    assert sorted(ref.stop_tokens) == list(EOS_TOKEN_IDS)
    assert tokenizer.pad_token_id is None  # as on the hub: every stage copes without one


def test_plain_text_matches_tiktoken(tokenizer, meta):
    from specdec.data import iter_records

    ref, _, _ = meta
    texts = TEXTS + [m["content"] for r in iter_records("mt-bench") for m in r.messages]
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours == ref.encode(text, bos=False, eos=False), text[:60]
        assert tokenizer.decode(ours) == text
    assert tokenizer("Hi").input_ids[0] == ref.bos_id  # the hub tokenizer prepends BOS too


def _dialogs():
    from specdec.data import iter_records

    mt = list(iter_records("mt-bench"))[:6]
    dialogs = [[{"role": "user", "content": r.messages[0]["content"]}] for r in mt[:3]]
    dialogs += [[{"role": "system", "content": "You are a terse assistant."},
                 *r.messages[:1], {"role": "assistant", "content": "Sure: here it is.\n\n- one"},
                 {"role": "user", "content": r.followups[0] if r.followups else "More."}]
                for r in mt[3:]]
    dialogs.append([{"role": "user", "content": "What does this print?"},
                    {"role": "assistant", "content": "Let me run it."},
                    {"role": "tool", "content": '{"stdout": "42\\n"}'}])
    dialogs.append([{"role": "system", "content": ""}, {"role": "user", "content": " spaced "}])
    return dialogs


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_llama_models_chat_format(tokenizer, meta, generation_prompt):
    """Our template == ChatFormat on the dialog with the date-stamped system header the hub's
    template writes (ChatFormat leaves the system text to the caller)."""
    from specdec.data import chat_ids

    ref, fmt, RawMessage = meta
    for dialog in _dialogs():
        system = dialog[0]["content"] if dialog[0]["role"] == "system" else ""
        rest = dialog[1:] if dialog[0]["role"] == "system" else dialog
        messages = [RawMessage(role="system", content=system_header() + system)]
        messages += [RawMessage(role=m["role"], content=m["content"]) for m in rest]
        if generation_prompt:
            expected = fmt.encode_dialog_prompt(messages).tokens
        else:
            expected = [ref.bos_id]
            for m in messages:
                expected += fmt.encode_message(m, tool_prompt_format=None)[0]
        assert chat_ids(tokenizer, dialog, add_generation_prompt=generation_prompt) == expected
    hi = [{"role": "user", "content": "hi"}]
    assert "Today Date: 26 Jul 2024\n\n" in tokenizer.apply_chat_template(hi, tokenize=False)
    other = tokenizer.apply_chat_template(hi, tokenize=False, date_string="1 Jan 2025")
    assert "Today Date: 1 Jan 2025\n\n" in other


def test_rehearsal_target_has_the_8b_layout(target_path):
    from specdec.models import known_config, load_config, model_info, read_manifest

    real, ours = known_config("llama-3.1-8b-instruct"), load_config(target_path)
    for key in ("vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "rope_parameters", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(real, key), key
    assert (ours.num_attention_heads // ours.num_key_value_heads
            == real.num_attention_heads // real.num_key_value_heads == 4)
    assert ours.num_key_value_heads > 1 and ours.hidden_size < 128
    info = model_info(REHEARSAL)
    assert info["tied_embeddings"] is False and info["vocab_size"] == 128256
    manifest = read_manifest(target_path)
    assert manifest["stage"] == "rehearsal" and len(manifest["weights_sha256"]) == 1
    gen = (target_path / "generation_config.json").read_text()
    assert all(str(i) in gen for i in EOS_TOKEN_IDS)
