"""Latency of our speculative engine against Hugging Face, batch 1, greedy, side by side.

    python bench/latency.py                                  # fp32, a pruned draft built here
    python bench/latency.py --threads 1 --prompts 4 --repeats 2 --new-tokens 64
    python bench/latency.py --draft runs/x/sd --dtype bf16 --ks 1,2,4
    python bench/latency.py --draft runs/x/sd     # k, draft vocabulary and dtype from its specdec.json
    python bench/latency.py --draft runs/x/sd --threads 1 --concurrent   # + the draft on core 2

A draft dir's recorded settings (``recommended`` in its specdec.json, written by
``bench/frontier.py --write-recommended``) are the defaults: its k (unless ``--ks``), its
trimmed draft vocabulary (``draft_vocab.json``; ``--draft-vocab full`` turns it off) and its
draft dtype (unless ``--draft-dtype``). The target's dtype is always ``--dtype``: a speedup is
measured against our own target-only decode in the same dtype.

On the target (SmolLM2 by default) and a draft (``--draft DIR``; by default the target minus a
block of ``--drop`` layers, removed with `specdec.prune.remove_layers`, saved to a temp dir and
loaded back like any draft: the block with the smallest last-token angular distance on
``--calib-n`` ShareGPT conversations, the pruning rule of `specdec.prune`, unless
``--drop-start`` says where; not healed), for MT-Bench first-turn prompts (chat-templated),
every method decodes exactly ``--new-tokens`` tokens (EOS ignored: Hugging Face gets
``eos_token_id=None``, our engine ``ignore_eos``), greedy, batch 1:

* ``ours-target``   our engine without a draft (one token per target forward);
* ``hf-generate``   ``target.generate`` alone;
* ``ours k=K``      our engine with the draft, K draft tokens per step;
* ``hf-assist k=K`` Hugging Face assisted generation with the same draft
                    (``num_assistant_tokens=K``, constant schedule, confidence threshold 0);
* with ``--concurrent``: ``ours-concurrent k=K`` (`specdec.decode.concurrent`: the draft
  drafts in a worker process on another core while the target verifies) and
  ``ours-target 2 threads`` (our target alone given the second core) and ``ours k=K 2 threads``
  (drafting in turn on both cores); ``best_vs_ours_target``
  is then against the faster of our two target-only decodes.

After one warm-up call per method, every (repeat, prompt) runs all methods back to back in an
order rotated per prompt (this machine is shared and noisy); tokens/s is the median over those
runs and a speedup is the median of per-run ratios against the baseline run beside it. Every
method's tokens are compared with ``ours-target``'s, the target alone as our engine decodes it
(greedy decoding is lossless: ours must agree, bitwise in bf16 too; ``all_tokens_match``).
Hugging Face's methods are compared with it as well and reported apart (``hf_tokens_match``):
in fp32 they agree, in bf16 ``generate``'s one-forward prefill of the whole prompt rounds
differently from ours and near-tied greedy choices part.

The cost model next to each measured speedup (`specdec.flops.spec_cost`): alpha fitted to the
measured mean accepted length (tau) at that k, and c the *measured* ratio of one draft forward
to one target forward (one token, batch 1, our forward path, at the prompt's context), giving
``tau / (k c + 1)``; the same with c the FLOPs ratio; and a refinement that also charges the
measured cost v of a (k + 1)-token target forward relative to a 1-token one, ``tau / (k c + v)``.
The cost model assumes v = 1 (verification is free next to a decode step), which holds where
decoding streams weights (bf16 here, GPUs) but not for fp32 matrix products on a CPU.

Prints a table, writes ``bench/results/latency.json`` (atomically) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the timed decoding methods (re-exported here: frontier.py and peers.py use them as lat.*)
from decoders import (  # noqa: E402
    Method,
    Run,
    concurrent_method,
    hf_method,
    our_method,
    sync,
    with_threads,
)

ROOT = Path(__file__).resolve().parents[1]
# method-name suffixes of the --ablation rows (verification: the one the engine does not use)
ABLATIONS = ("hf-fwd", "batched-verify", "row-exact-verify", "unpacked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LatencyConfig:
    target: str = "smollm2-135m-instruct"
    draft: str = ""  # checkpoint dir; "" = the target minus --drop layers
    drop: int = 6
    drop_start: int = -1  # first removed layer; -1 = the angular-distance pick (specdec.prune)
    calib_n: int = 16  # ShareGPT conversations for that pick
    dtype: str = "fp32"  # the target's (and the baseline's)
    draft_dtype: str = ""  # "" = the draft's recommended dtype, else --dtype
    draft_vocab: str = "auto"  # auto (the draft's sidecar, if any) | full | path to a sidecar
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    prompts: int = 3  # MT-Bench first turns
    new_tokens: int = 64
    ks: str = ""  # "" = the draft's recommended k, else 1,2,3,4,6,8
    repeats: int = 2
    hf: bool = True  # also time Hugging Face generate / assisted generation
    # also time our engine with lean=False ("hf-fwd": HF's forward), with one masked
    # attention call per verification instead of the row-exact one ("batched-verify") and
    # without the prepacked bf16 linears ("unpacked"; the same as ours in fp32)
    ablation: bool = False
    # also time specdec.decode.concurrent (the draft in a worker process on another core,
    # needs --draft DIR) and our target alone on 2 threads; speedups are then against the
    # faster of our two target-only decodes
    concurrent: bool = False
    cost_reps: int = 20  # pairs of forwards timed per measured cost ratio
    out: str = "bench/results/latency.json"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ks must be a comma list of ints like 1,2,4, got {text!r}") from None
    if not values or any(not 1 <= k <= 64 for k in values):
        raise ValueError(f"--ks must list draft lengths in 1..64, got {text!r}")
    return values


def resolve_defaults(cfg: LatencyConfig) -> LatencyConfig:
    """Fill --ks and --draft-dtype from the draft's recommended settings (specdec.recommend)."""
    from dataclasses import replace

    from specdec.recommend import recommended

    rec = recommended(cfg.draft)
    ks = cfg.ks or (str(rec["k"]) if rec.get("k") else "1,2,3,4,6,8")
    draft_dtype = cfg.draft_dtype or _short_dtype(rec.get("draft_dtype")) or cfg.dtype
    return replace(cfg, ks=ks, draft_dtype=draft_dtype)


def _short_dtype(name: str | None) -> str:
    from specdec.quant import LONG_NAMES

    return LONG_NAMES.get(name or "", name or "")


def validate(cfg: LatencyConfig) -> None:
    from specdec.quant import DRAFT_DTYPES

    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if (cfg.draft_dtype or cfg.dtype) not in DRAFT_DTYPES:
        raise ValueError(f"--draft-dtype must be one of {', '.join(DRAFT_DTYPES)}, got "
                         f"{cfg.draft_dtype!r}")
    if cfg.ks:  # "" = the draft's recommended k (resolve_defaults)
        _ints(cfg.ks)
    for name in ("prompts", "new_tokens", "repeats", "cost_reps", "drop"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {cfg.threads}")
    if cfg.concurrent and (not cfg.draft or cfg.device != "cpu"):
        raise ValueError("--concurrent drafts in a worker process that loads the draft from its "
                         "dir, on the CPU: give --draft DIR (and --device cpu)")
    if cfg.draft and not Path(cfg.draft).is_dir():
        raise ValueError(f"--draft {cfg.draft!r} is not a directory; give a checkpoint dir "
                         "(e.g. one under runs/) or leave it empty to prune the target here")


# ------------------------------------------------------------------------------ models


def load_pair(cfg: LatencyConfig):
    """(target, draft, tokenizer, draft description, draft vocabulary or None)."""
    from specdec.models import load_model
    from specdec.quant import load_draft
    from specdec.vocab import resolve_draft_vocab

    dtype = DTYPES[cfg.dtype]
    target, tokenizer = load_model(cfg.target, dtype=dtype, device=cfg.device)
    if cfg.draft:
        draft, _ = load_draft(cfg.draft, cfg.draft_dtype, device=cfg.device)
        desc = {"source": cfg.draft, "layers": draft.config.num_hidden_layers}
    else:
        n = target.config.num_hidden_layers
        start, angular = cfg.drop_start, None
        if start < 0:
            start, angular = angular_pick(target, tokenizer, cfg.drop, cfg.calib_n)
        removed = list(range(start, start + cfg.drop))
        if removed[-1] >= n or cfg.drop >= n:
            raise ValueError(f"--drop {cfg.drop} --drop-start {cfg.drop_start}: the block must lie "
                             f"in 0..{n - 1} for a {n}-layer target")
        draft = build_draft(target, tokenizer, removed, cfg.draft_dtype, cfg.device)
        rule = "given" if angular is None else f"angular pick, d = {angular:.3f}"
        desc = {"source": f"{cfg.target} minus layers {removed[0]}-{removed[-1]} ({rule}; not "
                          "healed)",
                "layers": draft.config.num_hidden_layers, "removed_layers": removed,
                "angular_distance": angular}
    if draft.get_output_embeddings().weight.shape != target.get_output_embeddings().weight.shape:
        raise ValueError("the draft's vocabulary differs from the target's; a draft must share "
                         "the target's tokenizer")
    vocab_size = target.get_output_embeddings().weight.shape[0]
    vocab = resolve_draft_vocab(cfg.draft_vocab, cfg.draft or None, vocab_size)
    desc["draft_vocab_n"] = vocab.n if vocab is not None else None
    desc["dtype"] = cfg.draft_dtype
    return target, draft, tokenizer, desc, vocab


def build_draft(target, tokenizer, removed: list[int], dtype: str, device):
    """The target minus `removed` layers, written to a temp checkpoint dir and loaded back the
    way any draft checkpoint is (so its weights are allocated as the target's are), in `dtype`
    (a `specdec.quant.DRAFT_DTYPES` name)."""
    from specdec.prune import remove_layers
    from specdec.quant import load_draft

    pruned = remove_layers(copy.deepcopy(target), removed)
    with tempfile.TemporaryDirectory(prefix="specdec-latency-draft-") as tmp:
        pruned.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del pruned
        draft, _ = load_draft(tmp, dtype, device=device)
    return draft


def angular_pick(target, tokenizer, drop: int, calib_n: int) -> tuple[int, float]:
    """The block of `drop` layers with the smallest last-token angular distance (the rule of
    arXiv 2410.09982, `specdec.prune`) on `calib_n` ShareGPT train conversations."""
    from specdec.prune import PruneConfig, angular_table, calibration_ids

    seqs = calibration_ids(tokenizer, PruneConfig(calib_n=calib_n, max_len=192))
    table = angular_table(target, seqs, [drop])
    distances = table["last_token"][str(drop)]
    start = min(range(len(distances)), key=distances.__getitem__)
    return start, float(distances[start])


def load_prompts(tokenizer, n: int) -> list[list[int]]:
    from specdec.data import chat_ids, load_records

    return [chat_ids(tokenizer, r.prompt()) for r in load_records("mt-bench", n=n)]


# ------------------------------------------------------------------------ measurement


def measure_costs(target, draft, prompt: list[int], ks: list[int], reps: int,
                  draft_vocab=None) -> dict[str, Any]:
    """Seconds of one forward through our engine's path (`BatchKV`, batch 1) at the prompt's
    context: target and draft on 1 token, target on k + 1 tokens for every k. Each ratio is
    measured on its own pairs of forwards run back to back (target 1 token, then the other),
    as the median over pairs of the ratio within a pair, so a load change between pairs
    cancels out and no forward's position in a round biases another. With `draft_vocab` the
    draft's forward ends in its trimmed head, as in the engine."""
    from specdec.decode.forward import row_exact_default
    from specdec.decode.kv import BatchKV

    device = next(target.parameters()).device
    exact = row_exact_default(target)  # verification as the engine runs it
    pairs = [("draft", 1)] + [("target", k + 1) for k in sorted(set(ks))]
    with torch.inference_mode():
        head = draft_vocab.sub_head(draft) if draft_vocab is not None else None
        kvs = {"target": BatchKV(target, 1, device, row_exact=exact),
               "draft": BatchKV(draft, 1, device, head=head)}
        ids = torch.tensor([prompt], device=device)
        for kv in kvs.values():
            kv.forward(ids, logits_to_keep=1)
        no_accept = torch.zeros(1, dtype=torch.int64, device=device)

        def forward_s(name: str, q: int) -> float:
            kv = kvs[name]
            sync(device)
            t0 = time.perf_counter()
            kv.forward(ids[:, -q:])
            sync(device)
            dt = time.perf_counter() - t0
            kv.reject(q, no_accept, [0])  # back to the prompt
            return dt

        base: list[float] = []
        ratios: dict[tuple[str, int], list[float]] = {pair: [] for pair in pairs}
        for rep in range(reps + 2):  # two warm-up rounds
            for name, q in pairs:
                t_target, t_other = forward_s("target", 1), forward_s(name, q)
                if rep >= 2:
                    base.append(t_target)
                    ratios[(name, q)].append(t_other / t_target)
    draft_s = [r * t for r, t in zip(ratios[("draft", 1)], base)]
    return {
        "context": len(prompt),
        "target_forward_s": statistics.median(base),
        "draft_forward_s": statistics.median(draft_s),
        "cost_ratio": statistics.median(ratios[("draft", 1)]),
        "verify_cost": {str(q - 1): statistics.median(ratios[(name, q)])
                        for name, q in pairs if name == "target"},
        "cost_ratio_samples": ratios[("draft", 1)],
        "target_forward_samples_s": base,
    }


def alpha_from_tau(tau: float, k: int) -> float:
    """The alpha whose expected tokens per step (1 - alpha^(k+1)) / (1 - alpha) equals tau."""
    from specdec.flops import expected_tokens_per_step

    if tau >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens_per_step(mid, k) < tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def run(cfg: LatencyConfig, console: Console | None = None) -> dict[str, Any]:
    from specdec import flops

    cfg = resolve_defaults(cfg)
    validate(cfg)
    console = console or Console(stderr=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ks = _ints(cfg.ks)
    load_start = os.getloadavg()
    target, draft, tokenizer, draft_desc, vocab = load_pair(cfg)
    prompts = load_prompts(tokenizer, cfg.prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    methods: dict[str, Method] = {}
    methods["ours-target"] = our_method(target, None, 0)
    if cfg.hf:
        methods["hf-generate"] = hf_method(target, None, 0, pad)
    if cfg.concurrent:
        methods["ours-target 2 threads"] = with_threads(methods["ours-target"], 2)
    if cfg.ablation:
        methods["ours-target hf-fwd"] = our_method(target, None, 0, lean=False)
        methods["ours-target unpacked"] = our_method(target, None, 0, pack=False)
    for k in ks:
        methods[f"ours k={k}"] = our_method(target, draft, k, draft_vocab=vocab)
        if cfg.concurrent:  # the second core three ways: threads in turn, or a draft process
            methods[f"ours k={k} 2 threads"] = with_threads(methods[f"ours k={k}"], 2)
            methods[f"ours-concurrent k={k}"] = concurrent_method(
                target, cfg.draft, cfg.draft_dtype, cfg.draft_vocab, k)
        if cfg.hf:
            methods[f"hf-assist k={k}"] = hf_method(target, draft, k, pad)
        if cfg.ablation:
            methods[f"ours k={k} hf-fwd"] = our_method(target, draft, k, lean=False)
            # the verification the engine does not use by default for this dtype
            exact = not row_exact_default(target)
            methods[f"ours k={k} {'row-exact' if exact else 'batched'}-verify"] = our_method(
                target, draft, k, draft_vocab=vocab, row_exact=exact)
            methods[f"ours k={k} unpacked"] = our_method(target, draft, k, draft_vocab=vocab,
                                                         pack=False)
    names = list(methods)

    console.print(f"[bold]warm-up[/] ({len(names)} methods)")
    for name in names:
        methods[name](prompts[0], min(cfg.new_tokens, 8))
    costs = measure_costs(target, draft, prompts[0], ks, cfg.cost_reps, draft_vocab=vocab)

    runs: dict[str, list[Run]] = {name: [] for name in names}
    reference: dict[int, list[int]] = {}  # prompt -> hf-generate's (or ours-target's) tokens
    total = cfg.repeats * len(prompts)
    t_start = time.perf_counter()
    for rep in range(cfg.repeats):
        for i, prompt in enumerate(prompts):
            shift = (rep * len(prompts) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(methods[name](prompt, cfg.new_tokens))
            done = rep * len(prompts) + i + 1
            console.print(f"  run {done}/{total} done ({time.perf_counter() - t_start:.0f} s)")
    for i in range(len(prompts)):  # the target alone, as our engine decodes it
        reference[i] = runs["ours-target"][i].tokens
    load_end = os.getloadavg()

    context = statistics.median(len(p) for p in prompts) + cfg.new_tokens // 2
    rows = []
    for name in names:
        rs = runs[name]
        row: dict[str, Any] = {"method": name, "k": _k_of(name)}
        row["tok_s"] = statistics.median(cfg.new_tokens / r.seconds for r in rs)
        row["seconds"] = [r.seconds for r in rs]
        row["tokens_match"] = sum(r.tokens == reference[j % len(prompts)]
                                  for j, r in enumerate(rs)) / len(rs)
        row["cpu_tok_s"] = statistics.median(cfg.new_tokens / r.cpu_seconds for r in rs)
        k = row["k"]
        bases = [b for b in ("ours-target", "ours-target 2 threads", "hf-generate") if b in runs]
        if k is not None and cfg.hf and not name.startswith("hf-"):
            bases.append(f"hf-assist k={k}")
        for base in bases:
            key = base.split(" k=")[0]
            row[f"vs_{key}"] = _paired(runs[base], rs)
            row[f"cpu_vs_{key}"] = _paired(runs[base], rs, cpu=True)
        if k is not None and name.startswith("ours"):
            steps = sum(r.steps for r in rs)
            committed = sum(r.accepted + r.steps for r in rs)
            tau = committed / steps
            alpha = alpha_from_tau(tau, k)
            row.update(acceptance=sum(r.accepted for r in rs) / max(sum(r.drafted for r in rs), 1),
                       mal=tau, alpha_fit=alpha)
            if name.startswith("ours-concurrent") or name.endswith(" 2 threads"):
                rows.append(row)  # the cost model is for drafting in turn, on the costs' threads
                continue
            measured = flops.spec_cost(target.config, draft.config, k, alpha, context=int(context),
                                       cost_ratio=costs["cost_ratio"])
            by_flops = flops.spec_cost(target.config, draft.config, k, alpha, context=int(context))
            v = costs["verify_cost"][str(k)]
            row.update(predicted=measured.speedup, predicted_flops=by_flops.speedup,
                       flops_ratio=by_flops.cost_ratio,
                       predicted_verify=tau / (k * costs["cost_ratio"] + v), verify_cost=v)
        rows.append(row)

    return {
        "config": asdict(cfg),
        "machine": _machine(),
        "threads": torch.get_num_threads(),
        "load_average": {"start": load_start, "end": load_end},
        "draft": draft_desc,
        "target_layers": target.config.num_hidden_layers,
        "prompts": [len(p) for p in prompts],
        "costs": costs,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }


def _k_of(name: str) -> int | None:
    if "k=" not in name:
        return None
    return int(name.split("k=")[1].split()[0])


def _paired(base: list[Run], runs: list[Run], cpu: bool = False) -> float:
    """Median over runs of base seconds / method seconds (runs side by side, same prompt)."""
    if cpu:
        return statistics.median(b.cpu_seconds / r.cpu_seconds for b, r in zip(base, runs))
    return statistics.median(b.seconds / r.seconds for b, r in zip(base, runs))


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


# ------------------------------------------------------------------------------ output


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _x(value: float | None, cpu: float | None = None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}x" + ("" if cpu is None else f" ({cpu:.2f}x)")


def print_table(result: dict[str, Any], console: Console) -> None:
    cfg, costs = result["config"], result["costs"]
    load = result["load_average"]
    title = (f"latency, batch 1, greedy, {cfg['dtype']}, {result['threads']} threads, "
             f"(draft {cfg.get('draft_dtype') or cfg['dtype']}, vocabulary "
             f"{result['draft'].get('draft_vocab_n') or 'full'}), "
             f"{len(result['prompts'])} MT-Bench prompts x {cfg['repeats']}, "
             f"{cfg['new_tokens']} new tokens\n{result['machine']}; load average "
             f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}\ndraft: {result['draft']['source']} "
             f"({result['draft']['layers']}/{result['target_layers']} layers); measured c = "
             f"{costs['cost_ratio']:.3f} (draft {costs['draft_forward_s'] * 1e3:.1f} ms / target "
             f"{costs['target_forward_s'] * 1e3:.1f} ms per forward)")
    table = Table(title=escape(title))
    cols = ["method", "tok/s", "vs ours-target", "vs hf-generate", "vs hf-assist", "accept",
            "MAL", "pred (c meas.)", "pred (c FLOPs)", "pred (+verify)", "same tokens"]
    for c in cols:
        table.add_column(c, justify="right" if c != "method" else "left")
    for r in result["rows"]:
        table.add_row(
            escape(r["method"]), f"{r['tok_s']:.2f}",
            _x(r.get("vs_ours-target"), r.get("cpu_vs_ours-target")),
            _x(r.get("vs_hf-generate"), r.get("cpu_vs_hf-generate")),
            _x(r.get("vs_hf-assist"), r.get("cpu_vs_hf-assist")),
            f"{r['acceptance']:.2f}" if "acceptance" in r else "",
            f"{r['mal']:.2f}" if "mal" in r else "",
            _x(r.get("predicted")), _x(r.get("predicted_flops")), _x(r.get("predicted_verify")),
            f"{r['tokens_match']:.0%}",
        )
    console.print(table)
    vc = ", ".join(f"k={k}: {v:.2f}" for k, v in costs["verify_cost"].items())
    console.print("speedups: median of paired wall-clock ratios (in parentheses: of CPU-time "
                  "ratios); pred: the cost model's speedup over ours-target")
    console.print(f"verification cost v (target forward of k+1 tokens / of 1 token): {vc}")


def summary(result: dict[str, Any], out: Path) -> dict[str, Any]:
    rows = {r["method"]: r for r in result["rows"]}
    spec = [r for r in result["rows"] if r["method"].startswith(("ours k=", "ours-concurrent k="))
            and not r["method"].endswith(ABLATIONS)]
    best = max(spec, key=lambda r: r["tok_s"]) if spec else None
    # the baseline: our fastest target-only decode (1 thread, or 2 with --concurrent)
    base = max((b for b in ("ours-target", "ours-target 2 threads") if b in rows),
               key=lambda b: rows[b]["tok_s"])
    s: dict[str, Any] = {
        "bench": "latency", "dtype": result["config"]["dtype"],
        "draft_dtype": result["config"].get("draft_dtype") or result["config"]["dtype"],
        "draft_vocab_n": result["draft"].get("draft_vocab_n"), "threads": result["threads"],
        "load_average": round(result["load_average"]["start"][0], 2),
        "ours_target_tok_s": round(rows["ours-target"]["tok_s"], 3),
        "baseline": base, "baseline_tok_s": round(rows[base]["tok_s"], 3),
        "cost_ratio": round(result["costs"]["cost_ratio"], 3),
    }
    if "hf-generate" in rows:
        s["hf_generate_tok_s"] = round(rows["hf-generate"]["tok_s"], 3)
        s["ours_target_vs_hf_generate"] = round(rows["ours-target"]["vs_hf-generate"], 3)
        s["ours_target_vs_hf_generate_cpu"] = round(rows["ours-target"]["cpu_vs_hf-generate"], 3)
    if best is not None:
        s.update(best_method=best["method"], best_k=best["k"], best_tok_s=round(best["tok_s"], 3),
                 best_vs_ours_target=round(best[f"vs_{base}"], 3),
                 best_mal=round(best["mal"], 3))
        if "vs_hf-assist" in best:
            s["ours_vs_hf_assist"] = {str(r["k"]): round(r["vs_hf-assist"], 3) for r in spec}
            s["ours_vs_hf_assist_cpu"] = {str(r["k"]): round(r["cpu_vs_hf-assist"], 3)
                                          for r in spec}
    # lossless: every run of our engine gives our target-alone tokens; Hugging Face's own
    # methods are reported beside it (in bf16 its prefill of the whole prompt rounds apart)
    s["all_tokens_match"] = all(r["tokens_match"] == 1.0 for r in result["rows"]
                                if not r["method"].startswith("hf-"))
    s["hf_tokens_match"] = all(r["tokens_match"] == 1.0 for r in result["rows"]
                               if r["method"].startswith("hf-"))
    s["out"] = str(out)
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(LatencyConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    cfg = LatencyConfig(**vars(parser.parse_args(argv)))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        result = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else ROOT / cfg.out
    write_json_atomic(out, result)
    print_table(result, Console(width=200))
    print(json.dumps(summary(result, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
