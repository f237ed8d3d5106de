"""Sampling: parameters, top-k / top-p, the draft sampler, and the engine's losslessness.

The statistical tests run the engine on a tiny model with a 16-token vocabulary, N = 4000
requests (one batch, seeds 0..N-1, so every row is an independent sample) and compare

* the joint distribution of the first two generated tokens (256 cells, cells with an expected
  count under 5 pooled), and
* the marginal distribution of the third token (committed by a later step, after a rollback),

with the exact target distribution (computed by enumerating the target's next-token
distributions), by Pearson's chi-square test at significance 0.001 (the test fails if
p < 0.001). Seeds are fixed, so each test is deterministic: with 10 such comparisons a correct
engine would be flagged with probability about 1% over a random choice of seeds, and the
seeds used here pass. A negative control shows the test has power: samples from the draft
alone (what a lossy engine would emit) are rejected.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from specdec.decode.engine import SpeculativeEngine
from specdec.decode.sampling import (
    STREAM_DRAFT,
    SamplingParams,
    apply_top_k_top_p,
    process_logits,
    sample,
)

SIGNIFICANCE = 1e-3
N = 4000
VOCAB = 16
PROMPT = [1, 5, 9]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spread(model, scale: float):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model


def drop_layers(model, keep: list[int]):
    draft = copy.deepcopy(model)
    draft.model.layers = torch.nn.ModuleList([draft.model.layers[i] for i in keep])
    for i, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = i
    draft.config.num_hidden_layers = len(keep)
    return draft


class OneTokenDraft(torch.nn.Module):
    """A draft whose logits put all mass on one token: wrong almost everywhere."""

    def __init__(self, inner, token: int):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.token = token

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = torch.full_like(out.logits, float("-inf"))
        logits[..., self.token] = 0.0
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def target():
    return spread(make_tiny_llama(seed=3, vocab_size=VOCAB), 5.0)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of counts against probs (cells expecting < 5 pooled)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    expected, counts = expected[expected > 0], counts[expected > 0]
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def exact_distributions(model, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(joint of tokens 1-2 [V, V], marginal of token 3 [V]) under the processed target."""

    def next_probs(seqs: torch.Tensor) -> torch.Tensor:  # [n, len] -> [n, V]
        with torch.inference_mode():
            logits = model(seqs).logits[:, -1].float()
        logits = process_logits(logits, params)
        return torch.softmax(logits / params.temperature, dim=-1)

    prompt = torch.tensor([PROMPT])
    p1 = next_probs(prompt)[0]  # [V]
    x1 = torch.arange(VOCAB)[:, None]
    seq2 = torch.cat([prompt.expand(VOCAB, -1), x1], dim=1)  # [V, len + 1]
    joint = p1[:, None] * next_probs(seq2)  # [V, V]
    seq3 = torch.cat(
        [seq2.repeat_interleave(VOCAB, dim=0), torch.arange(VOCAB).repeat(VOCAB)[:, None]], dim=1
    )  # [V * V, len + 2]
    p3 = (joint.flatten()[:, None] * next_probs(seq3)).sum(0)  # [V]
    return joint, p3


def engine_counts(engine, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of (token 1, token 2) pairs [V, V] and of token 3 [V] over N seeds."""
    per_row = [
        SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                       max_tokens=3, ignore_eos=True, seed=seed)
        for seed in range(N)
    ]
    results = engine.generate([PROMPT] * N, per_row)
    tokens = torch.tensor([r.token_ids for r in results])  # [N, 3]
    for r in results:
        assert r.accepted + r.recovered + r.bonus == r.committed >= 3
    pairs = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    return pairs.reshape(VOCAB, VOCAB), torch.bincount(tokens[:, 2], minlength=VOCAB)


CASES = {
    # name: (draft builder, k, SamplingParams, adaptive_k)
    "pruned-k2": (lambda t: drop_layers(t, [0, 3]), 2, SamplingParams(temperature=1.0), False),
    "random-k3-adaptive": (
        lambda t: spread(make_tiny_llama(seed=11, vocab_size=VOCAB, num_layers=2), 5.0), 3,
        SamplingParams(temperature=0.8), True,
    ),
    "one-token-k1": (lambda t: OneTokenDraft(t, token=4), 1, SamplingParams(temperature=1.0), False),
    "one-token-k4": (lambda t: OneTokenDraft(t, token=4), 4, SamplingParams(temperature=1.3), False),
    "pruned-topk-topp": (
        lambda t: drop_layers(t, [1, 2]), 3, SamplingParams(temperature=0.9, top_k=6, top_p=0.8), False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_samples_the_target_distribution(target, case):
    build, k, params, adaptive = CASES[case]
    engine = SpeculativeEngine(target, build(target), k=k, adaptive_k=adaptive, eos_token_ids=[])
    pairs, third = engine_counts(engine, params)
    joint, p3 = exact_distributions(target, params)
    if params.top_k:  # tokens outside top-k / top-p are never emitted
        assert int(pairs[joint == 0].sum()) == 0 and int(third[p3 == 0].sum()) == 0
    p_joint, p_third = chi_square_p(pairs, joint), chi_square_p(third, p3)
    assert p_joint > SIGNIFICANCE, f"tokens 1-2 differ from the target's (p = {p_joint:.2e})"
    assert p_third > SIGNIFICANCE, f"token 3 differs from the target's (p = {p_third:.2e})"


def test_chi_square_has_power(target):
    """Negative control: the pruned draft's own samples are rejected as target samples."""
    draft = drop_layers(target, [0, 3])
    params = SamplingParams(temperature=1.0)
    draft_only = SpeculativeEngine(draft, None, eos_token_ids=[])
    pairs, third = engine_counts(draft_only, params)
    joint, _ = exact_distributions(target, params)
    assert chi_square_p(pairs, joint) < SIGNIFICANCE
    # and the same counts pass against the draft's own distribution
    assert chi_square_p(pairs, exact_distributions(draft, params)[0]) > SIGNIFICANCE


# ------------------------------------------------------------------------- the pieces


def test_params_validation_names_the_field():
    bad = {
        "temperature": [-0.1, float("nan"), "hot"],
        "top_p": [0.0, 1.5],
        "top_k": [-2, 1.5],
        "max_tokens": [0, 2.0],
        "stop": [[""], [3]],
        "stop_token_ids": [[-1], ["a"]],
        "seed": [-1, 2**63, 1.0],
        "ignore_eos": ["yes"],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: value})
    p = SamplingParams(top_k=-1, stop="###")
    assert (p.top_k, p.stop) == (0, ["###"])
    assert SamplingParams(temperature=0).greedy


def _top_p_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Keep set by a plain loop: the top_k best, then the shortest prefix reaching top_p."""
    order = torch.argsort(logits, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order] / temperature, dim=-1)
    keep, total = [], 0.0
    for token, prob in zip(order, probs.tolist()):
        keep.append(token)
        total += prob
        if top_p < 1.0 and total >= top_p - 1e-6:
            break
    out = torch.full_like(logits, float("-inf"))
    out[keep] = logits[keep]
    return out


def test_top_k_top_p_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 50, generator=gen) * 3  # [batch, positions, vocab]
    settings = [(1.0, 0, 0.9), (0.5, 5, 1.0), (2.0, 10, 0.6), (1.0, 1, 1.0), (0.7, 0, 0.3), (1.0, 0, 1.0)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    out = process_logits(logits, params)
    for b, (t, k, p) in enumerate(settings):
        for i in range(2):
            torch.testing.assert_close(out[b, i], _top_p_reference(logits[b, i], t, k, p))
    # greedy rows are never masked, and a lone SamplingParams applies to every row
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1)
    assert torch.equal(process_logits(logits, greedy), logits)
    assert torch.isinf(process_logits(logits[:, 0], SamplingParams(top_k=3))).sum(-1).eq(47).all()


def test_sample_greedy_seeded_and_distributed():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, VOCAB, generator=gen)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    temps = torch.tensor([0.0, 1.0] * 4)
    seeds = torch.arange(8)
    offsets = torch.zeros(8, dtype=torch.int64)
    a = sample(logits, temps, seeds, offsets)
    assert torch.equal(a, sample(logits, temps, seeds, offsets))  # counter-based: repeatable
    assert torch.equal(a[0::2], logits.argmax(-1)[0::2])  # greedy rows
    # many seeds of one row follow softmax(logits / T) (top-k masked)
    row = apply_top_k_top_p(logits[:1], torch.tensor([0.7]), torch.tensor([8]), torch.tensor([1.0]))
    n = 20000
    tokens = sample(
        row.expand(n, -1), torch.full((n,), 0.7), torch.arange(n), torch.full((n,), 3),
        position=2, stream=STREAM_DRAFT,
    )
    probs = torch.softmax(row[0] / 0.7, dim=-1)
    assert chi_square_p(torch.bincount(tokens, minlength=VOCAB), probs) > SIGNIFICANCE
    assert int(torch.bincount(tokens, minlength=VOCAB)[probs == 0].sum()) == 0


def sample_first_three(engine, target, n: int = 4000, significance: float = 1e-3):
    """n seeded 3-token samples of PROMPT through `engine`; asserts the (first, second) pairs and
    the third tokens are distributed as `target`'s (chi-square); returns (results, tokens)."""
    per_row = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=s)
               for s in range(n)]
    results = engine.generate([PROMPT] * n, per_row)
    tokens = torch.tensor([r.token_ids for r in results])
    pairs = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    third = torch.bincount(tokens[:, 2], minlength=VOCAB)
    joint, p3 = exact_distributions(target, SamplingParams(temperature=1.0))
    assert chi_square_p(pairs.reshape(VOCAB, VOCAB), joint) > significance
    assert chi_square_p(third, p3) > significance
    return results, tokens
