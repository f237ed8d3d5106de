"""specdec.distill: filter reasons, math detection, templates, record selection, resume, CLI."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from rich.console import Console

from conftest import save_tiny_chat_model, tiny_chat_tokenizer, write_chat_data
from specdec import distill
from specdec.distill import (Decoding, DistillConfig, Generation, TransformersGenerator,
                             first_turns, rewrite_messages, stop_token_ids)
from specdec.filters import REASONS, final_number, is_math, reject_reason
from specdec.models import load_model


# ---------------------------------------------------------------------------- filter


def reason(text, instruction="Tell me about cats.", reference="Cats are pets.", finished=True,
           math_like=False):
    return reject_reason(text, instruction=instruction, reference=reference, finished=finished,
                         math_like=math_like)


def test_filter_reasons_on_crafted_strings():
    assert reason("Cats are small, furry animals that many people keep at home.") is None
    assert reason("") == "empty"
    assert reason("  \n ... ") == "empty"
    assert reason("the cat sat on the mat " * 12) == "repetition"
    lines = "\n".join(["Intro line here."] + ["- Cats like milk a lot."] * 6)
    assert reason(lines) == "repetition"
    assert reason("Cats are lovely animals.", finished=False) == "truncated"
    assert reason("Based on the reference answer, cats are pets.") == "template_leak"
    assert reason("### Response:\nCats are pets.") == "template_leak"
    assert reason("Here is your response: cats are pets.") == "template_leak"
    assert reason("As in the original response, cats purr.") == "template_leak"
    # a phrase the user asked for is no leak
    assert reason("In your own words: cats purr.",
                  instruction="Explain cats in your own words.") is None
    math = dict(instruction="What is 12 + 30?", reference="12 + 30 = 42. The answer is: 42",
                math_like=True)
    assert reason("12 plus 30 makes 42. The answer is: 42", **math) is None
    assert reason("12 plus 30 makes 43. The answer is: 43", **math) == "math_mismatch"
    assert reason("I cannot say.", **math) == "math_mismatch"
    # first matching reason wins: a loop that also hit the token limit is a repetition
    assert reason("and again " * 40, finished=False) == "repetition"


def test_final_number_and_math_detector():
    assert final_number("so x = 3 and #### 1,234") == "1234"
    assert final_number("hence \\boxed{0.5}.") == "0.5"
    assert final_number("The answer is: $ 17") == "17"
    assert final_number("first 3, then 4.") == "4"
    assert final_number("no numbers") is None
    assert is_math("What is 7 * 6?", "7 * 6 = 42")
    assert is_math("Natalia sold clips...", "She sold 48 + 24 = 72 clips.\n#### 72")
    assert is_math("How many apples are left?", "She has 5 - 2 = 3 apples, so the total is 3.")
    assert not is_math("Write a poem about 3 cats", "Three cats sat...\nIn 2023")
    assert not is_math("Fix this: ```x = 1 + 2```", "```\nx = 3\n```")


# ---------------------------------------------------------------------------- prompts, selection


def test_rewrite_and_regenerate_messages():
    tok = tiny_chat_tokenizer()
    turn = distill.FirstTurn("a", "t", [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Name a color."}],
                             "Blue is a color. " * 10)
    msgs, math_like = rewrite_messages(turn, tok, "rewrite", max_reference_tokens=20)
    assert not math_like and [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\nYou are a helpful AI assistant.")
    assert msgs[0]["content"].endswith("Reference answer:\nBlue is a color. Blu ...")  # 20 tokens
    assert msgs[1] == {"role": "user", "content": "Name a color."}
    msgs, _ = rewrite_messages(turn, tok, "rewrite", 20, template="paper")
    assert msgs[0]["content"] == "Be brief." and "### Instruction:\nName a color." in \
        msgs[1]["content"] and msgs[1]["content"].endswith("### Response:")
    msgs, _ = rewrite_messages(turn, tok, "regenerate", max_reference_tokens=20)
    assert msgs == turn.prompt
    math_turn = distill.FirstTurn("m", "t", [{"role": "user", "content": "What is 2 + 2?"}],
                                  "2 + 2 = 4")
    for template in distill.TEMPLATES:
        msgs, math_like = rewrite_messages(math_turn, tok, "rewrite", 50, template)
        assert math_like and "The answer is: <number>" in msgs[0]["content"]
        assert "2 + 2 = 4" in msgs[0]["content"]


def test_first_turns_skips_and_counts(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=5)
    counts = Counter()
    turns = first_turns(str(data), tiny_chat_tokenizer(), n=None, max_prompt_tokens=60,
                        counts=counts)
    assert [t.id for t in turns] == [f"r{i}" for i in range(5)]
    assert counts == {"not_first_turn": 1, "no_reference": 1, "prompt_too_long": 1}
    assert turns[0].prompt == [{"role": "user", "content": "Say hi number 0"}]
    assert turns[0].reference == "Hi 0! Here is 0."
    assert [t.id for t in first_turns(str(data), tiny_chat_tokenizer(), n=2)] == ["r0", "r1"]
    counts = Counter()
    turns = first_turns(str(data), tiny_chat_tokenizer(), max_prompt_tokens=60, counts=counts,
                        max_answer_tokens=15)  # "Hi 0! Here is 0." is 16 characters
    assert turns == [] and counts["answer_too_long"] == 5


# ---------------------------------------------------------------------------- run and resume


class Interrupted(RuntimeError):
    pass


class FailAfter:
    """Wraps a generator and raises after `k` successful batches (an interrupt)."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls = inner, k, 0

    def __call__(self, prompts, decoding=None):
        if self.calls == self.k:
            raise Interrupted("simulated interrupt")
        self.calls += 1
        return self.inner(prompts, decoding)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("target") / "tiny", seed=3)


def test_resume_after_interrupt_loses_and_duplicates_nothing(tmp_path, tiny_target):
    data = write_chat_data(tmp_path / "d.jsonl", n=7)
    model, tok = load_model(tiny_target)

    def cfg(out):
        return DistillConfig(out=str(out), target=str(tiny_target), data=str(data), n=None,
                             batch_size=2, max_new_tokens=6, max_prompt_tokens=60,
                             retry_mode="none")

    def gen():
        return TransformersGenerator(model, tok, max_new_tokens=6)

    ref = distill.run(cfg(tmp_path / "ref.jsonl"), generator=gen(), tokenizer=tok)
    ref_lines = ref.out.read_text().splitlines()
    assert [json.loads(x)["id"] for x in ref_lines] == [f"r{i}" for i in range(7)]

    out = tmp_path / "x.jsonl"
    with pytest.raises(Interrupted):
        distill.run(cfg(out), generator=FailAfter(gen(), 2), tokenizer=tok)
    partial = distill.partial_path(out)
    assert not out.exists() and len(partial.read_text().splitlines()) == 4  # 2 batches of 2
    with open(partial, "a") as f:  # a line torn by the interrupt
        f.write('{"id": "r6", "messa')
    counting = FailAfter(gen(), 99)
    result = distill.run(cfg(out), generator=counting, tokenizer=tok)
    assert counting.calls == 2  # only the 3 missing records were generated, in 2 batches
    assert not partial.exists()
    lines = out.read_text().splitlines()
    assert lines == ref_lines  # nothing lost, nothing duplicated, same records in data order
    summary = json.loads(distill.summary_path(out).read_text())
    assert summary["records"] == 7 and summary["distilled"] + summary["fallback"] == 7
    assert summary["skipped"] == {"no_reference": 1, "not_first_turn": 1, "prompt_too_long": 1}
    assert sum(summary["reasons"].values()) == summary["fallback"]
    assert result.summary == summary
    for rec in map(json.loads, lines):
        assert rec["origin"] in ("distilled", "fallback") and rec["mode"] == "rewrite"
        assert rec["messages"][-1]["role"] == "assistant"
        if rec["origin"] == "fallback":
            assert rec["reason"] in REASONS
            assert rec["messages"][-1]["content"].startswith("Hi ")  # the original answer
    # a rerun finds everything done and generates nothing
    idle = FailAfter(gen(), 0)
    distill.run(cfg(out), generator=idle, tokenizer=tok)
    assert out.read_text().splitlines() == ref_lines
    # another mode cannot silently mix into the same file
    with pytest.raises(ValueError, match="mode"):
        other = cfg(out)
        other.mode = "regenerate"
        distill.run(other, generator=idle, tokenizer=tok)


def test_generated_text_is_kept_when_it_passes(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=2)
    tok = tiny_chat_tokenizer()

    def fixed(prompts, decoding=None):
        return [Generation([5, 6], "A fine answer about it.", True) for _ in prompts]

    cfg = DistillConfig(out=str(tmp_path / "o.jsonl"), data=str(data), n=2, mode="regenerate",
                        target="t")
    result = distill.run(cfg, generator=fixed, tokenizer=tok)
    recs = [json.loads(x) for x in result.out.read_text().splitlines()]
    assert [r["origin"] for r in recs] == ["distilled", "distilled"]
    assert recs[0]["messages"] == [{"role": "user", "content": "Say hi number 0"},
                                   {"role": "assistant", "content": "A fine answer about it."}]
    assert result.summary["kept_share"] == 1.0
    assert recs[0]["attempt"] == 1 and "rejected" not in recs[0]
    assert recs[0]["decoding"] == {"mode": "regenerate", "max_new_tokens": 256,
                                   "temperature": 0.0, "top_p": 1.0,
                                   "repetition_penalty": 1.0, "seed": 0,
                                   "presence_penalty": 0.0, "frequency_penalty": 0.3}


def test_retry_and_decoding_provenance(tmp_path):
    """A rejected first attempt is retried with the retry's prompt and settings; every record
    and the summary say which attempt wrote the answer and how it was decoded."""
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    tok = tiny_chat_tokenizer()
    calls = []

    def scripted(prompts, decoding=None):
        calls.append((len(prompts), decoding))
        if len(calls) == 1:  # first attempt: a loop, a cut-off answer, then two good ones
            texts = [("loop " * 40, True), ("Cut off", False)] + [("Fine.", True)] * 2
        else:  # the retry: one good, one loop again
            texts = [("A second try that works.", True), ("again " * 40, True)]
        return [Generation([5] * 3, t, f) for t, f in texts[:len(prompts)]]

    cfg = DistillConfig(out=str(tmp_path / "o.jsonl"), data=str(data), n=4, target="t",
                        max_new_tokens=32, repetition_penalty=1.1, retry_mode="regenerate",
                        retry_temperature=0.5, retry_top_p=0.9, retry_repetition_penalty=1.3,
                        retry_max_new_tokens=48, max_prompt_tokens=60, seed=7,
                        presence_penalty=0.25, retry_frequency_penalty=0.5)
    result = distill.run(cfg, generator=scripted, tokenizer=tok)
    first, retry = calls[0][1], calls[1][1]
    assert calls[0][0] == 4 and calls[1][0] == 2  # only the two rejected ones are retried
    assert (first.max_new_tokens, first.temperature, first.repetition_penalty, first.seed) \
        == (32, 0.0, 1.1, 7)
    assert (retry.max_new_tokens, retry.temperature, retry.top_p, retry.repetition_penalty,
            retry.seed) == (48, 0.5, 0.9, 1.3, 8)
    recs = {r["id"]: r for r in map(json.loads, result.out.read_text().splitlines())}
    order = [t.id for t in first_turns(str(data), tok, n=4, max_prompt_tokens=60)]
    # the longest prompt went first; the data order of results is restored at the end
    by_answer = {r["messages"][-1]["content"]: r for r in recs.values()}
    kept2 = by_answer["A second try that works."]
    assert kept2["origin"] == "distilled" and kept2["attempt"] == 2 and kept2["reason"] is None
    assert kept2["decoding"] == {"mode": "regenerate", "max_new_tokens": 48,
                                 "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.3,
                                 "seed": 8, "presence_penalty": 0.0, "frequency_penalty": 0.5}
    assert [x["reason"] for x in kept2["rejected"]] == ["repetition"]
    assert kept2["generated_tokens"] == 6  # both attempts count
    lost = [r for r in recs.values() if r["origin"] == "fallback"]
    assert len(lost) == 1 and lost[0]["attempt"] == 2 and lost[0]["reason"] == "repetition"
    assert [x["reason"] for x in lost[0]["rejected"]] == ["truncated", "repetition"]
    assert lost[0]["decoding"]["mode"] == "regenerate"
    for r in recs.values():
        if r["attempt"] == 1:
            assert r["decoding"] == {"mode": "rewrite", "max_new_tokens": 32,
                                     "temperature": 0.0, "top_p": 1.0,
                                     "repetition_penalty": 1.1, "seed": 7,
                                     "presence_penalty": 0.25, "frequency_penalty": 0.3}
    assert list(recs) == order
    s = result.summary
    assert [a["kept"] for a in s["attempts"]] == [2, 1]
    one = next(r for r in recs.values() if r["attempt"] == 1)
    assert s["attempts"][0] == {**one["decoding"], "kept": 2}
    assert s["attempts"][1]["mode"] == "regenerate" and s["attempts"][1]["temperature"] == 0.5
    assert s["first_attempt_reasons"]["repetition"] == 1
    assert s["first_attempt_reasons"]["truncated"] == 1
    assert s["reasons"]["repetition"] == 1 and s["fallback"] == 1
    # a rerun with other decoding settings cannot mix into the same file
    for change in (dict(repetition_penalty=1.0), dict(presence_penalty=0.0)):
        with pytest.raises(ValueError, match="decoded with"):
            distill.run(dataclasses.replace(cfg, **change), generator=scripted, tokenizer=tok)


def test_engines_read_a_decoding_alike(tiny_target):
    """transformers' generate kwargs and vLLM's SamplingParams carry the same settings."""
    model, tok = load_model(tiny_target)
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    model.generate = spy
    d = Decoding(max_new_tokens=5, temperature=0.4, top_p=0.8, repetition_penalty=1.2, seed=3)
    gen = TransformersGenerator(model, tok, max_new_tokens=9)
    out = gen([[1, 2, 3], [4, 5]], d)
    assert len(out) == 2 and all(len(g.token_ids) <= 5 for g in out)
    assert {k: seen[k] for k in ("max_new_tokens", "temperature", "top_p",
                                 "repetition_penalty", "do_sample")} == \
        dict(max_new_tokens=5, temperature=0.4, top_p=0.8, repetition_penalty=1.2,
             do_sample=True)
    gen([[1, 2, 3]])  # the generator's own settings: greedy, 9 tokens, no penalty
    assert (seen["do_sample"], seen["max_new_tokens"], seen["repetition_penalty"]) == \
        (False, 9, 1.0)

    vllm_gen = object.__new__(distill.VLLMGenerator)  # no engine: only the settings mapping
    vllm_gen.SamplingParams, vllm_gen.stop_ids, vllm_gen.per_request_seed = dict, {2}, True
    assert vllm_gen.params(d) == dict(temperature=0.4, top_p=0.8, repetition_penalty=1.2,
                                      presence_penalty=0.0, frequency_penalty=0.0,
                                      max_tokens=5, seed=3, stop_token_ids=[2])
    assert vllm_gen.params(Decoding(presence_penalty=0.3, frequency_penalty=0.2))[
        "presence_penalty"] == 0.3
    assert vllm_gen.params(Decoding(temperature=0.0, top_p=0.5))["top_p"] == 1.0
    with pytest.raises(ValueError, match="repetition_penalty"):
        Decoding(repetition_penalty=0)
    with pytest.raises(ValueError, match="frequency_penalty"):
        Decoding(frequency_penalty=3)


def test_answer_penalties_spare_the_prompt_and_sample_like_vllm():
    """Presence / frequency penalties count answer tokens only (the stop token in the prompt is
    not lowered), and the processor's own temperature and top-p equal transformers' warpers."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopPLogitsWarper)

    from specdec.generation import AnswerPenalties

    torch.manual_seed(0)
    scores = torch.randn(2, 10)
    # prompt = columns 0..2 (token 9 is the "stop token" both prompts hold); answer after it
    ids = torch.tensor([[9, 4, 4, 1, 1, 3], [9, 9, 9, 2, 5, 5]])
    out = AnswerPenalties(3, Decoding(presence_penalty=0.5, frequency_penalty=0.25))(ids, scores)
    want = scores.clone()
    for row, answer in enumerate(([1, 1, 3], [2, 5, 5])):
        for t in set(answer):
            want[row, t] -= 0.5 + 0.25 * answer.count(t)
    torch.testing.assert_close(out, want)
    assert out[0, 9] == scores[0, 9] and out[0, 4] == scores[0, 4]  # prompt tokens untouched
    # nothing generated yet: no penalty at all
    torch.testing.assert_close(AnswerPenalties(6, Decoding(presence_penalty=1.0))(ids, scores),
                               scores)
    for top_p in (0.3, 0.9, 1.0):
        d = Decoding(temperature=0.7, top_p=top_p)
        mine = AnswerPenalties(6, d)(ids, scores)
        theirs = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(0.7)(ids, scores.clone()))
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
        torch.testing.assert_close(mine[~torch.isinf(mine)], theirs[~torch.isinf(theirs)])


def test_answer_penalties_reach_generate(tiny_target):
    """Greedy generation with a frequency penalty equals a hand-written loop that subtracts it."""
    model, tok = load_model(tiny_target)
    prompt, d = [1, 2, 3, 4], Decoding(max_new_tokens=8, frequency_penalty=2.0)
    [g] = TransformersGenerator(model, tok, max_new_tokens=8)([prompt], d)
    seq, counts = list(prompt), torch.zeros(model.config.vocab_size)
    stops = set(stop_token_ids(model.config, model.generation_config, tok))
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([seq])).logits[0, -1].float() - 2.0 * counts
            t = int(logits.argmax())
            if t in stops:
                break
            seq.append(t)
            counts[t] += 1
    assert g.token_ids == seq[len(prompt):]
    [plain] = TransformersGenerator(model, tok, max_new_tokens=8)([prompt])
    assert plain.token_ids != g.token_ids  # the penalty changed this greedy answer


def test_vllm_engine_fails_clearly_without_vllm(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(RuntimeError, match="--engine vllm needs vLLM"):
        distill.VLLMGenerator(tmp_path, max_new_tokens=4)


def test_cli_smoke(tmp_path, tiny_target):
    data = write_chat_data(tmp_path / "d.jsonl", n=3)
    out = tmp_path / "run" / "distilled.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.distill", "--target", str(tiny_target), "--data",
         str(data), "--n", "3", "--out", str(out), "--batch-size", "2", "--max-new-tokens", "5",
         "--max-prompt-tokens", "60", "--mode", "regenerate", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 3
    summary = json.loads((tmp_path / "run" / "distilled.jsonl.summary.json").read_text())
    assert summary["records"] == 3 and summary["config"]["mode"] == "regenerate"
    assert "fell back to original" in proc.stdout


def test_config_to_args_round_trips():
    from specdec.cli import config_from_args, config_parser, config_to_args

    cfg = DistillConfig(out="x/d.jsonl", n=7, engine="vllm", dtype="bfloat16",
                        max_answer_tokens=None, vllm_kv_cache_gib=1.5, vllm_eager=True,
                        temperature=0.7, repetition_penalty=1.15, retry_mode="regenerate",
                        retry_temperature=0.3, retry_max_new_tokens=300)
    parser = config_parser(DistillConfig, "p", "d")
    assert config_from_args(DistillConfig, parser.parse_args(config_to_args(cfg))) == cfg


def test_run_in_another_interpreter_passes_the_config_and_reports_failure(tmp_path):
    """The vLLM path: distillation re-run by another interpreter with the same config."""
    from specdec.cli import config_from_args, config_parser

    log = tmp_path / "argv.json"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
                    f"sys.exit(0 if '--n' in sys.argv else 3)\n")
    fake.chmod(0o755)
    cfg = DistillConfig(out=str(tmp_path / "d.jsonl"), n=5, engine="vllm", dtype="bfloat16")
    console = Console()
    distill.run_in(str(fake), cfg, console)
    argv = json.loads(log.read_text())
    assert argv[:2] == ["-m", "specdec.distill"]
    parsed = config_parser(DistillConfig, "p", "d").parse_args(argv[2:])
    assert config_from_args(DistillConfig, parsed) == cfg

    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="rerun the same command to continue"):
        distill.run_in(str(fake), cfg, console)
    assert distill.vllm_elsewhere(DistillConfig(out="d.jsonl")) is None  # transformers: here


def test_records_from_before_the_answer_penalties_still_resume(tmp_path):
    """A record written before presence / frequency penalties existed (its `decoding` lacks
    them) resumes under settings that leave them off, and only those."""
    old = DistillConfig(out=str(tmp_path / "o.jsonl"), target="t", repetition_penalty=1.1,
                        frequency_penalty=0.0, retry_mode="none")
    decoding = {"mode": "rewrite", "max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0,
                "repetition_penalty": 1.1, "seed": 0}
    done = {"a": {"id": "a", "mode": "rewrite", "target": "t", "attempt": 1,
                  "decoding": decoding}}
    distill.check_resumable(done, old, tmp_path)  # same settings: no error
    with pytest.raises(ValueError, match="decoded with"):
        distill.check_resumable(done, dataclasses.replace(old, frequency_penalty=0.3), tmp_path)
