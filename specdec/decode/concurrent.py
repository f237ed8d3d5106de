"""Concurrent drafting: the draft runs in its own process, on the other core, while the target
verifies -- batch 1, lossless, greedy and sampled.

    engine = ConcurrentEngine(target, DraftSpec("runs/x/drop6/sd", dtype="w8"), k=2)
    (result,) = engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=128))
    engine.close()

Why: in `SpeculativeEngine` a step costs k draft forwards *then* one verification, one after
the other, on one core; at batch 1 on a 2-core CPU the second core idles (a second torch thread
buys a decode step almost nothing: it is bound by memory and per-op overhead). Here the draft
never waits for the target: a worker process drafts ahead on the assumption that everything it
drafted is accepted, and streams its tokens to the target's loop, which at every step verifies
whatever drafts it holds (up to k; none: it decodes one token alone) and then tells the worker
what it committed. The worker rolls back only when a token it drafted turns out wrong. (This is
the idea of PEARL, arXiv 2408.11850, parallel drafting and verification, built for a CPU.)

The target's loop (main process), at committed sequence C (its cache holds C but its last
token, the *pending* one, as in `SpeculativeEngine`):

1. Collect the drafts that arrived. A draft for a position already in C is compared with C:
   equal, the worker's stream is still on C; different, the worker is *synced* (told C from
   that position on; an epoch number drops its messages still in flight). Drafts for the
   positions after C queue up, in order.
2. Verify the first w = min(queued, k) of them in one target forward over [pending, d_1..d_w]
   with `specdec.kernels` (`verify_greedy` / `verify_sample`, the draft's processed logits as
   its draft_probs); w = 0 is a plain decode step. Commit the accepted drafts plus the
   recovered or bonus token. A rejection syncs the worker at the recovered token; a bonus token
   is compared with the next queued draft, or with the one still being drafted when it arrives.

Lossless for the same reasons as `SpeculativeEngine`: every committed token is either the
target's own greedy choice / sample (w = 0, or the recovered / bonus token) or a draft
accepted by the verification rule with the draft_probs it was sampled from; which drafts get
verified depends only on timing, never on the target's random numbers (counter-based, fresh
per step). Greedy output is the target alone's; sampled output is distributed as the target's
(tests run both with a worker slowed down and at full speed, so both orders of arrival are
exercised).

Costs: one extra process (the draft's weights live there; the target's stay here), a pipe
message per draft token (sampled drafts carry their logits), and the two processes share the
memory bandwidth: on a 2-core AVX2 EPYC a target forward slowed ~1.07x with an int8 drop-6
draft drafting on the other core. It pays only for a draft that is nearly always right: the
target never waits, so tokens per target forward are capped by how far the draft gets ahead,
and every wrong draft costs the worker a re-draft (README, "First speedups"). The draft is given as a path (`DraftSpec`: loaded in the worker with
`specdec.quant.load_draft`, its trimmed vocabulary from its sidecar), not as a model object.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.decode.engine import GenerationResult, StreamCallback, _Request, _resolve_eos
from specdec.decode.kv import BatchKV
from specdec.decode.sampling import (
    STREAM_DRAFT,
    STREAM_TARGET,
    SamplingParams,
    SamplingTensors,
    apply_top_k_top_p,
    resolve_seed,
    sample,
)
from specdec.kernels import verify_greedy, verify_sample

READY_TIMEOUT_S = 600  # the worker's import + model load
WAIT_TIMEOUT_S = 120  # the longest wait for one draft (min_drafts > 0)


@dataclass(frozen=True)
class DraftSpec:
    """A draft for the worker process: a checkpoint dir, its dtype (a
    `specdec.quant.DRAFT_DTYPES` name), its draft vocabulary (`specdec.vocab.resolve_draft_vocab`:
    "auto" = its sidecar if any, "full", or a sidecar path) and the worker's torch threads.
    ``delay_s`` sleeps after each draft forward (tests: a slow draft)."""

    path: str
    dtype: str = "fp32"
    vocab: str = "auto"
    threads: int = 1
    delay_s: float = 0.0


class WorkerError(RuntimeError):
    """The draft worker failed; the message holds its traceback."""


# ---------------------------------------------------------------------------- the worker


class _Drafter:
    """The worker's state: the draft, its cache over `seq[:fed]`, the request's sampling."""

    def __init__(self, spec: DraftSpec, vocab_size: int, conn):
        from specdec.quant import load_draft
        from specdec.vocab import resolve_draft_vocab

        self.spec, self.conn = spec, conn
        self.model, _ = load_draft(spec.path, spec.dtype)
        vocab = resolve_draft_vocab(spec.vocab, spec.path, vocab_size)
        self.vocab_size = vocab_size
        self.head = vocab.sub_head(self.model) if vocab is not None else None
        self.ids = vocab.ids if vocab is not None else None
        self.info = {"layers": self.model.config.num_hidden_layers,
                     "draft_vocab_n": vocab.n if vocab is not None else None}
        self.active = False

    def serve(self) -> None:
        import time

        while True:
            if self.active and len(self.seq) < self.acked + self.lookahead:
                while self.conn.poll():
                    if not self.handle(self.conn.recv()):
                        return
                if self.active and len(self.seq) < self.acked + self.lookahead:
                    self.draft_one()
                    if self.spec.delay_s:
                        time.sleep(self.spec.delay_s)
            elif not self.handle(self.conn.recv()):
                return

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind == "begin":
            _, self.epoch, prompt, params, seed, lookahead = msg
            self.kv = BatchKV(self.model, 1, torch.device("cpu"),
                              len(prompt) + params.max_tokens + 2 * lookahead + 2, head=self.head)
            if len(prompt) > 1:
                self.kv.forward(torch.tensor([prompt[:-1]]), logits_to_keep=1)
            self.seq, self.fed = list(prompt), len(prompt) - 1
            self.acked, self.lookahead = len(prompt), lookahead
            self.st = SamplingTensors.from_params([params], "cpu", seeds=[seed])
            self.counter = 0  # draft tokens sampled in this request (the randomness's counter)
            self.active = True
        elif kind == "sync":
            _, self.epoch, pos, tokens = msg
            if self.fed > pos:
                self.kv.truncate(pos)
                self.fed = pos
            self.seq = self.seq[:pos] + list(tokens)
        elif kind == "ack":
            self.acked = msg[1]
        elif kind == "end":
            self.active = False
        elif kind == "close":
            return False
        return True

    def draft_one(self) -> None:
        inp = torch.tensor([self.seq[self.fed:]])
        with torch.inference_mode():
            logits = self.kv.forward(inp, logits_to_keep=1)[:, -1]  # [1, vocab or n]
        self.fed = len(self.seq)
        st, sent = self.st, None
        if st.all_greedy:
            index = int(logits.argmax(dim=-1))
            token = int(self.ids[index]) if self.ids is not None else index
        else:
            if self.ids is not None:  # draft_probs 0 outside the trimmed vocabulary
                full = torch.full((1, self.vocab_size), float("-inf"), dtype=logits.dtype)
                logits = full.index_copy_(1, self.ids, logits)
            if st.needs_filter:
                logits = apply_top_k_top_p(logits, st.temperature, st.top_k, st.top_p)
            offsets = torch.tensor([self.counter])
            token = int(sample(logits, st.temperature, st.seeds, offsets, stream=STREAM_DRAFT))
            self.counter += 1
            sent = logits[0].float()
        self.conn.send(("tok", self.epoch, len(self.seq), token, sent))
        self.seq.append(token)


def _worker_main(spec: DraftSpec, vocab_size: int, conn) -> None:
    try:
        torch.set_num_threads(spec.threads)
        drafter = _Drafter(spec, vocab_size, conn)
        conn.send(("ready", drafter.info))
        drafter.serve()
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass


# ------------------------------------------------------------------------------ the engine


class ConcurrentEngine:
    """Speculative decoding with the draft drafting concurrently in a worker process (see the
    module docstring). Batch 1: `generate` decodes its prompts one after another.

    target: the target model (CPU; its forward is `SpeculativeEngine`'s, `BatchKV`).
    draft: a `DraftSpec` (or a checkpoint dir, fp32) loaded in the worker.
    k: the most drafts one verification takes. lookahead: how far past the committed tokens
    the worker may draft (default 2 k + 2). min_drafts: wait for this many drafts before a
    verification (0, the default: never wait -- with fewer, the target verifies what it has or
    decodes alone; 1..k: worth it where a draft forward is far cheaper than the target's).
    """

    def __init__(self, target, draft: DraftSpec | str, k: int = 2, lookahead: int | None = None,
                 eos_token_ids=None, tokenizer=None, lean: bool = True, min_drafts: int = 0):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
            raise ValueError(f"k must be an int in 1..64 (drafts per verification), got {k!r}")
        if not 0 <= min_drafts <= k:
            raise ValueError(f"min_drafts must be in 0..k ({k}), got {min_drafts}")
        if isinstance(draft, str):
            draft = DraftSpec(draft)
        if not isinstance(draft, DraftSpec):
            raise ValueError("draft must be a DraftSpec or a checkpoint dir (the worker loads it)")
        if next(target.parameters()).device.type != "cpu":
            raise ValueError("ConcurrentEngine runs on the CPU (the draft takes the other cores); "
                             "on a GPU use SpeculativeEngine")
        self.target, self.spec, self.k = target, draft, k
        self.lookahead = lookahead if lookahead is not None else 2 * k + 2
        if self.lookahead < max(k, 1):
            raise ValueError(f"lookahead must be >= k ({k}), got {self.lookahead}")
        self.min_drafts = min_drafts
        self.tokenizer, self.lean = tokenizer, lean
        self.eos_token_ids = _resolve_eos(target, eos_token_ids)
        self.vocab_size = int(target.get_output_embeddings().weight.shape[0])
        self.max_positions = getattr(target.config, "max_position_embeddings", None) or 2**62
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(draft, self.vocab_size, child),
                                 daemon=True, name="specdec-draft")
        self._proc.start()
        child.close()
        self._epoch = 0
        self.draft_info = self._expect("ready", READY_TIMEOUT_S)

    # ------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the worker (also at garbage collection / exit: it is a daemon process)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

    def __enter__(self) -> ConcurrentEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recv(self, timeout: float | None):
        try:
            if not self._conn.poll(timeout):
                if not self._proc.is_alive():
                    raise WorkerError(self._died())
                return None
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self._died()) from None
        if msg[0] == "error":
            raise WorkerError(f"the draft worker failed:\n{msg[1]}")
        return msg

    def _died(self) -> str:
        self._proc.join(timeout=5)
        return (f"the draft worker exited (code {self._proc.exitcode}); if it died while "
                "starting, the script that builds the ConcurrentEngine may lack an `if __name__ "
                "== '__main__':` guard (the worker is a spawned process that imports it)")

    def _expect(self, kind: str, timeout: float):
        msg = self._recv(timeout)
        if msg is None or msg[0] != kind:
            raise WorkerError(f"the draft worker did not answer {kind!r} in {timeout} s")
        return msg[1]

    # ---------------------------------------------------------------------------- decode

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 stream: StreamCallback | None = None) -> list[GenerationResult]:
        """One result per prompt (token ids), decoded one after another; ``stream(index,
        new_tokens)`` as in `SpeculativeEngine.generate` (True aborts that request)."""
        prompts = [list(p) for p in prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size
                                     for t in prompt):
                raise ValueError(f"prompts[{i}] must be a non-empty list of token ids in "
                                 f"[0, {self.vocab_size})")
            if p.stop and self.tokenizer is None:
                raise ValueError(f"params[{i}] has stop strings but the engine has no tokenizer")
            if len(prompt) + p.max_tokens > self.max_positions:
                raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_tokens {p.max_tokens} "
                                 f"exceed the model's {self.max_positions} positions")
        with torch.inference_mode():
            return [self._one(i, prompt, p, stream)
                    for i, (prompt, p) in enumerate(zip(prompts, params))]

    def _one(self, index: int, prompt: list[int], params: SamplingParams,
             stream: StreamCallback | None) -> GenerationResult:
        req = _Request(index, prompt, params, self.eos_token_ids, self.tokenizer, self.k)
        seed = resolve_seed(params)
        st = SamplingTensors.from_params([params], "cpu", seeds=[seed])
        conn = self._conn
        # epochs count across requests, so that drafts of an earlier request still in the pipe
        # are dropped like those drafted before a sync
        self._epoch += 1
        conn.send(("begin", self._epoch, prompt, params, seed, self.lookahead))
        tkv = BatchKV(self.target, 1, torch.device("cpu"),
                      len(prompt) + params.max_tokens + self.k + 2, lean=self.lean)
        if len(prompt) > 1:
            tkv.forward(torch.tensor([prompt[:-1]]), logits_to_keep=1)
        committed = list(prompt)  # C; the target's cache holds C[:-1]
        queue: list[tuple[int, torch.Tensor | None]] = []  # drafts for positions len(C), ...
        step = 0

        def sync(pos: int) -> None:  # the worker's stream is wrong from `pos` on
            self._epoch += 1
            queue.clear()
            conn.send(("sync", self._epoch, pos, committed[pos:]))

        def take(msg) -> None:
            _, e, pos, token, logits = msg
            if e != self._epoch:
                return  # drafted before the last sync
            if pos < len(committed):
                if committed[pos] != token:
                    sync(pos)
            elif pos == len(committed) + len(queue):
                queue.append((token, logits))

        try:
            while not req.finished:
                while (msg := self._recv(0)) is not None:
                    take(msg)
                while len(queue) < min(self.min_drafts, self.k):  # the worker always gets there
                    msg = self._recv(WAIT_TIMEOUT_S)
                    if msg is None:
                        raise WorkerError(f"no draft arrived in {WAIT_TIMEOUT_S} s")
                    take(msg)
                w = min(len(queue), self.k)
                drafts = [t for t, _ in queue[:w]]
                inp = torch.tensor([[committed[-1]] + drafts])
                logits = tkv.forward(inp)  # [1, w + 1, vocab]
                offsets = torch.tensor([step])
                if w == 0:
                    out = logits[:, 0]
                    if st.needs_filter:
                        out = apply_top_k_top_p(out, st.temperature, st.top_k, st.top_p)
                    temperature = 0.0 if st.all_greedy else st.temperature
                    tokens = [int(sample(out, temperature, st.seeds, offsets,
                                         stream=STREAM_TARGET))]
                    accepted = 0
                else:
                    draft_tokens = torch.tensor([drafts])
                    if st.all_greedy:
                        res = verify_greedy(logits, draft_tokens)
                    else:
                        if st.needs_filter:
                            logits = apply_top_k_top_p(logits, st.temperature, st.top_k,
                                                       st.top_p)
                        draft_logits = torch.stack([lg for _, lg in queue[:w]])[None]
                        res = verify_sample(logits, draft_logits, draft_tokens, st.temperature,
                                            st.seeds, offsets)
                    host = torch.cat([res.tokens, res.num_accepted[:, None]], dim=1)[0].tolist()
                    accepted = host[-1]
                    tokens = host[:accepted + 1]
                    tkv.reject(w, res.num_accepted, [accepted])
                step += 1
                committed.extend(tokens)
                del queue[:accepted]
                if accepted < w:  # rejected at the recovered token
                    sync(len(committed) - 1)
                elif queue:  # the next queued draft guessed the bonus token's position
                    if queue[0][0] == tokens[-1]:
                        queue.pop(0)
                    else:
                        sync(len(committed) - 1)
                conn.send(("ack", len(committed)))
                req.count(w, accepted)
                emitted = req.commit(tokens)
                if stream is not None and emitted and stream(index, emitted) is True:
                    req.abort()
        finally:
            try:
                conn.send(("end",))
            except (BrokenPipeError, OSError):
                pass
        result = req.result
        result.text = req.final_text()
        return result
