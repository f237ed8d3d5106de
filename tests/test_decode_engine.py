"""The speculative engine: greedy losslessness, rollback, stops, streaming, counters, seeds.

Tiny random Llama models (weights scaled so greedy decoding does not just repeat one token);
mechanics only. Greedy output must equal target-only decoding token for token; verifying
k + 1 positions in one forward may round differently from one-at-a-time decoding, so a
mismatch is accepted only at a numerical near-tie of the target (top-2 logit margin < 1e-3 in
fp32), checked at the first divergence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from specdec.decode.engine import GenerationResult, SpeculativeEngine
from specdec.decode.reference import reference_generate, target_generate
from specdec.decode.sampling import SamplingParams

NEAR_TIE = 1e-3
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 3, 3, 3, 8, 22, 40, 11, 2], [4], [1, 60, 61]]


def spread(model: torch.nn.Module, scale: float = 10.0) -> torch.nn.Module:
    """Scale a tiny model's weights so its greedy outputs vary (the default init repeats)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model


def drop_layers(model, keep: list[int]):
    """A copy of `model` with only the decoder layers in `keep` (a pruned draft)."""
    draft = copy.deepcopy(model)
    draft.model.layers = torch.nn.ModuleList([draft.model.layers[i] for i in keep])
    for i, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = i
    draft.config.num_hidden_layers = len(keep)
    return draft


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return spread(make_tiny_llama(seed=0))


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "self": target,
        "pruned": drop_layers(target, [0, 3]),
        "random": spread(make_tiny_llama(seed=7, num_layers=2)),
    }


@pytest.fixture(scope="module")
def greedy_refs(target):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [target_generate(target, p, params) for p in PROMPTS]


def top2_margin(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Token-identical, or the first divergence is at a near-tie of the target."""
    if got == want:
        return
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert i < min(len(got), len(want)), f"lengths differ: {len(got)} vs {len(want)}"
    margin = top2_margin(model, prompt + want[:i])
    assert margin < NEAR_TIE, (
        f"diverged at token {i} ({got[i]} vs {want[i]}) with top-2 margin {margin:.3g}: "
        f"got {got}, want {want}"
    )


def assert_counters(r: GenerationResult, k_max: int) -> None:
    assert r.accepted + r.recovered + r.bonus == r.committed
    assert len(r.token_ids) <= r.committed
    assert r.recovered + r.bonus == r.steps
    assert sum(r.accepted_per_position) == r.accepted
    assert len(r.accepted_per_position) == k_max
    # position j can only be accepted when every earlier one was
    assert all(a >= b for a, b in zip(r.accepted_per_position, r.accepted_per_position[1:]))


@pytest.mark.parametrize("draft_name", ["self", "pruned", "random"])
def test_greedy_matches_target_batched(target, drafts, greedy_refs, draft_name):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for k in range(1, 9):
        engine = SpeculativeEngine(target, drafts[draft_name], k=k)
        results = engine.generate(PROMPTS, params)
        for prompt, r, want in zip(PROMPTS, results, greedy_refs):
            assert_same_greedy(target, prompt, r.token_ids, want)
            assert r.finish_reason == "length"
            assert_counters(r, k)
            assert r.drafted == r.steps * k
        if draft_name == "self":  # a perfect draft is always accepted
            assert all(r.accepted == r.drafted for r in results)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_matches_target_batch1(target, drafts, greedy_refs, k):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for name in ("self", "pruned", "random"):
        engine = SpeculativeEngine(target, drafts[name], k=k)
        for prompt, want in list(zip(PROMPTS, greedy_refs))[:3]:
            (r,) = engine.generate([prompt], params)
            assert_same_greedy(target, prompt, r.token_ids, want)
            assert_counters(r, k)


def test_target_only_loop(target, greedy_refs):
    engine = SpeculativeEngine(target, None)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, r, want in zip(PROMPTS, results, greedy_refs):
        assert_same_greedy(target, prompt, r.token_ids, want)
        assert (r.steps, r.drafted, r.accepted, r.recovered, r.bonus) == (24, 0, 0, 0, 24)
        assert r.accepted_per_position == []


def test_compaction_every_step(target, drafts, greedy_refs):
    """compact_threshold=0 compacts whenever any row has a hole or padding."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = SpeculativeEngine(target, drafts["pruned"], k=3, compact_threshold=0)
    for prompt, r, want in zip(PROMPTS, engine.generate(PROMPTS, params), greedy_refs):
        assert_same_greedy(target, prompt, r.token_ids, want)


def test_eager_attention_and_2d_mask_paths(target, greedy_refs, monkeypatch):
    """The 4D masks built for eager attention, and the 2D padding mask used for attention
    implementations without 4D masks, give the same output as sdpa."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = copy.deepcopy(target)
    eager.set_attn_implementation("eager")
    results = SpeculativeEngine(eager, drop_layers(eager, [0, 3]), k=3).generate(PROMPTS, params)
    for prompt, r, want in zip(PROMPTS, results, greedy_refs):
        assert_same_greedy(target, prompt, r.token_ids, want)
    monkeypatch.setattr("specdec.decode.kv.MASK_4D_IMPLEMENTATIONS", ())
    results = SpeculativeEngine(target, drop_layers(target, [0, 3]), k=3).generate(PROMPTS, params)
    for prompt, r, want in zip(PROMPTS, results, greedy_refs):
        assert_same_greedy(target, prompt, r.token_ids, want)


def test_matches_reference_speculative_step(target, drafts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for name in ("pruned", "random"):
        for k in (1, 4):
            engine = SpeculativeEngine(target, drafts[name], k=k)
            for prompt in PROMPTS[:2]:
                want, accepted_per_step = reference_generate(target, drafts[name], prompt, params, k=k)
                (r,) = engine.generate([prompt], params)
                assert_same_greedy(target, prompt, r.token_ids, want)
                if r.token_ids == want:
                    assert r.steps == len(accepted_per_step)
                    assert r.accepted == sum(accepted_per_step)


def test_adaptive_k(target, drafts, greedy_refs):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    perfect = SpeculativeEngine(target, drafts["self"], k=6, adaptive_k=True).generate(PROMPTS, params)
    assert all(r.drafted == 6 * r.steps for r in perfect)  # stays at k_max
    engine = SpeculativeEngine(target, drafts["random"], k=6, adaptive_k=True)
    results = engine.generate(PROMPTS, params)
    for prompt, r, want in zip(PROMPTS, results, greedy_refs):
        assert_same_greedy(target, prompt, r.token_ids, want)
        assert_counters(r, 6)
        assert r.steps <= r.drafted < 6 * r.steps  # shrank, never below 1


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_never_exceeded(target, drafts, greedy_refs, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    results = SpeculativeEngine(target, drafts["self"], k=8).generate(PROMPTS, params)
    for r, want in zip(results, greedy_refs):
        assert r.token_ids == want[:max_tokens]
        assert r.finish_reason == "length"
        assert r.committed >= max_tokens  # a step commits 9 tokens; the extra are cut
        assert_counters(r, 8)


def test_eos_and_stop_token_ids(target, drafts, greedy_refs):
    prompt, want = PROMPTS[0], greedy_refs[0]
    eos = next(t for i, t in enumerate(want) if i >= 5 and t not in want[:i])
    cut = want[: want.index(eos) + 1]
    for name in ("self", "pruned"):
        engine = SpeculativeEngine(target, drafts[name], k=4, eos_token_ids=[eos])
        (r,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24))
        assert (r.token_ids, r.finish_reason) == (cut, "stop")
        (r,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        assert (r.token_ids, r.finish_reason) == (want, "length")
        engine = SpeculativeEngine(target, drafts[name], k=4, eos_token_ids=[])
        stop_ids = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[eos], ignore_eos=True)
        (r,) = engine.generate([prompt], stop_ids)
        assert (r.token_ids, r.finish_reason) == (cut, "stop")
    # the default EOS comes from the model's config (eos_token_id=2)
    assert SpeculativeEngine(target).eos_token_ids == {2}


class LetterTokenizer:
    """Token i decodes to one letter; id 2 is a special token (EOS). Enough for stop strings."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join("" if (i == 2 and skip_special_tokens) else chr(97 + i % 26) for i in ids)


def test_stop_strings(target, drafts, greedy_refs):
    tok = LetterTokenizer()
    for prompt, want in zip(PROMPTS, greedy_refs):
        text = tok.decode(want)
        stop = text[9:12]  # spans three tokens
        pos = text.index(stop)
        # the token that completes the first occurrence
        end = next(j for j in range(len(want)) if len(tok.decode(want[: j + 1])) >= pos + len(stop))
        for name in ("self", "random"):
            engine = SpeculativeEngine(target, drafts[name], k=3, tokenizer=tok, eos_token_ids=[])
            params = SamplingParams(temperature=0, max_tokens=24, stop=["zzzzz", stop])
            (r,) = engine.generate([prompt], params)
            assert r.token_ids == want[: end + 1]
            assert r.finish_reason == "stop"
            assert r.text == text[:pos]
    # without stop strings the text is the whole output
    engine = SpeculativeEngine(target, drafts["pruned"], k=3, tokenizer=tok, eos_token_ids=[])
    (r,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24))
    assert r.text == tok.decode(greedy_refs[0])


def test_streaming(target, drafts, greedy_refs):
    streamed: dict[int, list[int]] = {}
    calls = []

    def on_tokens(index, tokens):
        calls.append(len(tokens))
        streamed.setdefault(index, []).extend(tokens)

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 3, 11, 24, 1)]
    results = SpeculativeEngine(target, drafts["pruned"], k=4).generate(PROMPTS, params, stream=on_tokens)
    for i, r in enumerate(results):
        assert streamed[i] == r.token_ids == greedy_refs[i][: params[i].max_tokens]
    assert max(calls) > 1  # several tokens per step


def test_sampling_reproducible(target, drafts):
    params = [SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=s) for s in range(4)]
    engine = SpeculativeEngine(target, drafts["pruned"], k=3)
    first = engine.generate(PROMPTS[:4], params)
    second = engine.generate(PROMPTS[:4], params)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.accepted_per_position for r in first] == [r.accepted_per_position for r in second]
    for r in first:
        assert_counters(r, 3)
    reseeded = [SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=s + 100) for s in range(4)]
    other = engine.generate(PROMPTS[:4], reseeded)
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


def test_target_only_sampling_equals_target_generate(target):
    engine = SpeculativeEngine(target, None)
    for seed in range(3):
        params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=seed, ignore_eos=True)
        (r,) = engine.generate([PROMPTS[0]], params)
        assert r.token_ids == target_generate(target, PROMPTS[0], params)


def test_mixed_greedy_and_sampled_batch(target, drafts, greedy_refs):
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.5, max_tokens=24, seed=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=24, seed=2, ignore_eos=True),
    ]
    results = SpeculativeEngine(target, drafts["pruned"], k=3).generate(PROMPTS[:4], params)
    for i in (0, 2):
        assert_same_greedy(target, PROMPTS[i], results[i].token_ids, greedy_refs[i])
    for r in results:
        assert len(r.token_ids) == 24
        assert_counters(r, 3)


def test_input_errors(target, drafts):
    engine = SpeculativeEngine(target, drafts["pruned"], k=2)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], greedy)
    with pytest.raises(ValueError, match="token ids in"):
        engine.generate([[1, 500]], greedy)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=4, stop=["x"]))
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate([[1], [2]], [greedy])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate([[1]], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="k must be"):
        SpeculativeEngine(target, drafts["pruned"], k=0)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeEngine(target, make_tiny_llama(seed=1, vocab_size=50))
    assert engine.generate([], greedy) == []


@pytest.mark.slow
def test_smollm2_greedy_and_stop_string(smollm2_path):
    """The real target with a real tokenizer: greedy identity, incremental text, stop strings."""
    from specdec.data import chat_ids
    from specdec.models import load_model

    model, tok = load_model(smollm2_path)
    draft = drop_layers(model, list(range(0, 30, 3)))
    prompt = chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0, max_tokens=12)
    want = target_generate(model, prompt, params, [tok.eos_token_id])
    engine = SpeculativeEngine(model, draft, k=3, tokenizer=tok)
    (r,) = engine.generate([prompt], params)
    assert_same_greedy(model, prompt, r.token_ids, want)
    assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    text = r.text
    stop = text.split()[2]  # the third word
    (s,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    assert s.finish_reason == "stop"
    assert s.text == text[: text.index(stop)]
    assert s.token_ids == r.token_ids[: len(s.token_ids)]


def test_cancel_one_row(target, drafts, greedy_refs):
    """A stream callback returning True (or `cancel`) ends one request with "abort" at that
    step; the other rows finish exactly as without the cancellation."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = SpeculativeEngine(target, drafts["pruned"], k=3)
    full = engine.generate(PROMPTS, params)
    streamed: dict[int, list[int]] = {}

    def abort_row_2_after_6(index, tokens):
        streamed.setdefault(index, []).extend(tokens)
        return index == 2 and len(streamed[index]) >= 6

    results = engine.generate(PROMPTS, params, stream=abort_row_2_after_6)
    assert results[2].finish_reason == "abort"
    assert 6 <= len(results[2].token_ids) < 24
    assert results[2].token_ids == streamed[2] == full[2].token_ids[: len(streamed[2])]
    for i in (0, 1, 3, 4):
        assert results[i].token_ids == full[i].token_ids
        assert results[i].finish_reason == "length"

    # cancel() from inside the callback (as another thread would), target-only and batch 1
    for draft in (None, drafts["pruned"]):
        engine = SpeculativeEngine(target, draft, k=3)

        def cancel_first(index, tokens):
            if index == 0:
                engine.cancel(0)

        results = engine.generate(PROMPTS[:2], params, stream=cancel_first)
        assert results[0].finish_reason == "abort" and 1 <= len(results[0].token_ids) <= 4
        assert results[1].token_ids == greedy_refs[1] and results[1].finish_reason == "length"
        (r,) = engine.generate([PROMPTS[3]], params, stream=lambda i, t: True)
        assert r.finish_reason == "abort" and 1 <= len(r.token_ids) <= 4
        (r,) = engine.generate([PROMPTS[3]], params)  # a new call forgets earlier cancels
        assert r.token_ids == greedy_refs[3]
