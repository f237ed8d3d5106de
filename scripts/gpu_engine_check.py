"""The engine on a device with the rehearsal target: greedy speculative == the target alone.

Part of scripts/gpu_check.sh. The target is `llama-3.1-8b-rehearsal` (Llama-3.1's tokenizer,
vocabulary and head layout, random weights); the draft is it with layer 6 removed. fp32 is
the exact check (greedy identical, token for token); bf16 is reported as the share of prompts
whose output matches (rounding may flip a near-tie). Writes one JSON object to --out.

    python scripts/gpu_engine_check.py --device cuda --prompts 8 --max-tokens 64 --out e.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from specdec.data import chat_ids
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.sampling import SamplingParams
from specdec.models import load_model
from specdec.prune import remove_layers

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 12 + 30?",
             "Say hello in Spanish.", "Give me a fruit.", "Write one word.",
             "Explain speculative decoding.", "Write a haiku about GPUs."]


def check(device: str, prompts_n: int, max_tokens: int, k: int = 4) -> dict:
    target, tok = load_model("llama-3.1-8b-rehearsal", dtype=torch.float32, device=device)
    draft = remove_layers(copy.deepcopy(target), [6])
    prompts = [chat_ids(tok, [{"role": "user", "content": q}])
               for q in (QUESTIONS * 8)[:prompts_n]]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = {"device": device, "torch": torch.__version__, "prompts": len(prompts),
           "max_tokens": max_tokens, "k": k}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    for dtype in (torch.float32, torch.bfloat16):
        t, d = target.to(dtype), draft.to(dtype)
        start = time.perf_counter()
        alone = SpeculativeEngine(t, None, tokenizer=tok).generate(prompts, params)
        mid = time.perf_counter()
        spec = SpeculativeEngine(t, d, k=k, tokenizer=tok).generate(prompts, params)
        end = time.perf_counter()
        same = [a.token_ids == s.token_ids for a, s in zip(alone, spec)]
        out[str(dtype).split(".")[-1]] = {
            "identical": sum(same), "of": len(same),
            "acceptance_rate": sum(s.accepted for s in spec) / max(sum(s.drafted for s in spec), 1),
            "target_alone_s": round(mid - start, 3), "speculative_s": round(end - mid, 3)}
    out["ok"] = out["float32"]["identical"] == len(prompts)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = check(args.device, args.prompts, args.max_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
