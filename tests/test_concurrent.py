"""Concurrent drafting (specdec.decode.concurrent): the draft drafts in a worker process while
the target verifies. Lossless whatever the timing: greedy output identical to the target alone
with a draft that is always right (the target itself), a pruned one with a trimmed vocabulary
and a w8 one, each at full speed and slowed down (so drafts arrive both before and after the
tokens they guess are committed); sampled output distributed as the target's (chi-square)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, tiny_chat_tokenizer
from test_decode_engine import (  # noqa: F401  (one_thread, target: fixtures)
    PROMPTS,
    assert_same_greedy,
    drop_layers,
    one_thread,
    spread,
    target,
)
from test_decode_sampling import VOCAB, sample_first_three

from specdec.decode.concurrent import ConcurrentEngine, DraftSpec, WorkerError
from specdec.decode.reference import target_generate
from specdec.decode.sampling import SamplingParams
from specdec.models import save_checkpoint
from specdec.vocab import DraftVocab


def save(model, path):
    return str(save_checkpoint(model, tiny_chat_tokenizer(), path, {"stage": "test"}))


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, target):
    root = tmp_path_factory.mktemp("drafts")
    pruned = save(drop_layers(target, [0, 3]), root / "pruned")
    DraftVocab(torch.arange(0, 97, 2), target.config.vocab_size).save(pruned)  # trimmed head
    return {"self": save(target, root / "self"), "pruned": pruned}


@pytest.mark.slow
@pytest.mark.parametrize("which, dtype", [("self", "fp32"), ("pruned", "fp32"), ("pruned", "w8")])
@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_greedy_is_the_target(target, drafts, which, dtype, delay):
    """min_drafts 0: the target never waits (a slowed draft's tokens arrive after the tokens
    they guess are committed); 1 and k: it waits for drafts (an always-right draft then has
    nearly every token accepted)."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    spec = DraftSpec(drafts[which], dtype=dtype, delay_s=delay)
    with ConcurrentEngine(target, spec, k=3) as engine:
        assert engine.draft_info["draft_vocab_n"] == (None if which == "self" else 49)
        for k, wait in ((1, 0), (3, 1), (3, 3)):
            engine.k, engine.min_drafts = k, wait
            results = engine.generate(PROMPTS, params)
            for prompt, r in zip(PROMPTS, results):
                assert_same_greedy(target, prompt, r.token_ids,
                                   target_generate(target, prompt, params))
                assert r.committed >= len(r.token_ids) == 24 and r.drafted <= k * r.steps
                assert r.accepted + r.recovered + r.bonus == r.committed
            if which == "self" and wait == k:  # always right: k accepted per step but the first
                assert sum(r.accepted for r in results) >= k * (sum(r.steps for r in results)
                                                                - len(results))


@pytest.mark.slow
def test_sampling_is_the_target_distribution(tmp_path):
    small = spread(make_tiny_llama(seed=3, vocab_size=VOCAB), 5.0)
    path = save(drop_layers(small, [0, 3]), tmp_path / "draft")
    with ConcurrentEngine(small, DraftSpec(path), k=2, eos_token_ids=[]) as engine:
        results, _ = sample_first_three(engine, small)
    assert sum(r.accepted for r in results) > 0 and sum(r.drafted for r in results) > 0


@pytest.mark.slow
def test_stops_and_errors(target, drafts, tmp_path):
    with ConcurrentEngine(target, drafts["self"], k=2) as engine:
        (r,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5,
                                                            ignore_eos=True))
        assert len(r.token_ids) == 5 and r.finish_reason == "length"
        seen = []
        (r,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12,
                                                            ignore_eos=True),
                               stream=lambda i, toks: seen.extend(toks) or len(seen) >= 3)
        assert r.finish_reason == "abort" and seen == r.token_ids and len(seen) >= 3
        with pytest.raises(ValueError, match="token ids"):
            engine.generate([[]], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ValueError, match="k must be"):
        ConcurrentEngine(target, drafts["self"], k=0)
    with pytest.raises(WorkerError, match="failed"):  # not a checkpoint: the worker says why
        ConcurrentEngine(target, DraftSpec(str(tmp_path / "missing")))
