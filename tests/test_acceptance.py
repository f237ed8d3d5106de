"""Teacher-forced acceptance: agreement, alpha, and the greedy MAL simulation vs real decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from specdec.acceptance import (
    compare,
    greedy_accepted_length,
    greedy_continuations,
    make_batches,
)


def _noisy_copy(model, scale: float, seed: int = 1):
    """A draft that agrees with the target often but not always."""
    draft = make_tiny_llama(seed=0, num_layers=model.config.num_hidden_layers,
                            tie_word_embeddings=model.config.tie_word_embeddings)
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return draft


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0].tolist()


@torch.no_grad()
def _speculative(target, draft, prompt: list[int], n: int, k: int) -> tuple[list[int], int]:
    """Plain greedy speculative decoding (no caches): returns (output, target forwards)."""
    out, steps = list(prompt), 0
    while len(out) - len(prompt) < n:
        proposal = list(out)
        for _ in range(k):
            proposal.append(int(draft(torch.tensor([proposal])).logits[0, -1].argmax()))
        logits = target(torch.tensor([proposal])).logits[0]
        steps += 1
        for j in range(k + 1):
            choice = int(logits[len(out) - 1].argmax())
            accepted = j < k and proposal[len(out)] == choice
            out.append(choice)
            if not accepted or len(out) - len(prompt) >= n:
                break
    return out, steps


def test_greedy_accepted_length_by_hand():
    assert greedy_accepted_length([True] * 10, 4) == (10, 2)
    assert greedy_accepted_length([False] * 7, 3) == (7, 7)
    # blocks: [T T F] -> 3 tokens; [T] then end... start 3: T, F -> 2 committed
    assert greedy_accepted_length([True, True, False, True, False], 4) == (5, 2)
    assert greedy_accepted_length([True, True, True], 1) == (3, 2)  # k caps the run
    with pytest.raises(ValueError, match="k must be"):
        greedy_accepted_length([True], 0)


@pytest.mark.parametrize("k", [1, 3])
def test_mal_matches_real_speculative_decoding(k):
    # Untied: a tied random tiny model's greedy text just repeats its last token.
    target = make_tiny_llama(seed=0, num_layers=2, tie_word_embeddings=False)
    draft = _noisy_copy(target, scale=0.3)
    prompts = [[5, 17, 33, 8], [9, 40, 5, 71, 12, 60]]
    n = 24
    sequences, committed, steps = [], 0, 0
    for prompt in prompts:
        text = _greedy(target, prompt, n)
        spec_out, forwards = _speculative(target, draft, prompt, n, k)
        assert spec_out == text  # lossless greedy
        sequences.append(text)
        committed += n
        steps += forwards
    report = compare(target, draft, sequences, [len(p) for p in prompts], ks=(k,), progress=False)
    assert report.target_matches_text == 1.0
    assert 0.0 < report.top1_agreement < 1.0  # a draft that is neither perfect nor useless
    assert report.mean_accepted_length[k] == pytest.approx(committed / steps)
    assert report.tokens == 2 * n


def test_greedy_continuations_batched_equal_one_by_one():
    target = make_tiny_llama(seed=0, num_layers=2, tie_word_embeddings=False)
    prompts = [[5, 17, 33, 8], [9, 40], [11, 12, 13, 14, 15, 16, 17]]
    want = [_greedy(target, p, 10) for p in prompts]
    assert greedy_continuations(target, prompts, 10, eos_token_id=None, batch_size=2) == want
    # cut after the first EOS: make the first generated token of prompt 0 the EOS
    eos = want[0][4]
    got = greedy_continuations(target, prompts[:1], 10, eos_token_id=[eos], pad_token_id=0)
    assert got == [want[0][:5]]


def test_alpha_matches_reference_and_padding_does_not_matter():
    target = make_tiny_llama(seed=0, num_layers=2, tie_word_embeddings=False)
    draft = _noisy_copy(target, scale=0.5, seed=3)
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 13, 9, 2)]
    prompt_lens = [2, 4, 1, 1]
    a = compare(target, draft, sequences, prompt_lens, temperature=0.7, batch_size=1,
                progress=False)
    b = compare(target, draft, sequences, prompt_lens, temperature=0.7, batch_size=3,
                progress=False)
    assert a.tokens == b.tokens == 3 + 9 + 8 + 1
    assert a.alpha == pytest.approx(b.alpha, abs=1e-5)
    assert a.top1_agreement == b.top1_agreement
    assert a.per_sequence_agreement == b.per_sequence_agreement
    # Reference: full forwards one sequence at a time.
    alphas, agrees = [], []
    with torch.no_grad():
        for seq, p in zip(sequences, prompt_lens):
            ids = torch.tensor([seq])
            t, d = target(ids).logits[0, max(p - 1, 0):-1], draft(ids).logits[0, max(p - 1, 0):-1]
            tp, dp = torch.softmax(t / 0.7, -1), torch.softmax(d / 0.7, -1)
            alphas.append(torch.minimum(tp, dp).sum(-1))
            agrees.append(t.argmax(-1) == d.argmax(-1))
    assert a.alpha == pytest.approx(float(torch.cat(alphas).mean()), abs=1e-5)
    assert a.top1_agreement == pytest.approx(float(torch.cat(agrees).float().mean()))
    assert 0.0 < a.top1_agreement < 1.0


def test_identical_draft_accepts_everything():
    target = make_tiny_llama(seed=0, num_layers=2)
    sequences = [list(range(3, 30)), list(range(40, 52))]
    report = compare(target, target, sequences, [4, 4], ks=(1, 4), temperature=1.0,
                     progress=False)
    assert report.top1_agreement == 1.0
    assert report.alpha == pytest.approx(1.0, abs=1e-5)
    assert report.mean_accepted_length[1] == pytest.approx(2.0, abs=0.1)
    assert report.mean_accepted_length[4] > 4.0
    greedy = compare(target, target, sequences, [4, 4], temperature=0.0, progress=False)
    assert greedy.alpha == 1.0 and greedy.kl is None


def test_errors():
    with pytest.raises(ValueError, match="no sequences"):
        make_batches([])
    with pytest.raises(ValueError, match="nothing to score"):
        make_batches([[1, 2, 3]], prompt_lens=[3])
    with pytest.raises(ValueError, match="one prompt length per sequence"):
        make_batches([[1, 2, 3]], prompt_lens=[1, 1])
    target = make_tiny_llama(seed=0, num_layers=1)
    other = make_tiny_llama(seed=0, num_layers=1, vocab_size=101)
    with pytest.raises(ValueError, match="vocabulary"):
        compare(target, other, [[3, 4, 5]], progress=False)
