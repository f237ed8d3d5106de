"""The decoding methods the benches time (bench/latency.py, bench/frontier.py, bench/peers.py):
each is a `Method`, (prompt token ids, new tokens) -> `Run`, greedy, batch 1, EOS ignored --
our engine with or without a draft, drafting in turn or concurrently, and Hugging Face's
`generate` with or without assisted generation."""

from __future__ import annotations

import atexit
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Run:
    tokens: list[int]
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process (less sensitive to a busy machine's scheduler)
    steps: int = 0
    accepted: int = 0
    drafted: int = 0


Method = Callable[[list[int], int], Run]  # (prompt, new tokens) -> Run


def our_method(target, draft, k: int, lean: bool = True, draft_vocab=None,
               row_exact: bool | None = None, pack: bool | None = None) -> Method:
    from specdec.decode.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, draft, k=max(k, 1), lean=lean, row_exact=row_exact,
                               pack_linears=pack, draft_vocab=draft_vocab if draft is not None else None)
    return engine_method(engine)


def concurrent_method(target, draft_path: str, draft_dtype: str, draft_vocab: str,
                      k: int) -> Method:
    """`ConcurrentEngine` with the draft at `draft_path` in a worker process (1 thread)."""
    from specdec.decode.concurrent import ConcurrentEngine, DraftSpec

    spec = DraftSpec(draft_path, dtype=draft_dtype, vocab=draft_vocab)
    engine = ConcurrentEngine(target, spec, k=k)
    atexit.register(engine.close)
    return engine_method(engine)


def engine_method(engine) -> Method:
    """Greedy decoding of one prompt, EOS ignored, timed, through our `engine`."""
    from specdec.decode.sampling import SamplingParams

    def run(prompt: list[int], new_tokens: int) -> Run:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        c0, t0 = time.process_time(), time.perf_counter()
        (r,) = engine.generate([prompt], params)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Run(r.token_ids, seconds, cpu, r.steps, r.accepted, r.drafted)

    return run


def with_threads(method: Method, threads: int) -> Method:
    def run(prompt: list[int], new_tokens: int) -> Run:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return method(prompt, new_tokens)
        finally:
            torch.set_num_threads(before)

    return run


def hf_method(target, draft, k: int, pad_token_id: int) -> Method:
    device = next(target.parameters()).device

    def run(prompt: list[int], new_tokens: int) -> Run:
        gen = copy.deepcopy(target.generation_config)
        gen.update(max_new_tokens=new_tokens, min_new_tokens=None, max_length=None,
                   do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None,
                   pad_token_id=pad_token_id)
        kwargs: dict[str, Any] = {"generation_config": gen}
        if draft is not None:
            kwargs["assistant_model"] = draft
        if draft is not None:  # assisted generation reads these from the assistant's config
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0
        ids = torch.tensor([prompt], device=device)
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Run(out[0, len(prompt):].tolist(), seconds, cpu)

    return run


def sync(device) -> None:
    """Wait for the device (a no-op on the CPU), so that a wall-clock time covers the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
