"""Trimmed draft vocabularies: ranking, the sidecar, and losslessness through the engine.

The draft drafts only among a subset of token ids; the target's output must not change:
greedy output identical to the target alone, sampled output distributed as the target's
(chi-square, as in test_decode_sampling), through the torch path and the Triton kernels under
the interpreter, also for a subset that leaves out the tokens the target samples most.
Teacher-forced acceptance with the same subset predicts the engine's greedy steps exactly.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import make_tiny_llama, save_tiny_chat_model, tiny_chat_tokenizer
from test_decode_engine import PROMPTS, assert_same_greedy, drop_layers, spread
from test_decode_sampling import PROMPT, VOCAB, sample_first_three

from specdec import acceptance
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.reference import target_generate
from specdec.decode.sampling import SamplingParams
from specdec.vocab import (
    SIDECAR,
    DraftVocab,
    DraftVocabError,
    build_draft_vocab,
    count_target_tokens,
    coverage_curve,
    load_draft_vocab,
    resolve_draft_vocab,
)

SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ ranking


def test_coverage_curve_and_build():
    counts = Counter({5: 50, 7: 30, 9: 15, 11: 4, 13: 1})
    curve = coverage_curve(counts, [0.5, 0.8, 0.95, 0.99, 1.0])
    assert [row["n"] for row in curve] == [1, 2, 3, 4, 5]
    assert curve[2]["actual"] == pytest.approx(0.95)
    vocab = build_draft_vocab(counts, 20, coverage=0.8, always=[2])
    assert vocab.ids.tolist() == [2, 5, 7]  # the top 2 plus the EOS id, sorted
    assert vocab.coverage == pytest.approx(0.8)
    assert build_draft_vocab(counts, 20, n=3).ids.tolist() == [5, 7, 9]
    with pytest.raises(DraftVocabError, match="exactly one"):
        build_draft_vocab(counts, 20)
    with pytest.raises(DraftVocabError, match="lie in"):
        DraftVocab(torch.tensor([3, 25]), 20)


def test_build_fills_a_short_ranking_with_the_lowest_ids():
    counts = Counter({5: 50, 7: 30, 1: 15})  # 3 distinct ids ranked, 8 asked for
    filled = build_draft_vocab(counts, 20, n=8, always=[2], fill=True)
    assert filled.ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # 1, 2, 5, 7 + the lowest others
    assert filled.provenance["fill"]["ids"] == 4 and filled.coverage == pytest.approx(1.0)
    assert build_draft_vocab(counts, 20, n=8, always=[2]).ids.tolist() == [1, 2, 5, 7]
    assert build_draft_vocab(counts, 20, n=2, fill=True).ids.tolist() == [5, 7]  # no room left
    assert "fill" not in build_draft_vocab(counts, 20, n=8).provenance


def test_count_target_tokens_ranks_only_kept_rewrites():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    records = [
        {"origin": "distilled", "messages": [{"role": "user", "content": "zzz"},
                                             {"role": "assistant", "content": "aab"}]},
        {"origin": "fallback", "messages": [{"role": "assistant", "content": "qqqq"}]},
    ]
    counts, used, skipped = count_target_tokens(records, Tok())
    assert counts == Counter({ord("a"): 2, ord("b"): 1}) and (used, skipped) == (1, 1)


# ------------------------------------------------------------------------------ sidecar


def test_sidecar_round_trip_and_errors(tmp_path):
    draft_dir = save_tiny_chat_model(tmp_path / "draft")
    vocab_size = json.loads((draft_dir / "config.json").read_text())["vocab_size"]
    vocab = DraftVocab(torch.tensor([9, 2, 40, 7]), vocab_size, 0.97, {"source": "x.jsonl"})
    vocab.save(draft_dir)
    manifest = json.loads((draft_dir / "specdec.json").read_text())
    assert manifest["draft_vocab"]["n"] == 4 and manifest["draft_vocab"]["file"] == SIDECAR
    assert manifest["stage"] == "test"  # the rest of the manifest is kept
    loaded = load_draft_vocab(draft_dir, vocab_size)
    assert loaded.ids.tolist() == [2, 7, 9, 40] and loaded.coverage == 0.97
    assert resolve_draft_vocab("auto", draft_dir, vocab_size).ids.tolist() == [2, 7, 9, 40]
    assert resolve_draft_vocab("full", draft_dir, vocab_size) is None

    with pytest.raises(DraftVocabError, match="was made for a vocabulary of"):
        load_draft_vocab(draft_dir, vocab_size + 1)
    sidecar = draft_dir / SIDECAR
    sidecar.write_text(sidecar.read_text().replace("40", "41"))
    with pytest.raises(DraftVocabError, match="does not match the sha256.*python -m specdec.vocab build"):
        load_draft_vocab(draft_dir, vocab_size)
    sidecar.unlink()
    with pytest.raises(DraftVocabError, match=r"draft_vocab.json is missing.*python -m specdec.vocab build"):
        load_draft_vocab(draft_dir, vocab_size)
    # a draft without a sidecar drafts over the full vocabulary
    assert load_draft_vocab(save_tiny_chat_model(tmp_path / "plain"), vocab_size) is None


def test_cli_build_and_show(tmp_path, capsys):
    from specdec.vocab import main

    draft_dir = save_tiny_chat_model(tmp_path / "draft")
    data = tmp_path / "distilled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"origin": "distilled", "messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "hello hello"}]},
        {"origin": "fallback", "messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "XYZ"}]},
    ]))
    assert main(["build", "--draft", str(draft_dir), "--data", str(data), "--coverage", "1.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vocab = load_draft_vocab(draft_dir)
    assert out["n"] == vocab.n
    tok = tiny_chat_tokenizer()
    kept = set(vocab.ids.tolist())
    assert set(tok.encode("helo ", add_special_tokens=False)) <= kept  # the kept rewrite's ids
    assert set(tok.encode("XYZ", add_special_tokens=False)).isdisjoint(kept)  # a fallback's
    assert vocab.provenance["records"] == 1 and vocab.provenance["records_skipped"] == 1
    assert main(["show", "--draft", str(draft_dir)]) == 0
    assert main(["build", "--draft", str(draft_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ engine, greedy


@pytest.fixture(scope="module")
def target():
    return spread(make_tiny_llama(seed=0))


def _frequent_ids(model, prompts, n):
    """The ids the target emits most on these prompts (greedy), for a subset that keeps them."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    counts = Counter(t for p in prompts for t in target_generate(model, p, params))
    return [t for t, _ in counts.most_common(n)]


@pytest.mark.parametrize("subset", ["frequent", "leaves-out-frequent"])
@pytest.mark.parametrize("k", [1, 3])
def test_trimmed_vocab_greedy_is_the_target(target, subset, k):
    vocab_size = target.config.vocab_size
    frequent = _frequent_ids(target, PROMPTS, 12)
    if subset == "frequent":
        ids = frequent + list(range(50, 60))
    else:  # the target's favourite tokens can never be drafted: every step recovers
        ids = [t for t in range(vocab_size) if t not in frequent[:6]][:30]
    vocab = DraftVocab(torch.tensor(ids), vocab_size)
    draft = drop_layers(target, [0, 3])
    engine = SpeculativeEngine(target, draft, k=k, draft_vocab=vocab)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = engine.generate(PROMPTS, params)  # batched
    for prompt, r in zip(PROMPTS, results):
        assert_same_greedy(target, prompt, r.token_ids, target_generate(target, prompt, params))
    (solo,) = engine.generate([PROMPTS[0]], params)  # batch 1
    assert_same_greedy(target, PROMPTS[0], solo.token_ids,
                       target_generate(target, PROMPTS[0], params))
    drafted_ok = sum(r.accepted for r in results)
    if subset == "leaves-out-frequent":
        assert drafted_ok < sum(r.drafted for r in results)


def test_trimmed_vocab_rejects_a_wrong_size(target):
    with pytest.raises(ValueError, match="rebuild it"):
        SpeculativeEngine(target, target, k=2, draft_vocab=DraftVocab(torch.tensor([1, 2]), 50))
    with pytest.raises(ValueError, match="needs a draft"):
        SpeculativeEngine(target, None, draft_vocab=DraftVocab(torch.tensor([1]), 97))


def test_teacher_forced_acceptance_uses_the_subset(target):
    """Greedy MAL simulated teacher-forced with the subset == the engine's steps with it."""
    vocab_size = target.config.vocab_size
    ids = _frequent_ids(target, PROMPTS, 10) + list(range(20, 40))
    vocab = DraftVocab(torch.tensor(ids), vocab_size)
    draft = drop_layers(target, [0, 3])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    k = 3
    engine = SpeculativeEngine(target, draft, k=k, draft_vocab=vocab)
    results = engine.generate(PROMPTS, params)
    seqs = [p + r.token_ids for p, r in zip(PROMPTS, results)]
    # scored: the positions from the last prompt token on, each predicting one output token
    report = acceptance.compare(target, draft, seqs,
                                [len(p) for p in PROMPTS], ks=[k], progress=False,
                                draft_vocab=vocab, temperature=0)
    steps = sum(r.steps for r in results)
    committed = sum(len(r.token_ids) for r in results)
    assert report.mean_accepted_length[k] == pytest.approx(committed / steps)
    # a full-vocabulary draft scores differently (the subset changes the draft's argmax)
    full = acceptance.compare(target, draft, seqs, [len(p) for p in PROMPTS],
                              ks=[k], progress=False, temperature=0)
    full_engine = SpeculativeEngine(target, draft, k=k).generate(PROMPTS, params)
    assert full.mean_accepted_length[k] == pytest.approx(
        sum(len(r.token_ids) for r in full_engine) / sum(r.steps for r in full_engine))


# ------------------------------------------------------------------------------ engine, sampled


@pytest.fixture(scope="module")
def small_target():
    return spread(make_tiny_llama(seed=3, vocab_size=VOCAB), 5.0)


def _first_token_probs(model):
    with torch.inference_mode():
        return torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1)


@pytest.mark.parametrize("k", [1, 3])
def test_trimmed_vocab_samples_the_target_distribution(small_target, k):
    """A subset without the target's two likeliest first tokens: still the target's samples."""
    top = _first_token_probs(small_target).argsort(descending=True)[:2].tolist()
    ids = [t for t in range(VOCAB) if t not in top][:8]
    vocab = DraftVocab(torch.tensor(ids), VOCAB)
    engine = SpeculativeEngine(small_target, drop_layers(small_target, [0, 3]), k=k,
                               eos_token_ids=[], draft_vocab=vocab)
    n = 4000
    results, tokens = sample_first_three(engine, small_target, n, SIGNIFICANCE)
    # the left-out tokens are emitted (by recovery), at the target's rate
    first = torch.bincount(tokens[:, 0], minlength=VOCAB).double() / n
    assert float(first[top].sum()) > 0.2
    # and the subset's drafts are still accepted some of the time
    assert sum(r.accepted for r in results) > 0


def test_trimmed_vocab_triton_kernels_match_torch_path(small_target, monkeypatch):
    """The same seeds through the Triton kernels (interpreter) and the torch reference give the
    same tokens (they share the counter-hash randomness bit for bit)."""
    from specdec.kernels import dispatch

    ids = [0, 3, 4, 6, 8, 9, 12, 15]
    vocab = DraftVocab(torch.tensor(ids), VOCAB)
    draft = drop_layers(small_target, [1, 2])
    rows = 6
    params = [SamplingParams(temperature=0.9, max_tokens=4, ignore_eos=True, seed=s)
              for s in range(rows)] + [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(dispatch, "backend", lambda b=backend: b)
        engine = SpeculativeEngine(small_target, draft, k=2, eos_token_ids=[], draft_vocab=vocab)
        out[backend] = [r.token_ids for r in engine.generate([PROMPT] * (rows + 1), params)]
    assert out["torch"] == out["triton"]


def test_bf16_draft_beside_fp32_target_is_lossless(target):
    """A draft in another dtype: greedy output is still the fp32 target's."""
    draft = drop_layers(target, [0, 3]).to(torch.bfloat16)
    vocab = DraftVocab(torch.tensor(_frequent_ids(target, PROMPTS, 20)), target.config.vocab_size)
    engine = SpeculativeEngine(target, draft, k=2, draft_vocab=vocab)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for prompt, r in zip(PROMPTS, engine.generate(PROMPTS, params)):
        assert_same_greedy(target, prompt, r.token_ids, target_generate(target, prompt, params))
    sampled = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_tokens=8, seed=1,
                                                          ignore_eos=True))
    assert all(len(r.token_ids) == 8 for r in sampled)


def test_trimmed_vocab_through_hugging_face_forward(target):
    """lean=False: the draft's hidden states come from model.get_decoder() and go through the
    sub-head (the path every non-Llama or eager-attention model takes)."""
    vocab = DraftVocab(torch.tensor(_frequent_ids(target, PROMPTS, 16)), target.config.vocab_size)
    draft = drop_layers(target, [0, 3])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    lean = SpeculativeEngine(target, draft, k=2, draft_vocab=vocab).generate(PROMPTS, params)
    hf = SpeculativeEngine(target, draft, k=2, draft_vocab=vocab, lean=False).generate(PROMPTS, params)
    for prompt, a, b in zip(PROMPTS, lean, hf):
        assert_same_greedy(target, prompt, b.token_ids, target_generate(target, prompt, params))
        assert (a.steps, a.accepted) == (b.steps, b.accepted)
