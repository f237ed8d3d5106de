"""The slow references themselves: `speculative_step`, `reference_generate`, `target_generate`.

The engine is checked against these (test_decode_engine.py); here they are checked against
first principles: greedy speculative decoding equals target greedy decoding, a perfect draft is
always accepted, and the reference's sampled first token follows the target distribution
(chi-square, significance 0.001, fixed seeds).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from specdec.decode.reference import reference_generate, speculative_step, target_generate
from specdec.decode.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 13], [1, 7], [3, 3, 8, 22, 40]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spread(model, scale: float = 10.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model


@pytest.fixture(scope="module")
def target():
    return spread(make_tiny_llama(seed=0))


@pytest.fixture(scope="module")
def draft():
    return spread(make_tiny_llama(seed=5, num_layers=1))


def test_target_generate_greedy_is_argmax_decoding(target):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt in PROMPTS:
        out = target_generate(target, prompt, params)
        seq = list(prompt)
        with torch.inference_mode():  # no cache, one full forward per token
            for _ in range(8):
                seq.append(int(target(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out == seq[len(prompt) :]


def test_target_generate_stops(target):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = target_generate(target, PROMPTS[0], greedy)
    eos = full[6]
    cut = full[: full.index(eos) + 1]
    with_eos = SamplingParams(temperature=0, max_tokens=12)
    assert target_generate(target, PROMPTS[0], with_eos, [eos]) == cut
    stop_ids = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[eos], ignore_eos=True)
    assert target_generate(target, PROMPTS[0], stop_ids) == cut
    assert len(target_generate(target, PROMPTS[0], SamplingParams(max_tokens=5, seed=0))) <= 5


def test_target_generate_sampling_seeded(target):
    a = SamplingParams(temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    b = SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True)
    assert target_generate(target, PROMPTS[1], a) == target_generate(target, PROMPTS[1], a)
    assert target_generate(target, PROMPTS[1], a) != target_generate(target, PROMPTS[1], b)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_reference_greedy_equals_target(target, draft, k):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for prompt in PROMPTS:
        out, accepted = reference_generate(target, draft, prompt, params, k=k)
        assert out == target_generate(target, prompt, params)
        assert all(0 <= a <= k for a in accepted)


def test_perfect_draft_is_always_accepted(target):
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([PROMPTS[0]])
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5)):
        new, accepted = speculative_step(target, target, ids, 4, params, generator)
        assert accepted == 4 and len(new) == 5


def test_reference_sampling_first_token_is_the_targets():
    """A draft far from the target; the first token is accepted or recovered in step 1."""
    vocab, n = 16, 1200
    target = spread(make_tiny_llama(seed=3, vocab_size=vocab), 5.0)
    draft = spread(make_tiny_llama(seed=4, vocab_size=vocab, num_layers=1), 5.0)
    prompt = [1, 5, 9]
    params = SamplingParams(temperature=1.0)
    ids = torch.tensor([prompt])
    generator = torch.Generator().manual_seed(0)
    first = [speculative_step(target, draft, ids, 1, params, generator)[0][0] for _ in range(n)]
    with torch.inference_mode():
        probs = torch.softmax(target(ids).logits[0, -1].double(), dim=-1)
    counts = torch.bincount(torch.tensor(first), minlength=vocab).double()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((vocab - 1) / 2.0, dtype=torch.float64)
    p_value = float(torch.special.gammaincc(dof, stat / 2))
    assert p_value > 1e-3, p_value
