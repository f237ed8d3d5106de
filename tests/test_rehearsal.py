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


# ---------------------------------------------------------------------------- every stage
# One module-scoped chain on the rehearsal target: prune -> distill -> finetune -> merge ->
# evaluate / bench / serve / vLLM config. Tiny settings: mechanics, never numbers.

import copy  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from specdec.data import chat_ids  # noqa: E402

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three colours.", "Red, green and blue."),
    ("What is 12 + 30?", "12 + 30 = 42. The answer is: 42"),
    ("Say hello in Spanish.", "Hola!"),
    ("Give me a fruit.", "An apple."),
    ("Write one word.", "Word."),
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(target_path):
    from specdec.models import load_model

    return load_model(target_path)  # (model, tokenizer)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"id": f"c{i}", "messages": [
        {"role": "system", "content": "Be brief."} if i % 2 else None,
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(CHATS)]
    for r in rows:
        r["messages"] = [m for m in r["messages"] if m]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, target_path, chats):
    """{rule: draft dir}: drop 2 of 8 by acceptance, and a deep cut (keep 3) by angular."""
    from specdec import prune

    out = tmp_path_factory.mktemp("prune")
    common = ["--target", str(target_path), "--calib-source", str(chats), "--calib-split", "all",
              "--heldout-source", str(chats), "--heldout-split", "all", "--calib-n", "6",
              "--heldout-n", "2", "--gen-len", "4", "--max-len", "48", "--candidates", "2",
              "--batch-size", "6"]
    assert prune.main(common + ["--drop", "2", "--select", "acceptance",
                                "--out", str(out / "drop2")]) == 0
    assert prune.main(common + ["--keep", "3", "--select", "angular",
                                "--out", str(out / "keep3")]) == 0
    return {"drop2": out / "drop2", "keep3": out / "keep3"}


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt):].tolist()


def _forced_stop(model, prompt: list[int], eos_id: int, at: int = 2):
    """A copy of `model` whose greedy text is the original's first tokens, then `eos_id`: the
    head rows of the token at position >= `at` not seen before and of `eos_id` are swapped
    (the head is untied, so the inputs are unchanged). Returns (copy, tokens before the stop)."""
    text = _greedy(model, prompt, at + 6)
    j = next(i for i in range(at, len(text)) if text[i] not in text[:i])
    assert eos_id not in text[:j]
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        w = swapped.lm_head.weight
        w[[text[j], eos_id]] = w[[eos_id, text[j]]].clone()
    return swapped, text[:j]


@pytest.mark.slow
def test_prune_both_rules_keep_the_untied_head(pruned, target_path):
    from safetensors.torch import load_file

    from specdec.models import read_manifest

    full = load_file(str(target_path / "model.safetensors"))
    for rule, layers in (("drop2", 6), ("keep3", 3)):
        config = json.loads((pruned[rule] / "config.json").read_text())
        assert config["num_hidden_layers"] == layers and config["tie_word_embeddings"] is False
        assert config["eos_token_id"] == list(EOS_TOKEN_IDS)
        weights = load_file(str(pruned[rule] / "model.safetensors"))
        assert torch.equal(weights["lm_head.weight"], full["lm_head.weight"])
        assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
        for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
            assert (pruned[rule] / name).read_bytes() == (target_path / name).read_bytes(), name
        manifest = read_manifest(pruned[rule])
        assert len(manifest["removed_layers"]) == 8 - layers
        assert manifest["target_weights_sha256"] if "target_weights_sha256" in manifest else True


@pytest.mark.slow
def test_distill_prompts_eos_and_filters_with_the_llama3_template(tmp_path, target, chats):
    from specdec import distill
    from specdec.distill import DistillConfig
    from specdec.generation import TransformersGenerator

    model, tok = target
    gen = TransformersGenerator(model, tok, max_new_tokens=6)
    assert gen.stop_ids == list(EOS_TOKEN_IDS) and gen.pad_id in EOS_TOKEN_IDS  # no pad token
    seen = []

    def recording(prompts, decoding=None):
        seen.extend(prompts)
        return gen(prompts, decoding)

    header = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n",
                        add_special_tokens=False)
    cfg = DistillConfig(out=str(tmp_path / "d.jsonl"), target="rehearsal", data=str(chats),
                        n=None, batch_size=3, max_new_tokens=6, max_prompt_tokens=200,
                        retry_mode="none", frequency_penalty=0.0)  # plain decoding: EOS under test
    result = distill.run(cfg, generator=recording, tokenizer=tok)
    assert len(seen) == len(CHATS)
    for prompt in seen:
        assert prompt[0] == 128000 and prompt.count(128000) == 1
        assert prompt[-len(header):] == header and prompt.count(128009) >= 2  # system + user
        assert "Cutting Knowledge Date" in tok.decode(prompt)
    records = [json.loads(x) for x in result.out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"c{i}" for i in range(len(CHATS))]
    # 6 random tokens never end on their own: every one is cut off and falls back
    assert {r["reason"] for r in records} == {"truncated"}
    # each of the three EOS ids ends a generation: finished, the stop token left out
    prompt = seen[0]
    for eos in EOS_TOKEN_IDS:
        forced, before = _forced_stop(model, prompt, eos)
        [g] = TransformersGenerator(forced, tok, max_new_tokens=12)([prompt])
        assert g.finished and g.token_ids == before, eos
    # the filters see the answer up to its <|eot_id|>, decoded without special tokens
    plain = chat_ids(tok, [{"role": "user", "content": CHATS[0][0]}])
    forced, before = _forced_stop(model, plain, 128009)
    run2 = distill.run(DistillConfig(out=str(tmp_path / "e.jsonl"), target="rehearsal",
                                     data=str(chats), n=1, max_new_tokens=12, mode="regenerate",
                                     max_prompt_tokens=200, retry_mode="none",
                                     frequency_penalty=0.0),
                       generator=TransformersGenerator(forced, tok, max_new_tokens=12),
                       tokenizer=tok)
    first = json.loads(run2.out.read_text().splitlines()[0])
    assert first.get("reason") != "truncated"
    if first["origin"] == "distilled":
        assert first["messages"][-1]["content"] == tok.decode(before, skip_special_tokens=True).strip()
    assert "<|" not in first["messages"][-1]["content"]


@pytest.fixture(scope="module")
def healed(tmp_path_factory, pruned, chats, target_path):
    """{name: FinetuneResult}: LoRA (SFT) and full + KD (against the rehearsal target) on drop2."""
    from specdec import finetune
    from specdec.finetune import FinetuneConfig

    out = tmp_path_factory.mktemp("heal")
    common = dict(draft=str(pruned["drop2"]), data=str(chats), max_prompt_tokens=200,
                  batch_size=2, micro_batch_size=2, max_steps=2, warmup_ratio=0.0,
                  lora_rank=4, lora_alpha=8, lora_dropout=0.0, device="cpu", save_every=0)
    runs = {"lora": dict(method="lora", lr=1e-2),
            "full": dict(method="full", lr=1e-3, kd=0.5, target=str(target_path))}
    return {name: finetune.run(FinetuneConfig(out=str(out / name), **common, **kw))
            for name, kw in runs.items()}


@pytest.mark.slow
def test_finetune_lora_full_kd_on_the_llama3_template(healed, pruned, target):
    from safetensors.torch import load_file

    from specdec.models import read_manifest
    from specdec.train_data import build_example

    _, tok = target
    ex = build_example(tok, "x", [{"role": "user", "content": "Hi"}], "Hello.",
                       set(EOS_TOKEN_IDS), max_seq_len=512)
    assert ex.input_ids[:ex.n_prompt] == chat_ids(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ex.input_ids[ex.n_prompt:]) == "Hello.<|eot_id|>"  # loss on the EOT too
    base = load_file(str(pruned["drop2"] / "model.safetensors"))
    for name, result in healed.items():
        manifest = read_manifest(result.out)
        assert manifest["stage"] == "finetune" and len(manifest["loss_curve"]) == 2, name
        weights = load_file(str(result.out / "model.safetensors"))
        assert set(weights) == set(base), name  # merged, untied, no adapter tensors
        assert all(torch.isfinite(c["loss"] if isinstance(c["loss"], torch.Tensor)
                                  else torch.tensor(c["loss"])) for c in result.curve)
    assert healed["full"].curve[0]["kd"] > 0 and healed["lora"].curve[0].get("kd") is None
    config = json.loads((healed["full"].out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 128256


@pytest.mark.slow
def test_merge_two_healed_drafts(tmp_path, healed):
    from safetensors.torch import load_file

    from specdec import merge

    out = tmp_path / "merged"
    assert merge.main(["--a", str(healed["lora"].out), "--b", str(healed["full"].out),
                       "--out", str(out)]) == 0
    a, b, m = (load_file(str(p / "model.safetensors"))
               for p in (healed["lora"].out, healed["full"].out, out))
    assert set(m) == set(a)
    assert not torch.equal(m["lm_head.weight"], m["model.embed_tokens.weight"])
    assert (out / "tokenizer.json").read_bytes() == (healed["lora"].out / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_evaluate_and_the_engine_measure_the_same_greedy_acceptance(tmp_path, target, pruned,
                                                                     target_path, chats):
    """Teacher-forced greedy MAL == what the engine measures running the pair (the bench's
    check), on prompts rendered with the Llama-3 template; engine greedy == target alone."""
    from specdec import evaluate
    from specdec.decode.engine import SpeculativeEngine
    from specdec.decode.sampling import SamplingParams
    from specdec.models import load_model

    model, tok = target
    draft, _ = load_model(pruned["drop2"])
    draft.generation_config.eos_token_id = None  # the engine must take the target's EOS ids
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q, _ in CHATS[:3]]
    n, k = 12, 3
    alone = SpeculativeEngine(model, None, tokenizer=tok).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    engine = SpeculativeEngine(model, draft, k=k, tokenizer=tok)
    spec = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    for a, s, p in zip(alone, spec, prompts):
        assert s.token_ids == a.token_ids == _greedy(model, p, n)
    bench = _bench_module("acceptance")
    answers = [evaluate.Answer(f"a{i}", "all", 1, p + r.token_ids, len(p))
               for i, (p, r) in enumerate(zip(prompts, alone))]
    check = bench.engine_check(model, draft, answers, k)
    assert check["agree"] and check["steps_engine"] == sum(r.steps for r in spec)
    assert check["texts_differing_from_batched_answers"] == 0
    # the evaluate stage's own pieces: the target's answers (cached by its hash), then scores
    answers = evaluate.cached_target_answers(str(target_path), str(chats), n=2,
                                             max_new_tokens=6, batch_size=2, target=model,
                                             tokenizer=tok)
    assert all(a.ids[0] == 128000 and a.ids[a.prompt_len - 1] == 271 for a in answers)
    results = evaluate.score_drafts(model, {"drop2": draft}, answers, batch_size=2,
                                    pad_id=EOS_TOKEN_IDS[0])
    assert results[0].layers == 6 and 0.0 <= results[0].report.alpha <= 1.0
    assert results[0].report.target_matches_text == 1.0


def _forced_stops(model, prompts: list[list[int]], eos_ids) -> object:
    """One copy of `model` whose greedy answer to prompts[i] stops on eos_ids[i] after two or
    more tokens: head rows swapped as in `_forced_stop`, each swap kept only if every prompt
    so far still stops where intended."""
    forced = copy.deepcopy(model)
    w = forced.lm_head.weight

    def first_stop(p):
        text = _greedy(forced, p, 10)
        return next(((i, t) for i, t in enumerate(text) if t in EOS_TOKEN_IDS), (None, None))

    with torch.no_grad():
        for n, (prompt, eos) in enumerate(zip(prompts, eos_ids)):
            text = _greedy(forced, prompt, 10)
            for j in range(2, len(text)):
                if text[j] in text[:j]:
                    continue
                w[[text[j], eos]] = w[[eos, text[j]]].clone()
                stops = [first_stop(p) for p in prompts[:n + 1]]
                if all(i is not None and i >= 2 and t == e
                       for (i, t), e in zip(stops, eos_ids)):
                    break
                w[[text[j], eos]] = w[[eos, text[j]]].clone()  # undo, try the next position
            else:
                raise AssertionError(f"no head swap makes prompt {n} stop on {eos}")
    return forced


@pytest.mark.slow
def test_serve_chat_template_and_every_eos_id_through_the_openai_api(target, pruned):
    import openai

    from specdec.decode.engine import SpeculativeEngine
    from specdec.decode.sampling import SamplingParams
    from specdec.models import load_model
    from specdec.serve import ServeConfig, create_app, running_server

    model, tok = target
    draft, _ = load_model(pruned["drop2"])
    questions = [CHATS[i][0] for i in (0, 4, 5)]  # random text that differs between them
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    forced = _forced_stops(model, prompts, EOS_TOKEN_IDS)
    offline = SpeculativeEngine(forced, draft, k=3, tokenizer=tok).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for res, prompt, eos in zip(offline, prompts, EOS_TOKEN_IDS):
        text = _greedy(forced, prompt, 12)
        assert res.finish_reason == "stop" and res.token_ids == text[:text.index(eos) + 1], eos
        assert "<|" not in res.text
    engine = SpeculativeEngine(forced, draft, k=3, tokenizer=tok)
    cfg = ServeConfig(target=REHEARSAL, k=3, max_batch=4, default_max_tokens=16)
    with running_server(create_app(cfg, engine=engine, tokenizer=tok)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0,
                               timeout=120)
        for q, res, eos in zip(questions, offline, EOS_TOKEN_IDS):
            resp = client.chat.completions.create(
                model=REHEARSAL, messages=[{"role": "user", "content": q}], temperature=0,
                max_tokens=16)
            assert resp.choices[0].finish_reason == "stop", eos
            assert resp.choices[0].message.content == res.text
            assert resp.usage.prompt_tokens == len(chat_ids(tok, [{"role": "user",
                                                                   "content": q}]))
            assert resp.usage.completion_tokens == len(res.token_ids)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=REHEARSAL, messages=[{"role": "user", "content": questions[1]}],
            temperature=0, max_tokens=16, stream=True) if c.choices)
        assert streamed == offline[1].text


@pytest.mark.slow
def test_vllm_config_accepts_a_rehearsal_draft_and_rejects_a_smollm2_one(
        tmp_path, pruned, target_path, smollm2_path, capsys):
    from transformers import AutoTokenizer

    from conftest import make_tiny_llama
    from specdec import vllm as sv
    from specdec.models import save_checkpoint

    assert sv.main(["config", "--draft", str(pruned["keep3"]), "--target", str(target_path),
                    "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["problems"] == []
    assert {"EOS ids", "tokenizer vocab+merges"} <= {c["name"] for c in out["checks"]}
    model = make_tiny_llama(0, num_layers=2, vocab_size=49152)
    model.config.architectures = ["LlamaForCausalLM"]
    smol = save_checkpoint(model, AutoTokenizer.from_pretrained(smollm2_path),
                           tmp_path / "smol-draft", {"stage": "prune"})
    check = sv.check_draft(smol, str(target_path))
    assert not check.ok and "vocab_size (config)" in [r.name for r in check.rows if r.ok is False]
    with pytest.raises(sv.DraftMismatchError, match="vocab"):
        check.raise_if_failed()
    assert sv.main(["config", "--draft", str(smol), "--target", str(target_path)]) == 1
    err = capsys.readouterr().err
    assert "vocab_size" in err and "Fix:" in err


def test_paper_8b_dry_run_prints_every_stage_and_downloads_nothing(monkeypatch, capsys):
    from specdec import models, pipeline

    def no_download(*args, **kwargs):
        raise AssertionError("--dry-run must not resolve or download a model")

    monkeypatch.setattr(models, "resolve_model", no_download)
    monkeypatch.setattr(models, "_hub_snapshot", no_download)
    monkeypatch.setattr(pipeline, "run", no_download)
    assert pipeline.main(["--preset", "paper-8b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for needle in ("llama-3.1-8b-instruct", "32 -> 26 layers", "--engine vllm",
                   "torchrun --nproc-per-node", "--bf16", "--turns 2", "--vllm on",
                   "min on H100", "min on H200", "GPU memory"):
        assert needle in out, needle
    assert out.count("python -m specdec.prune") == 2 and out.count("-m specdec.finetune") == 6


@pytest.mark.slow
def test_trimmed_draft_vocabulary_at_vocab_128256(tmp_path, target, pruned):
    """#8's trimmed head on Llama-3's vocabulary: all three EOS ids kept, the sidecar round
    trips, greedy output with the trimmed draft == the target alone, stops on <|eom_id|>."""
    from specdec.decode.engine import SpeculativeEngine
    from specdec.decode.sampling import SamplingParams
    from specdec.models import load_model
    from specdec.vocab import from_data, load_draft_vocab

    model, tok = target
    data = tmp_path / "distilled.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "origin": "distilled", "messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for i, (q, a) in enumerate(CHATS)))
    draft, _ = load_model(pruned["drop2"])
    vocab, curve = from_data(data, tok, 128256, n=16, model=draft)
    assert vocab.vocab_size == 128256 and set(EOS_TOKEN_IDS) <= set(vocab.ids.tolist())
    assert 16 <= vocab.n < 128256 and curve
    vocab.save(pruned["drop2"])
    try:
        loaded = load_draft_vocab(pruned["drop2"], 128256)
        assert torch.equal(loaded.ids, vocab.ids)
    finally:
        (pruned["drop2"] / "draft_vocab.json").unlink(missing_ok=True)
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q, _ in CHATS[:2]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = SpeculativeEngine(model, None, tokenizer=tok).generate(prompts, params)
    trimmed = SpeculativeEngine(model, draft, k=3, tokenizer=tok,
                                draft_vocab=loaded).generate(prompts, params)
    assert [r.token_ids for r in trimmed] == [r.token_ids for r in alone]
    forced, before = _forced_stop(model, prompts[0], 128008)
    [stopped] = SpeculativeEngine(forced, draft, k=3, tokenizer=tok, draft_vocab=loaded).generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=16))
    assert stopped.finish_reason == "stop" and stopped.token_ids == before + [128008]
