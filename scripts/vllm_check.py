"""`make vllm-check`: a specdec draft inside vLLM, checked against specdec's own prediction.

    bash scripts/install_vllm.sh && .venv-vllm/bin/python scripts/vllm_check.py
    .venv-vllm/bin/python scripts/vllm_check.py --draft runs/x/pruned --k 4 -n 8 --max-tokens 64

With the SmolLM2 target and a specdec draft (a pruned draft under runs/, the most layers kept,
else one made here by dropping the target's last 6 layers with specdec.prune.remove_layers),
greedy on the first turns of MT-Bench questions:
(a) vLLM with the draft (speculative_config draft_model) gives output token-identical to vLLM
    without it;
(b) vLLM's measured acceptance (per request, per verification step, and its global counters)
    equals the prediction from teacher-forced agreement (specdec.acceptance): the draft and the
    target (Hugging Face, fp32) run over prompt + vLLM's output, continued k tokens past its end
    (vLLM, the target alone, EOS ignored: `generate --continue-tokens k`), and vLLM's greedy
    schedule is replayed over the agreement flags (specdec.vllm.simulate_vllm_steps: the first
    token from prefill, then k drafts per step, acceptance counted past max_tokens and EOS as
    vLLM counts it).
Also shown: specdec.acceptance's own MAL for that k (every output position drafted, the text's
end caps the last step), which differs from vLLM's by those two schedule details only.
Prints a side-by-side table, PASS or FAIL, writes <out>/report.json; exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specdec import acceptance
from specdec.models import (MANIFEST, load_model, read_manifest, resolve_model, save_checkpoint,
                            write_json_atomic)
from specdec.vllm import check_draft, check_table, simulate_vllm_steps, spec_totals

TARGET = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def find_pruned_draft(runs: Path, target: str) -> Path | None:
    """A pruned draft of `target` under `runs`: the most layers kept (the paper's drop-6 over
    deeper cuts), acceptance-selected first, then the newest."""
    found = []
    for manifest in runs.glob(f"**/{MANIFEST}"):
        if any(part.startswith(".") for part in manifest.relative_to(runs).parts):
            continue  # a checkpoint being written
        data = read_manifest(manifest.parent)
        if data.get("stage") == "prune" and data.get("target") == target \
                and any(manifest.parent.glob("*.safetensors")):
            found.append((data.get("num_layers") or 0, data.get("select") == "acceptance",
                          manifest.stat().st_mtime, manifest.parent))
    return max(found)[-1] if found else None


def make_drop_last_draft(target: str, drop: int, out: Path, console: Console) -> Path:
    """A draft cut from the target by removing its last `drop` layers (cached in `out`)."""
    if (out / MANIFEST).is_file():
        return out
    model, tokenizer = load_model(target)
    n = model.config.num_hidden_layers
    removed = list(range(n - drop, n))
    try:
        from specdec.prune import remove_layers
    except ImportError:  # the pruning stage is not in this checkout: the same in plain torch
        remove_layers = _remove_layers
    remove_layers(model, removed)
    console.print(f"made a draft: {target} without layers {removed[0]}..{removed[-1]} -> {out}")
    return save_checkpoint(model, tokenizer, out, {
        "stage": "prune", "target": target, "parent": str(resolve_model(target)),
        "removed_layers": removed, "select": "last-block (vllm_check)"})


def _remove_layers(model, removed: list[int]):
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in set(removed)]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    return model


def run_vllm(args, out: Path, name: str, draft: Path | None, console: Console) -> dict:
    """`python -m specdec.vllm generate` in a subprocess (a fresh engine), its log to a file."""
    command = [sys.executable, "-m", "specdec.vllm", "generate", "--target", args.target,
               "--prompts", args.prompts, "-n", str(args.n), "--max-tokens", str(args.max_tokens),
               "--kv-cache-gib", str(args.kv_cache_gib), "--json", str(out / f"{name}.json")]
    if draft is not None:
        command += ["--draft", str(draft), "--k", str(args.k)]
    else:  # the target's own greedy text k tokens past each output's end, for the replay
        command += ["--continue-tokens", str(args.k)]
    log = out / f"{name}.log"
    start = time.perf_counter()
    with console.status(f"vLLM {name}: {' '.join(command[1:])} (log: {log})"), \
            open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"vLLM {name} run failed (exit {proc.returncode}); last lines of {log}:"
                         f"\n{tail}")
    console.print(f"vLLM {name}: {time.perf_counter() - start:.0f} s")
    return json.loads((out / f"{name}.json").read_text())


def _top2_margin(head, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    margins = []
    for s in range(0, hidden.shape[0], chunk):
        logits = acceptance._head_logits(head, hidden[s:s + chunk])  # [c, vocab]
        top = logits.topk(2, dim=-1).values
        margins.append((top[:, 0] - top[:, 1]).cpu())
    return torch.cat(margins)


@torch.no_grad()
def teacher_forced(target, draft, prompts: list[list[int]], texts: list[list[int]],
                   console: Console) -> list[dict]:
    """Per request: agreement flags over the text (output + continuation), and diagnostics."""
    sequences = [p + t for p, t in zip(prompts, texts)]
    data = acceptance.make_batches(sequences, [len(p) for p in prompts], batch_size=8, pad_id=0)
    with console.status("teacher-forced: target and draft forwards"):
        th = acceptance.scored_hidden(acceptance.model_hidden_fn(target), data)
        dh = acceptance.scored_hidden(acceptance.model_hidden_fn(draft), data)
        stats = acceptance.position_stats(th, target.get_output_embeddings(), dh,
                                          draft.get_output_embeddings(), temperature=0.0)
        t_margin = _top2_margin(target.get_output_embeddings(), th)
        d_margin = _top2_margin(draft.get_output_embeddings(), dh)
    next_tokens = torch.cat([b.next_tokens for b in data.batches])
    rows = [i for b in data.batches for i in b.order]
    per_seq: dict[int, dict] = {}
    offset = 0
    for i in rows:
        n = data.lengths[i]
        sl = slice(offset, offset + n)
        per_seq[i] = {"agree": stats.agree[sl].tolist(),
                      "target_matches": (stats.target_top1[sl] == next_tokens[sl]).tolist(),
                      "target_margin": t_margin[sl].tolist(), "draft_margin": d_margin[sl].tolist()}
        offset += n
    return [per_seq[i] for i in range(len(prompts))]


def explain(tf: dict, measured: list[int], predicted: list[int], k: int) -> str:
    """Why the first differing step differs: the position and the logits' top-2 margins."""
    pos = 1
    for a, b in zip(measured, predicted):
        if a != b:
            break
        pos += a + 1
    window = range(pos, min(pos + k + 1, len(tf["agree"])))
    target_off = [m for m in window if not tf["target_matches"][m]]
    if target_off:
        m = target_off[0]
        return (f"output position {m}: HF's target argmax differs from vLLM's token (target "
                f"top-2 margin {tf['target_margin'][m]:.2e}): a near-tie that fp32 kernels "
                f"break differently")
    m = min(window, key=lambda j: tf["draft_margin"][j])
    return (f"step starting at output position {pos}: smallest draft top-2 margin "
            f"{tf['draft_margin'][m]:.2e} at position {m}: vLLM's draft kernels and HF's "
            f"break a near-tie differently" if tf["draft_margin"][m] < 1e-2 else
            f"step starting at output position {pos}: no near-tie found (smallest draft top-2 "
            f"margin {tf['draft_margin'][m]:.2e}); a real disagreement, look into it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--draft", default=None, help="default: newest pruned draft in runs/, "
                        "else the target minus its last 6 layers")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("-n", type=int, default=8, help="MT-Bench first turns")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "vllm-check"))
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    phases: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    draft = Path(args.draft) if args.draft else find_pruned_draft(ROOT / "runs", args.target)
    if draft is None:
        draft = make_drop_last_draft(args.target, 6, out / "draft-drop6", console)
    check = check_draft(draft, args.target, args.k)
    console.print(check_table(check))
    check.raise_if_failed()
    console.print(f"draft: {draft} ({read_manifest(draft).get('select', '?')}), k={args.k}")

    phases["draft and check"] = time.perf_counter() - start
    mark = time.perf_counter()
    base = run_vllm(args, out, "baseline", None, console)
    phases["vLLM without draft"], mark = time.perf_counter() - mark, time.perf_counter()
    spec = run_vllm(args, out, "speculative", draft, console)
    phases["vLLM with draft"], mark = time.perf_counter() - mark, time.perf_counter()

    target, _ = load_model(args.target)
    draft_model, _ = load_model(draft)
    prompts = [r["prompt_token_ids"] for r in base["outputs"]]
    outputs = [r["token_ids"] for r in base["outputs"]]
    texts = [r["token_ids"] + r["continuation"] for r in base["outputs"]]
    tf = teacher_forced(target, draft_model, prompts, texts, console)
    phases["teacher-forced prediction"] = time.perf_counter() - mark

    table = Table(title=f"vLLM {spec['vllm_version']} draft_model vs teacher-forced prediction "
                        f"(k={args.k})")
    for col in ("prompt", "tokens", "identical", "steps vLLM", "steps pred", "accepted vLLM",
                "accepted pred", "per-step match", "MAL vLLM", "MAL specdec.acceptance"):
        table.add_column(col, justify="right")
    identical_all, steps_all, measured_all, predicted_all, notes = True, True, [], [], []
    tf_committed = tf_steps = 0
    for b, s, t in zip(base["outputs"], spec["outputs"], tf):
        n = len(b["token_ids"])
        identical = b["token_ids"] == s["token_ids"]
        measured = (s["spec"] or {}).get("per_step_accepted", [])
        predicted = simulate_vllm_steps(t["agree"], n, args.k)
        match = measured == predicted
        committed, steps = acceptance.greedy_accepted_length(t["agree"][:n], args.k)
        tf_committed, tf_steps = tf_committed + committed, tf_steps + steps
        identical_all &= identical
        steps_all &= match
        measured_all.append(measured)
        predicted_all.append(predicted)
        if not match:
            notes.append(f"prompt {b['id']}: {explain(t, measured, predicted, args.k)}")
        if not identical:
            first = next((i for i, (x, y) in enumerate(zip(b["token_ids"], s["token_ids"]))
                          if x != y), min(n, len(s["token_ids"])))
            notes.append(f"prompt {b['id']}: outputs differ from token {first}")
        table.add_row(b["id"], str(n), "yes" if identical else "[red]NO[/red]",
                      str(len(measured)), str(len(predicted)), str(sum(measured)),
                      str(sum(predicted)), "yes" if match else "[red]no[/red]",
                      f"{1 + sum(measured) / max(len(measured), 1):.2f}",
                      f"{committed / steps:.2f}")
    m_tot, p_tot = spec_totals(measured_all, args.k), spec_totals(predicted_all, args.k)
    counters = spec["spec_decode"] or {}
    table.add_section()
    table.add_row("all", str(sum(len(o) for o in outputs)), "yes" if identical_all else "NO",
                  str(m_tot["num_drafts"]), str(p_tot["num_drafts"]),
                  str(m_tot["num_accepted_tokens"]), str(p_tot["num_accepted_tokens"]),
                  "yes" if steps_all else "no", f"{m_tot['mean_acceptance_length']:.3f}",
                  f"{tf_committed / tf_steps:.3f}")
    console.print(table)

    totals = Table(title="acceptance totals")
    for col in ("", "vLLM counters", "vLLM per request", "predicted"):
        totals.add_column(col, justify="right")
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        totals.add_row(key, str(counters.get(key)), str(m_tot[key]), str(p_tot[key]))
    totals.add_row("acceptance rate", "", f"{m_tot['acceptance_rate']:.4f}",
                   f"{p_tot['acceptance_rate']:.4f}")
    console.print(totals)
    target_match = sum(sum(t["target_matches"][:len(o)]) for t, o in zip(tf, outputs)) / max(
        sum(len(o) for o in outputs), 1)
    counters_ok = all(counters.get(key) == m_tot[key] for key in
                      ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"))
    predicted_ok = m_tot == p_tot
    passed = identical_all and counters_ok and predicted_ok and steps_all
    for note in notes:
        console.print(f"[yellow]note[/yellow] {note}", highlight=False)
    console.print(f"HF target argmax == vLLM's output token at {target_match:.2%} of positions; "
                  f"specdec.acceptance MAL drafts every output position and stops at the text's "
                  f"end, vLLM never drafts the first token and counts acceptance past the end.",
                  highlight=False)
    elapsed = time.perf_counter() - start
    verdict = {
        "pass": passed, "identical_outputs": identical_all,
        "counters_match_per_request": counters_ok,
        "acceptance_matches_prediction": predicted_ok, "per_step_match_all": steps_all,
        "draft": str(draft), "k": args.k, "n": args.n, "max_tokens": args.max_tokens,
        "vllm": m_tot, "vllm_counters": counters, "predicted": p_tot,
        "specdec_acceptance_mal": tf_committed / tf_steps, "target_matches_text": target_match,
        "seconds": round(elapsed, 1), "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "vllm_seconds": {"baseline": base["seconds"], "speculative": spec["seconds"]},
        "notes": notes,
    }
    write_json_atomic(out / "report.json", verdict)
    console.print(f"(a) outputs identical with and without the draft: "
                  f"{'PASS' if identical_all else 'FAIL'}")
    console.print(f"(b) vLLM acceptance == teacher-forced prediction: "
                  f"{'PASS' if predicted_ok else 'FAIL'} (vLLM counters == per-request sums: "
                  f"{'yes' if counters_ok else 'NO'})")
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
                  + f"; vLLM generate {base['seconds']['generate']} s without the draft, "
                  f"{spec['seconds']['generate']} s with it (2 shared CPU cores: not a speed "
                  f"measurement)", highlight=False)
    console.print(f"[{'green' if passed else 'red'}]{'PASS' if passed else 'FAIL'}[/] in "
                  f"{elapsed:.0f} s; report: {out / 'report.json'}")
    print(json.dumps({"vllm_check": "pass" if passed else "fail", "seconds": round(elapsed, 1),
                      "mal_vllm": m_tot["mean_acceptance_length"],
                      "mal_predicted": p_tot["mean_acceptance_length"]}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
