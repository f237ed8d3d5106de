"""Training tokens/s of KD healing recipes, side by side: online KD (the target runs every step)
against a logit cache, with and without freezing below the cut.

    OMP_NUM_THREADS=1 python scripts/kd_throughput.py --draft runs/x/keep12 \
        --cache runs/x/distilled.logits --data runs/x/distilled.jsonl [--bf16]

Builds the cache's examples (the cache must be made for this data and selection), then runs
--rounds rounds; each round does one optimizer step of every recipe on the same global batch,
so machine noise hits all recipes alike. Prints a table of median tokens/s (prompt + response
tokens, as finetune counts them) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch

from specdec import finetune, logit_cache
from specdec.finetune import FinetuneConfig
from specdec.kd import OnlineTeacher
from specdec.models import load_model, read_manifest, resolve_model
from specdec.train_data import Selection, build_examples, epoch_batches, special_ids

RECIPES = {
    "online KD (today)": dict(),
    "cached KD": dict(cache=True),
    "cached KD + freeze below cut": dict(cache=True, freeze_below_cut=True),
    "cached KD + freeze below cut + embeddings": dict(cache=True, freeze_below_cut=True,
                                                      freeze_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", default="sharegpt")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--max-answer-tokens", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    draft_path = resolve_model(args.draft)
    manifest = read_manifest(draft_path)
    base = dict(draft=str(draft_path), out="unused", data=args.data, n=args.n,
                max_answer_tokens=args.max_answer_tokens, max_seq_len=args.max_seq_len,
                method="full", lr=3e-4, batch_size=args.batch_size,
                micro_batch_size=args.micro_batch_size, kd=0.5, bf16=args.bf16, device="cpu")
    model0, tokenizer = load_model(draft_path)
    stop_ids, pad_id = special_ids(model0, tokenizer)
    cfg0 = FinetuneConfig(**base)
    examples = build_examples(Selection.of(cfg0), tokenizer, stop_ids, Counter())
    cache = finetune.open_kd_cache(FinetuneConfig(**base, kd_cache=args.cache), manifest,
                                   tokenizer, stop_ids, pad_id, examples,
                                   logit_cache.data_sha256(args.data))
    target, _ = load_model(manifest["target"])
    target.requires_grad_(False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    lengths = [len(e.input_ids) for e in examples]
    batches = epoch_batches(lengths, args.batch_size, seed=0, epoch=0)

    runs = {}
    for name, opts in RECIPES.items():
        cfg = FinetuneConfig(**base, kd_cache=args.cache if opts.get("cache") else None,
                             freeze_below_cut=opts.get("freeze_below_cut", False),
                             freeze_embeddings=opts.get("freeze_embeddings", False))
        model, _ = load_model(draft_path)
        frozen = finetune.frozen_layers(cfg, draft_path, manifest)
        model, trainable = finetune.trainable_model(cfg, model, frozen)
        teacher = logit_cache.CachedTeacher(cache, "cpu") if cfg.kd_cache else \
            OnlineTeacher(target, None, cfg.kd_temperature, autocast)
        opt = torch.optim.AdamW(trainable.values(), lr=cfg.learning_rate)
        runs[name] = dict(cfg=cfg, model=model, teacher=teacher, opt=opt,
                          params=list(trainable.values()), frozen=frozen,
                          trainable=sum(p.numel() for p in trainable.values()), times=[])

    for r in range(args.rounds + 1):  # round 0 warms up
        batch = sorted(batches[r % len(batches)], key=lambda i: -lengths[i])
        n_tokens = sum(examples[i].n_response for i in batch)
        for name, run in runs.items():
            t0 = time.perf_counter()
            finetune.accumulate_gradients(run["model"], run["teacher"], examples, batch,
                                          n_tokens, run["cfg"], pad_id, torch.device("cpu"))
            torch.nn.utils.clip_grad_norm_(run["params"], 1.0)
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if r:
                run["times"].append(sum(lengths[i] for i in batch) / (time.perf_counter() - t0))
            print(f"round {r} {name}: {sum(lengths[i] for i in batch)} tokens in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)

    base_tps = statistics.median(runs["online KD (today)"]["times"])
    rows = []
    print(f"\n{'recipe':45s} {'tokens/s':>9s} {'x':>6s} {'trainable':>11s} frozen layers")
    for name, run in runs.items():
        tps = statistics.median(run["times"])
        rows.append(dict(recipe=name, tokens_per_s=round(tps, 1), speedup=round(tps / base_tps, 2),
                         trainable_parameters=run["trainable"], frozen_layers=run["frozen"],
                         samples=[round(t, 1) for t in run["times"]]))
        print(f"{name:45s} {tps:9.1f} {tps / base_tps:6.2f} {run['trainable']:11,d} "
              f"{run['frozen']}")
    result = dict(draft=str(draft_path), threads=torch.get_num_threads(), bf16=args.bf16,
                  batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                  rounds=args.rounds, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
