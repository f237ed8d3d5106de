"""specdec.kernels: Triton (CPU interpreter, TRITON_INTERPRET=1 from conftest) vs torch reference.

Parity is exact for tokens (verify_*) and allclose for acceptance_stats, on awkward shapes:
vocabularies 1009 (prime), 49152 (SmolLM2) and 128256 (Llama 3), k = 1 and 8, bf16 and fp32,
and batch rows built to accept none, some and all drafts. The interpreter is slow, so the large
vocabularies use few rows and larger tiles. The sampling reference is checked against the
target distribution with chi-square tests at significance 1e-3 on fixed seed sets (so the tests
are deterministic: they pass or fail the same way on every run).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.kernels as K  # noqa: E402
from specdec.kernels import dispatch, greedy, rng, sample, stats  # noqa: E402
from specdec.kernels.common import interpreting  # noqa: E402

P_MIN = 1e-3  # chi-square tests fail below this p-value


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the categories with expected mass > 0."""
    n = observed.sum().double()
    keep = expected_probs > 0
    assert int(observed[~keep].sum()) == 0, "a token with target probability 0 was emitted"
    expected = expected_probs[keep].double() * n
    stat = ((observed[keep].double() - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def greedy_case(batch: int, k: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Logits plus drafts that accept all (row 0), about half (row 1) and none (row 2+)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g).to(dtype)
    drafts = logits.argmax(dim=-1)[:, :k].clone()
    for row in range(1, batch):
        j = k // 2 if row == 1 else 0
        drafts[row, j] = (drafts[row, j] + 1 + row) % vocab
    return logits, drafts


def sample_case(batch: int, k: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Row 0: draft == target (accepts all). Row 1: the target masks the draft token at k // 2
    (rejects there). Row 2: same at 0. Row 3: draft == target but both mask the draft token at 0
    (rejected with a zero residual: the target-sampling fallback). Rows 4+: noisy drafts."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, k + 1, vocab, generator=g) * 2
    draft = target[:, :k] + torch.randn(batch, k, vocab, generator=g)
    draft[0] = target[0, :k]
    draft[3] = target[3, :k]
    drafts = torch.distributions.Categorical(logits=draft).sample()
    target[1, k // 2, drafts[1, k // 2]] = float("-inf")
    target[2, 0, drafts[2, 0]] = float("-inf")
    target[3, 0, drafts[3, 0]] = float("-inf")
    draft[3, 0, drafts[3, 0]] = float("-inf")
    target[:, :, 7] = float("-inf")  # a top-k style masked token
    seeds = torch.arange(batch, dtype=torch.int64) * 7919 + 11
    offsets = torch.arange(batch, dtype=torch.int64) * 3
    return target.to(dtype), draft.to(dtype), drafts, seeds, offsets


def assert_same(out: K.VerifyOutput, ref: K.VerifyOutput) -> None:
    assert out.tokens.dtype == torch.int64 and out.num_accepted.dtype == torch.int64
    assert torch.equal(out.num_accepted, ref.num_accepted), (out.num_accepted, ref.num_accepted)
    assert torch.equal(out.tokens, ref.tokens), (out.tokens, ref.tokens)


# ------------------------------------------------------------------------------------------- rng


def test_fmix32_matches_murmur3():
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    xs = [0, 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    assert rng.fmix32_torch(torch.tensor(xs)).tolist() == [fmix(x) for x in xs]


def test_rng_triton_matches_torch():
    import triton
    import triton.language as tl

    @triton.jit
    def hash_kernel(seed_ptr, off_ptr, h_ptr, u_ptr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        key = rng.stream_key_tl(rng.row_key_tl(tl.load(seed_ptr + r), tl.load(off_ptr + r)), r, 1)
        idx = tl.arange(0, BLOCK)
        h = rng.element_hash_tl(key, idx)
        tl.store(h_ptr + r * BLOCK + idx, h.to(tl.int64))
        tl.store(u_ptr + r * BLOCK + idx, rng.uniform_tl(h))

    seeds = torch.tensor([0, 1, -5, 2**62 + 7, -(2**63)], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 2**40, -1, 9], dtype=torch.int64)
    h = torch.empty(5, 64, dtype=torch.int64)
    u = torch.empty(5, 64)
    hash_kernel[(5,)](seeds, offsets, h, u, BLOCK=64)
    key = rng.stream_key_torch(rng.row_key_torch(seeds, offsets), torch.arange(5), 1)
    ref = rng.element_hash_torch(key[:, None], torch.arange(64)[None, :])
    assert torch.equal(h, ref)
    assert torch.equal(u, rng.uniform_torch(ref))


def test_rng_quality():
    seeds = torch.arange(64, dtype=torch.int64)
    offsets = torch.zeros(64, dtype=torch.int64)
    u = rng.acceptance_uniforms_torch(seeds[:, None].expand(64, 64).reshape(-1),
                                      torch.arange(64).repeat(64), 8)
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.flatten(), bins=64, min=0, max=1)
    assert chi2_pvalue(counts, torch.full((64,), 1 / 64)) > P_MIN
    e = rng.race_exponentials_torch(seeds, offsets, 4, 4096).double()
    assert abs(float(e.mean()) - 1) < 0.01 and abs(float(e.var()) - 1) < 0.02
    assert float(e.min()) > 0
    # neighbouring vocab entries and neighbouring offsets are uncorrelated
    def corr(a, b):
        return abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]))

    assert corr(e[..., :-1], e[..., 1:]) < 0.01
    assert corr(e, rng.race_exponentials_torch(seeds, offsets + 1, 4, 4096).double()) < 0.01


# ---------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    "batch,k,vocab,dtype,block_v",
    [
        (3, 1, 1009, torch.float32, 256),
        (3, 8, 1009, torch.bfloat16, greedy.DEFAULT_BLOCK_V),
        (3, 8, 49152, torch.bfloat16, 8192),
        (3, 1, 128256, torch.float32, 16384),
        (2, 1, 128256, torch.bfloat16, 16384),
    ],
)
def test_verify_greedy_parity(batch, k, vocab, dtype, block_v):
    logits, drafts = greedy_case(batch, k, vocab, dtype)
    ref = K.verify_greedy_torch(logits, drafts)
    assert ref.num_accepted[0] == k and ref.num_accepted[-1] == 0
    assert_same(greedy._verify_greedy_triton(logits, drafts, block_v=block_v), ref)
    # the committed tokens are the target's greedy tokens up to the first mismatch
    n = int(ref.num_accepted[1])
    assert torch.equal(ref.tokens[1, : n + 1], logits[1].argmax(-1)[: n + 1])
    assert (ref.tokens[1, n + 1 :] == -1).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_verify_greedy_ties_lowest_index(num_splits):
    vocab = 1000
    logits = torch.zeros(2, 2, vocab)
    logits[:, :, [5, 400, 999]] = 3.0  # ties across tiles and splits
    logits[1, 0, :] = float("-inf")  # all masked: argmax is 0, as torch.argmax says
    drafts = torch.tensor([[5], [0]])
    out = greedy._verify_greedy_triton(logits, drafts, block_v=128, num_splits=num_splits)
    assert out.tokens.tolist() == [[5, 5], [0, 5]]
    assert_same(out, K.verify_greedy_torch(logits, drafts))


# -------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "batch,k,vocab,dtype,block_v,temperature",
    [
        (5, 1, 1009, torch.float32, 256, 1.0),
        (5, 8, 1009, torch.bfloat16, sample.DEFAULT_BLOCK_V, "tensor"),
        (4, 1, 49152, torch.bfloat16, 16384, 0.7),
        (4, 1, 128256, torch.float32, 16384, 1.3),
    ],
)
def test_verify_sample_parity(batch, k, vocab, dtype, block_v, temperature):
    target, draft, drafts, seeds, offsets = sample_case(batch, k, vocab, dtype)
    if temperature == "tensor":
        temperature = torch.linspace(0.5, 1.5, batch)
    ref = K.verify_sample_torch(target, draft, drafts, temperature, seeds, offsets)
    assert ref.num_accepted[0] == k  # draft == target: always accepted
    assert ref.num_accepted[1] <= k // 2 and ref.num_accepted[2] == 0 and ref.num_accepted[3] == 0
    assert (ref.tokens != 7).all()  # masked by the target: never emitted
    assert_same(sample._verify_sample_triton(target, draft, drafts, temperature, seeds, offsets,
                                             block_v=block_v), ref)


def test_verify_sample_parity_many_seeds():
    """Many rows of a small vocabulary, so the acceptance tests and races take many values."""
    g = torch.Generator().manual_seed(1)
    batch, k, vocab = 24, 2, 13
    target = torch.randn(batch, k + 1, vocab, generator=g)
    draft = torch.randn(batch, k, vocab, generator=g)
    drafts = torch.randint(0, vocab, (batch, k), generator=g)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g)
    offsets = torch.arange(batch, dtype=torch.int64)
    ref = K.verify_sample_torch(target, draft, drafts, 0.9, seeds, offsets)
    assert len(set(ref.num_accepted.tolist())) == k + 1  # none, some and all occur
    assert_same(sample._verify_sample_triton(target, draft, drafts, 0.9, seeds, offsets, block_v=16), ref)


def test_verify_sample_deterministic_per_seed_and_offset():
    target, draft, drafts, seeds, offsets = sample_case(6, 3, 101, torch.float32)
    a = K.verify_sample_torch(target, draft, drafts, 1.0, seeds, offsets)
    b = K.verify_sample_torch(target, draft, drafts, 1.0, seeds.clone(), offsets.clone())
    assert_same(a, b)
    outs = {
        tuple(K.verify_sample_torch(target, draft, drafts, 1.0, seeds, offsets + s).tokens[4:].flatten().tolist())
        for s in range(1, 6)
    }
    assert len(outs) > 1  # the step counter changes the randomness


def _first_tokens(target_logits, draft_logits, temperature, n, seed_base, k=1):
    """Run the reference on n copies of one step with n different seeds; drafts ~ draft_probs."""
    vocab = target_logits.shape[-1]
    target = target_logits.expand(n, k + 1, vocab).contiguous()
    draft = draft_logits.expand(n, k, vocab).contiguous()
    g = torch.Generator().manual_seed(seed_base)
    drafts = torch.multinomial(torch.softmax(draft[:, 0] / temperature, -1), 1, generator=g)
    seeds = torch.arange(n, dtype=torch.int64) + seed_base
    offsets = torch.full((n,), 5, dtype=torch.int64)
    return K.verify_sample_torch(target, draft, drafts, temperature, seeds, offsets)


@pytest.mark.parametrize(
    "draft_row,temperature",
    [
        ([0.5, 0.0, 2.0, -1.0, 0.3, 0.0], 1.0),  # a plausible draft
        ([-9.0, -9.0, -9.0, -9.0, 8.0, 9.0], 1.0),  # wrong everywhere, most mass where target is 0
        ([1.0, 2.0, 3.0, 0.0, -1.0, float("-inf")], 0.7),  # at another temperature
    ],
)
def test_verify_sample_first_token_follows_target(draft_row, temperature):
    """Chi-square, k = 1: emitted first token ~ target_probs, whatever the draft (p > 1e-3)."""
    target_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])
    target_logits = torch.stack([target_row, target_row.flip(0).roll(1)])[None]  # [1, 2, 6]
    draft_logits = torch.tensor(draft_row)[None, None]  # [1, 1, 6]
    n = 20000
    out = _first_tokens(target_logits, draft_logits, temperature, n, seed_base=1000)
    target_probs = torch.softmax(target_logits[0] / temperature, dim=-1)
    first = torch.bincount(out.tokens[:, 0], minlength=6)
    assert chi2_pvalue(first, target_probs[0]) > P_MIN
    # the acceptance rate is alpha = sum min(target_probs, draft_probs) (|z| < 3.29: p > 1e-3)
    alpha = float(torch.minimum(target_probs[0], torch.softmax(draft_logits[0, 0] / temperature, -1)).sum())
    rate = float(out.num_accepted.double().mean())
    assert abs(rate - alpha) < 3.29 * (alpha * (1 - alpha) / n) ** 0.5 + 1e-9
    # rows that accepted the draft get a bonus token from target position 1
    bonus = out.tokens[out.num_accepted == 1, 1]
    if bonus.numel() > 500:
        assert chi2_pvalue(torch.bincount(bonus, minlength=6), target_probs[1]) > P_MIN


def test_verify_sample_bonus_follows_target_when_draft_is_target():
    target_logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 1.0, -1.0]]])
    out = _first_tokens(target_logits, target_logits[:, :1], 1.0, 20000, seed_base=77)
    assert bool((out.num_accepted == 1).all())
    target_probs = torch.softmax(target_logits[0, 1], -1)
    assert chi2_pvalue(torch.bincount(out.tokens[:, 1], minlength=4), target_probs) > P_MIN


# ----------------------------------------------------------------------------- acceptance stats


@pytest.mark.parametrize(
    "n,vocab,dtype,block_v,temperature",
    [
        (5, 1009, torch.float32, 256, 1.0),
        (3, 49152, torch.bfloat16, 8192, 0.7),
        (2, 128256, torch.float32, 16384, 1.0),
    ],
)
def test_acceptance_stats_parity(n, vocab, dtype, block_v, temperature):
    g = torch.Generator().manual_seed(2)
    target = torch.randn(n, vocab, generator=g) * 3
    draft = target + torch.randn(n, vocab, generator=g)
    draft[0] = target[0]  # alpha 1, kl 0
    target[:, 3] = float("-inf")  # masked in the target only: contributes nothing
    draft[:, 5] = float("-inf")
    target[:, 5] = float("-inf")  # masked in both
    target, draft = target.to(dtype), draft.to(dtype)
    alpha, kl = stats._acceptance_stats_triton(target, draft, temperature, block_v=block_v)
    ref_alpha, ref_kl = K.acceptance_stats_torch(target, draft, temperature)
    assert alpha.dtype == kl.dtype == torch.float32 and alpha.shape == (n,)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-5)
    assert abs(float(alpha[0]) - 1) < 1e-5 and abs(float(kl[0])) < 1e-5
    assert bool((alpha[1:] < 1).all() and (kl[1:] > 0).all())


def test_acceptance_stats_draft_masks_target_token():
    target = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    draft = torch.tensor([[1.0, 2.0, float("-inf"), 0.0]])
    alpha, kl = stats._acceptance_stats_triton(target, draft, 1.0, block_v=16)
    ref_alpha, ref_kl = K.acceptance_stats_torch(target, draft)
    assert torch.isinf(kl).all() and torch.isinf(ref_kl).all()
    torch.testing.assert_close(alpha, ref_alpha)
    tp, dp = torch.softmax(target, -1), torch.softmax(draft, -1)
    torch.testing.assert_close(alpha, torch.minimum(tp, dp).sum(-1))


# ---------------------------------------------------------------------------------- validation


def _greedy_args():
    return {"target_logits": torch.randn(2, 3, 17), "draft_tokens": torch.zeros(2, 2, dtype=torch.int64)}


def _sample_args():
    return {
        "target_logits": torch.randn(2, 3, 17),
        "draft_logits": torch.randn(2, 2, 17),
        "draft_tokens": torch.zeros(2, 2, dtype=torch.int64),
        "temperature": 1.0,
        "seeds": torch.zeros(2, dtype=torch.int64),
        "offsets": torch.zeros(2, dtype=torch.int64),
    }


BAD_INPUTS = [
    ("target_logits", torch.zeros(2, 3, 17, dtype=torch.int64), "float32, bfloat16 or float16"),
    ("target_logits", torch.randn(6, 17), "[batch, k + 1, vocab]"),
    ("draft_tokens", torch.zeros(2, 2, dtype=torch.int32), "must be int64"),
    ("draft_tokens", torch.zeros(2, 3, dtype=torch.int64), "[batch, k]"),
    ("draft_tokens", torch.full((2, 2), 17, dtype=torch.int64), "share one tokenizer"),
    ("draft_tokens", torch.zeros(2, 2, dtype=torch.int64, device="meta"), "one device"),
]
SAMPLE_ONLY = [
    ("draft_logits", torch.randn(2, 2, 16), "share one vocabulary"),
    ("temperature", 0.0, "verify_greedy"),
    ("temperature", torch.tensor([1.0, -1.0]), "> 0"),
    ("temperature", torch.ones(3), "[batch]"),
    ("seeds", torch.zeros(2, dtype=torch.int32), "must be int64"),
    ("offsets", torch.zeros(3, dtype=torch.int64), "[batch]"),
]


@pytest.mark.parametrize("fn", [K.verify_greedy_torch, K.verify_greedy_triton])
@pytest.mark.parametrize("name,value,message", BAD_INPUTS)
def test_verify_greedy_rejects_bad_input(fn, name, value, message):
    args = _greedy_args()
    args[name] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        fn(**args)


@pytest.mark.parametrize("fn", [K.verify_sample_torch, K.verify_sample_triton])
@pytest.mark.parametrize("name,value,message", BAD_INPUTS + SAMPLE_ONLY)
def test_verify_sample_rejects_bad_input(fn, name, value, message):
    args = _sample_args()
    args[name] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        fn(**args)


@pytest.mark.parametrize("fn", [K.acceptance_stats_torch, K.acceptance_stats_triton])
def test_acceptance_stats_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="must match"):
        fn(torch.randn(3, 10), torch.randn(3, 11))
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.randn(3, 10), torch.randn(3, 10), temperature=-1.0)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fn(torch.randn(3, 10).double(), torch.randn(3, 10).double())


def test_triton_launchers_need_contiguous_and_cuda(monkeypatch):
    logits = torch.randn(2, 17, 3).transpose(1, 2)  # [2, 3, 17], not contiguous
    drafts = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous"):
        K.verify_greedy_triton(logits, drafts)
    K.verify_greedy_torch(logits, drafts)  # the reference takes any layout
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="SPECDEC_KERNELS=torch"):
        K.verify_greedy_triton(logits.contiguous(), drafts)


# ------------------------------------------------------------------------------------ dispatch


def test_dispatch_rule(monkeypatch):
    assert dispatch.choose_backend(env="torch", cuda=True) == "torch"
    assert dispatch.choose_backend(env="", cuda=False) == "torch"
    assert dispatch.choose_backend(env="", cuda=True) == "triton"
    assert dispatch.choose_backend(env="triton", cuda=False) == "triton"  # interpreter is on
    with pytest.raises(ValueError, match="not a backend"):
        dispatch.choose_backend(env="cuda", cuda=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch.choose_backend(env="triton", cuda=False)
    assert K.backend() in ("triton", "torch")


def test_public_api_matches_reference():
    logits, drafts = greedy_case(3, 4, 257, torch.float32)
    assert_same(K.verify_greedy(logits, drafts), K.verify_greedy_torch(logits, drafts))
    target, draft, tokens, seeds, offsets = sample_case(5, 2, 257, torch.float32)
    assert_same(K.verify_sample(target, draft, tokens, 1.0, seeds, offsets),
                K.verify_sample_torch(target, draft, tokens, 1.0, seeds, offsets))
    alpha, kl = K.acceptance_stats(target[:, 0], target[:, 1])
    ref = K.acceptance_stats_torch(target[:, 0], target[:, 1])
    torch.testing.assert_close((alpha, kl), ref, rtol=1e-4, atol=1e-5)


def test_kernels_compile_for_sm90_without_gpu():
    """The real compiler (not the interpreter) accepts every kernel: TTIR down to a cubin."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "specdec.kernels.compile_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(interpreting(), reason="compiled Triton: run with TRITON_INTERPRET=0 pytest -m gpu")
def test_cuda_parity_llama_shapes():
    logits, drafts = greedy_case(8, 4, 128256, torch.bfloat16)
    logits, drafts = logits.cuda(), drafts.cuda()
    assert_same(K.verify_greedy_triton(logits, drafts), K.verify_greedy_torch(logits, drafts))
    target, draft, tokens, seeds, offsets = (t.cuda() for t in sample_case(8, 4, 128256, torch.bfloat16))
    assert_same(K.verify_sample_triton(target, draft, tokens, 0.8, seeds, offsets),
                K.verify_sample_torch(target, draft, tokens, 0.8, seeds, offsets))
    alpha, kl = K.acceptance_stats_triton(target[:, 0].contiguous(), draft[:, 0].contiguous())
    ref = K.acceptance_stats_torch(target[:, 0].contiguous(), draft[:, 0].contiguous())
    torch.testing.assert_close((alpha, kl), ref, rtol=1e-3, atol=1e-4)


def test_kernel_bench_checks_every_shape_against_torch(tmp_path):
    """bench/kernels.py under the interpreter: batches > 1 with k < k + 1 slice the target's
    logits (strided rows); every kernel's output must match the torch reference there."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    if not interpreting():
        pytest.skip("runs the Triton path through TRITON_INTERPRET=1")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_kernels", root / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "kernels.json"
        rc = module.main(["--device", "cpu", "--vocab", "96", "--batches", "1,3", "--ks", "1,2",
                          "--repeats", "1", "--warmup", "0", "--out", str(out)])
    finally:
        sys.modules.pop("bench_kernels", None)
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0
    assert {(r["kernel"], r["batch"], r["k"]) for r in rows} == {
        (kernel, b, k) for kernel in ("greedy", "sample", "stats") for b in (1, 3) for k in (1, 2)}
    assert all(r["match"] for r in rows), [r for r in rows if not r["match"]]
