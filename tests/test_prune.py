"""Layer-block pruning mechanics on tiny models, and the CLI end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec import acceptance, prune
from specdec.acceptance import layers_subset
from specdec.prune import (
    PruneConfig,
    all_hidden,
    angular_table,
    candidate_blocks,
    remove_layers,
    score_candidates,
    validate,
)

WORDS = ["user", "assistant", "system"] + [f"w{i}" for i in range(90)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")
    return tok


def _tiny_checkpoint(path, num_layers=6, tied=True):
    model = make_tiny_llama(seed=0, num_layers=num_layers, tie_word_embeddings=tied)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _chat_file(path, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [f"w{int(t)}" for t in torch.randint(0, 90, (12,), generator=gen)]
            msgs = [{"role": "user", "content": " ".join(words[:6])},
                    {"role": "assistant", "content": " ".join(words[6:])}]
            f.write(json.dumps({"id": f"r{i}", "messages": msgs}) + "\n")
    return path


@torch.no_grad()
def _skip_reference(model, ids, removed):
    """The original model run layer by layer, skipping `removed` (independent of prune.py)."""
    decoder = model.get_decoder()
    h = decoder.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = decoder.rotary_emb(h, pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(decoder.layers):
        if i not in removed:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    return model.lm_head(decoder.norm(h))


@pytest.mark.parametrize("removed", [[1, 2], [4, 5], [0]])
def test_removal_equals_skipping_layers(removed):
    model = make_tiny_llama(seed=0, num_layers=6)
    ids = torch.randint(3, 97, (2, 9))
    want = _skip_reference(model, ids, removed)
    remove_layers(model, removed)
    assert model.config.num_hidden_layers == 6 - len(removed)
    assert [l.self_attn.layer_idx for l in model.model.layers] == list(range(6 - len(removed)))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_saved_draft_reloads_and_decodes_with_cache(tmp_path, tied):
    from specdec.models import save_checkpoint

    model = make_tiny_llama(seed=0, num_layers=6, tie_word_embeddings=tied)
    model.config.architectures = ["LlamaForCausalLM"]
    remove_layers(model, [2, 3, 4])
    save_checkpoint(model, _tokenizer(), tmp_path / "d", {"stage": "prune"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert loaded.config.num_hidden_layers == 3
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        # layer_idx renumbered: the KV cache path gives the same greedy text as full forwards
        cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, loaded(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == seq.tolist()


def test_layers_subset_restores():
    model = make_tiny_llama(seed=0, num_layers=4)
    layers = model.model.layers
    with layers_subset(model, [0, 3]):
        assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.model.layers is layers and model.config.num_hidden_layers == 4


def test_angular_table_matches_direct_computation():
    model = make_tiny_llama(seed=0, num_layers=4)
    seqs = [list(range(3, 12)), list(range(20, 25)), list(range(40, 47))]
    table = angular_table(model, seqs, [1, 2, 4], batch_size=2)
    assert table["samples"] == 3 and table["tokens"] == 9 + 5 + 7
    assert len(table["last_token"]["1"]) == 4 and len(table["last_token"]["4"]) == 1
    lasts, alls = [], []
    for s in seqs:
        hs = all_hidden(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
        cos = torch.nn.functional.cosine_similarity(hs[1][0], hs[3][0], dim=-1)
        ang = torch.arccos(cos.clamp(-1, 1)) / math.pi
        lasts.append(float(ang[-1]))
        alls.extend(ang.tolist())
    assert table["last_token"]["2"][1] == pytest.approx(sum(lasts) / 3, abs=1e-5)
    assert table["all_token"]["2"][1] == pytest.approx(sum(alls) / len(alls), abs=1e-5)
    # The last entry compares with the last layer's output before the final norm.
    hs = all_hidden(model, torch.tensor([seqs[0]]), torch.ones(1, 9, dtype=torch.long))
    out = model.model(torch.tensor([seqs[0]])).last_hidden_state
    torch.testing.assert_close(model.model.norm(hs[-1]), out)


def test_candidates_and_forbid_last():
    table = {"num_layers": 6, "last_token": {"2": [0.5, 0.4, 0.3, 0.2, 0.1]},
             "all_token": {"2": [0.5, 0.4, 0.3, 0.2, 0.1]}}
    starts = [c.start for c in candidate_blocks(table, 2, top=2, forbid_last=False)]
    assert starts == [4, 3]  # best two, which are also the two deepest
    starts = [c.start for c in candidate_blocks(table, 2, top=1, forbid_last=True)]
    assert 4 not in starts and starts == [3]
    starts = [c.start for c in candidate_blocks(table, 2, top=1, forbid_last=False, start=0)]
    assert starts == [0, 4, 3]


def test_candidate_scores_equal_real_pruned_model():
    target = make_tiny_llama(seed=0, num_layers=5, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (10, 7, 12)]
    data = acceptance.make_batches(seqs, [3, 2, 4], batch_size=2)
    cands = [prune.Candidate(1, 2, 0.0, 0.0), prune.Candidate(3, 2, 0.0, 0.0)]
    score_candidates(target, data, cands, temperature=1.0)
    for c in cands:
        draft = make_tiny_llama(seed=0, num_layers=5, tie_word_embeddings=False)
        remove_layers(draft, c.removed)
        want = acceptance.compare(target, draft, seqs, [3, 2, 4], batch_size=2, progress=False)
        assert c.scores["top1_agreement"] == pytest.approx(want.top1_agreement)
        assert c.scores["alpha"] == pytest.approx(want.alpha, abs=1e-5)
        assert c.scores["mean_accepted_length"]["4"] == pytest.approx(
            want.mean_accepted_length[4])


def test_validation_errors(tmp_path):
    config = make_tiny_llama(num_layers=6).config
    out = str(tmp_path / "o")
    cases = [
        (dict(drop=6), "--drop 6 must be in 1..5"),
        (dict(keep=6), "--keep 6 must be in 1..5"),
        (dict(drop=2, keep=2), "not both"),
        (dict(drop=2, start=4, forbid_last=True), "removes the last layer"),
        (dict(drop=2, start=5), "must be in 0..4"),
        (dict(select="random"), "--select must be one of"),
        (dict(block_sizes="1-9"), "out of range"),
        (dict(block_sizes="a-b"), "use a range like"),
        (dict(out=""), "--out is required"),
        (dict(calib_source=str(tmp_path / "none.jsonl")), "neither a built-in source"),
        (dict(heldout_split="dev"), "--heldout-split must be"),
    ]
    for kwargs, message in cases:
        cfg = PruneConfig(**{"out": out, **kwargs})
        with pytest.raises(ValueError, match=message):
            validate(cfg, config)
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports llama"):
        validate(PruneConfig(out=out, drop=1), config)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by specdec.prune"):
        validate(PruneConfig(out=str(tmp_path / "taken"), drop=1), make_tiny_llama().config)
    assert not (tmp_path / "o").exists()


def test_cli_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    target = _tiny_checkpoint(tmp_path / "target", num_layers=6)
    data = _chat_file(tmp_path / "chats.jsonl")
    out = tmp_path / "run" / "pruned"
    common = ["--target", str(target), "--calib-source", str(data), "--calib-split", "all",
              "--heldout-source", str(data), "--heldout-split", "all", "--calib-n", "12",
              "--heldout-n", "4", "--gen-len", "8", "--max-len", "32", "--candidates", "2"]
    assert prune.main(common + ["--drop", "2", "--select", "acceptance", "--out", str(out)]) == 0
    manifest = json.loads((out / "specdec.json").read_text())
    assert manifest["stage"] == "prune" and len(manifest["removed_layers"]) == 2
    assert set(manifest["picks"]) == {"angular", "acceptance"}
    assert all("top1_agreement" in c for c in manifest["candidates"])
    assert manifest["calibration"]["sha256"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (target / name).read_bytes()
    assert (out / "angular_distance.png").stat().st_size > 0
    table = json.loads((out / "angular_distance.json").read_text())
    assert table["block_sizes"] == [1, 2, 3, 4, 5]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert AutoTokenizer.from_pretrained(out).chat_template == _tokenizer().chat_template
    # Second rule from the cache; forbid-last; a deep cut via --keep.
    out2 = tmp_path / "run" / "angular"
    assert prune.main(common + ["--keep", "2", "--select", "angular", "--forbid-last",
                                "--out", str(out2)]) == 0
    m2 = json.loads((out2 / "specdec.json").read_text())
    assert m2["removed_layers"][-1] < 5 and m2["block"]["size"] == 4
    assert m2["block"]["start"] == m2["picks"]["angular"]
    # Errors before any work.
    assert prune.main(common + ["--drop", "6", "--out", str(tmp_path / "bad")]) == 2
    assert "--drop 6 must be in 1..5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
