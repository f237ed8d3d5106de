"""The speculative decoding engine: lossless, batched, over Hugging Face Llama-style models.

    engine = SpeculativeEngine(target, draft, k=4, tokenizer=tok)
    results = engine.generate([prompt_ids, ...], SamplingParams(temperature=0, max_tokens=64))

One step, for every row of the batch at once (k is one number per step for the whole batch):

1. Draft k tokens autoregressively with the draft model and its own KV cache (k forwards of
   1 token each; the first forward also feeds the draft the tokens it has not seen yet).
2. Run the target once over k + 1 positions: its one pending token, then the k drafts.
3. Verify with `specdec.kernels` (`verify_greedy` / `verify_sample`): each row commits its
   *accepted* draft tokens plus one *recovered* token (at the first rejection) or one *bonus*
   token (all k accepted). Greedy output is therefore the target's own greedy output, and
   sampled output is distributed exactly as the target's samples, whatever the draft.
4. Roll both caches back to the committed tokens (see below), stream the new tokens, check
   EOS / stop ids / stop strings / max_tokens, drop finished rows, maybe adapt k.

With ``draft=None`` the same loop runs target-only decoding (k = 0, one token per forward):
the baseline a benchmark compares against. Its sampled tokens equal `reference.target_generate`.

KV caches and rollback (`kv.BatchKV`): target and draft each keep a DynamicCache of shared
width whose layers are `kv.SlabLayer`s (preallocated buffers written in place: no per-forward
concatenation of the whole cache), with a per-slot validity mask and explicit per-row position
ids (a row's position is the number of valid slots before it). Rejected slots are flipped to
invalid -- never recomputed -- and the columns rejected in every row are cropped (a length
change, nothing copied). While every slot of every row is valid ("dense": batch 1 always) no
validity mask or position tensor is kept at all: positions follow from the width, no mask is
built and rollback is just the crop. Rows that accepted fewer tokens than the best row keep
holes, masked out of attention; when holes (plus the left padding of shorter prompts and the
slots of finished rows) waste more than ``compact_threshold`` columns, the cache is compacted
by one gather per layer.
Bookkeeping of what each cache has seen:

* target: holds everything committed except the last committed token, its *pending* token
  (always exactly one), which starts the next verification input ``[pending, d_1..d_k]``.
* draft: its forwards see ``pending..., d_1 .. d_{k-1}`` (d_k is never fed), so after a step
  the draft still lacks the recovered token -- or ``d_k`` and the bonus token when all k were
  accepted. Those 1 or 2 pending tokens open the next draft forward, right-aligned in a
  width-2 input with an invalid slot on the left where a row has only one.

Forward: Llama models with sdpa attention go through `forward.LeanLlamaForward` -- the
model's own modules and kernels, bitwise the same logits as ``model(...)``, without Hugging
Face's per-call overhead (mask creation, decorators, keyword plumbing; ~5-10% of a SmolLM2
forward on a CPU, paid k + 1 times per step); ``lean=False`` or any other model calls
``model(...)``.

Cancellation: the stream callback returning True, or `SpeculativeEngine.cancel(index)` (from
any thread), ends one request with finish_reason "abort" at the end of the current step; its
row leaves the batch like a finished one and the other rows are unaffected.

Host syncs: exactly one per step, the ``.tolist()`` of the verification output (tokens and
accepted counts, fetched together). The draft loop, verification, rollback and row removal
never read the device: everything the host must know (how many slots each row keeps, whether
a mask is needed, how far to crop, when to compact) follows from those accepted counts.
`BatchKV` hands the model a ready 4D mask (or none), which also keeps Hugging Face's mask
code from inspecting a 2D mask on the host at every forward. Finished rows cost one small
host-to-device index copy when they leave.
Buffers: draft tokens and draft logits live in flat scratch buffers reused across steps and
calls (viewed contiguous at the step's shape), so run one `generate` at a time per engine. All
other decoding state is local to the call: an exception raised by the stream callback ends
the call and leaves the engine ready for the next one.

Floating point: verifying k + 1 positions in one forward rounds differently from decoding one
token at a time, so greedy identity holds up to near-ties of the target's top-2 logits (never
seen in fp32 tests; in bf16 a few ulps of a logit can flip an argmax, as in any speculative
decoder). Sampling stays exactly lossless with respect to the logits the target computes.

Randomness is counter-based (seed, step counter): a row's output for a fixed seed does not
depend on the batch around it except through the batch-wide k when ``adaptive_k`` is on (or
the last-ulp differences batching makes in the logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.decode.detok import IncrementalDetokenizer
from specdec.decode.forward import row_exact_default, shared_layers
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

# stream(request_index, new_token_ids) -> True to abort that request (None / False: go on)
StreamCallback = Callable[[int, list[int]], "bool | None"]


@dataclass
class GenerationResult:
    """One request's output and its speculative counters.

    Counters count every step's verification before any truncation by max_tokens or a stop:
    ``accepted + recovered + bonus == committed`` tokens, ``len(token_ids) <= committed``.
    ``accepted_per_position[j]`` counts the steps whose draft token j was accepted (length k_max).
    """

    token_ids: list[int]
    # "stop" (EOS, stop token id or stop string), "length" (max_tokens) or "abort" (cancelled
    # by the stream callback or `SpeculativeEngine.cancel`; token_ids holds what was streamed)
    finish_reason: str
    text: str | None = None  # with a tokenizer: the detokenized output, cut before a stop string
    prompt_tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    recovered: int = 0
    bonus: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def committed(self) -> int:
        return self.accepted + self.recovered + self.bonus

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target forward (tau = accepted + 1 per step)."""
        return self.committed / self.steps if self.steps else 0.0


class _Request:
    """Host-side state of one request."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, eos: set[int],
                 tokenizer, k_max: int):
        self.index = index
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        self.detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer is not None else None
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.result = GenerationResult(
            token_ids=[], finish_reason="length", prompt_tokens=len(prompt),
            accepted_per_position=[0] * k_max,
        )
        self.finished = False
        self.stopped_by_string = False

    def count(self, k: int, accepted: int) -> None:
        r = self.result
        r.steps += 1
        r.drafted += k
        r.accepted += accepted
        if accepted < k:
            r.recovered += 1
        else:
            r.bonus += 1
        for j in range(accepted):
            r.accepted_per_position[j] += 1

    def commit(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens until a stop or max_tokens; returns the ones emitted."""
        r = self.result
        emitted: list[int] = []
        for token in tokens:
            r.token_ids.append(token)
            emitted.append(token)
            if self.detok is not None:
                before = len(self.detok.text)
                self.detok.add(token)
                if self.max_stop and self._cut_at_stop_string(before):
                    return self._finish("stop", emitted)
            if token in self.stop_ids:
                return self._finish("stop", emitted)
            if len(r.token_ids) >= self.params.max_tokens:
                return self._finish("length", emitted)
        return emitted

    def _cut_at_stop_string(self, before: int) -> bool:
        text = self.detok.text
        start = max(before - self.max_stop + 1, 0)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.detok.text = text[: min(hits)]
        self.stopped_by_string = True
        return True

    def abort(self) -> None:
        self.finished = True
        self.result.finish_reason = "abort"

    def _finish(self, reason: str, emitted: list[int]) -> list[int]:
        self.finished = True
        self.result.finish_reason = reason
        return emitted

    def final_text(self) -> str | None:
        if self.detok is None:
            return None
        if not self.stopped_by_string:  # an incomplete character held back at the very end
            self.detok.flush()
        return self.detok.text


class SpeculativeEngine:
    """Lossless speculative decoding of a target model with a draft model (or target alone).

    target, draft: Hugging Face causal LMs of the Llama family (``LlamaForCausalLM`` or any
        model whose forward takes input_ids, attention_mask, position_ids, past_key_values,
        use_cache and logits_to_keep), on one device, sharing one vocabulary. The draft may be
        the target object itself. ``draft=None``: target-only decoding through the same loop.
    k: draft tokens per step; with ``adaptive_k`` the most (k_max), starting there.
    adaptive_k: after each step, k grows by one when every row accepted all k drafts and
        shrinks by one when the rows accepted fewer than half of them; always in 1..k_max.
    eos_token_ids: ids that end a request (unless ignore_eos); None takes them from the
        target's generation_config / config.
    tokenizer: needed for stop strings and for ``GenerationResult.text``.
    compact_threshold: compact a cache once its rows waste more than this many columns.
    lean: run Llama models (sdpa attention) through `forward.LeanLlamaForward`, the same
        modules and kernels as ``model(...)`` without Hugging Face's per-call overhead (bitwise
        the same logits); False always calls ``model(...)``. Other models always do.
    draft_vocab: a `specdec.vocab.DraftVocab`: the draft computes logits only over those ids
        (a sub-head of its LM head's rows, built once here) and never drafts another token.
        Lossless all the same: outside the subset draft_probs = 0, and verification (greedy
        argmax, or the residual max(0, target_probs - draft_probs) of a rejection) covers the
        whole vocabulary. The draft may also run in another dtype than the target (e.g. a bf16
        draft beside an fp32 target): only its tokens (and, sampling, its logits, compared in
        fp32) reach the verification.
    row_exact: the target's verification forward computes each position's attention as its
        one-token forward would (`forward.LeanLlamaForward`), so its logits equal the target
        alone's bit for bit, not just to rounding: without it a bf16 verification rounds
        differently from bf16 one-token decoding and flips near-tied greedy choices. Costs k
        extra attention calls per layer and step; lean forward only. None: on for bf16 / fp16
        targets, off for fp32 ones, where it buys nothing (`forward.row_exact_default`).
    pack_linears: faster linears where this machine has them (`packed.py`), for target and
        draft alike: bf16 projections and head on weights prepacked for oneDNN (bitwise the
        same outputs, ~1.4x faster bf16 forwards on a CPU), fp32 ones computed weight-major
        for the 2-16 rows of a verification (v(1) ~1.8 -> ~1.2 on an AVX2 CPU; one-row
        products unchanged). None: wherever supported; False: never (every linear as
        ``model(...)`` computes it).
    share_prefill: the draft's prefill takes the bottom layers it shares with the target
        (`forward.shared_layers`) from the target's prefill instead of computing them again
        (lean forwards only; lossless: only the draft's proposals can change).
    """

    def __init__(
        self,
        target,
        draft=None,
        k: int = 4,
        adaptive_k: bool = False,
        eos_token_ids: Iterable[int] | int | None = None,
        tokenizer=None,
        compact_threshold: int = 32,
        lean: bool = True,
        draft_vocab=None,
        row_exact: bool | None = None,
        pack_linears: bool | None = None,
        share_prefill: bool = True,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
            raise ValueError(f"k must be an int in 1..64 (draft tokens per step), got {k!r}")
        if (isinstance(compact_threshold, bool) or not isinstance(compact_threshold, int)
                or compact_threshold < 0):
            raise ValueError(f"compact_threshold must be an int >= 0, got {compact_threshold!r}")
        self.target = target
        self.draft = draft
        self.k_max = k
        self.adaptive_k = adaptive_k
        self.tokenizer = tokenizer
        self.compact_threshold = compact_threshold
        self.lean = lean
        self.row_exact = row_exact_default(target) if row_exact is None else row_exact
        self.pack_linears = pack_linears
        self.device = next(target.parameters()).device
        self.vocab_size = _vocab_size(target)
        if draft is not None:
            draft_device = next(draft.parameters()).device
            if draft_device != self.device:
                raise ValueError(
                    f"the draft is on {draft_device} but the target on {self.device}; move both "
                    "to one device with .to()"
                )
            if _vocab_size(draft) != self.vocab_size:
                raise ValueError(
                    f"the draft's vocabulary ({_vocab_size(draft)}) differs from the target's "
                    f"({self.vocab_size}); a draft must share the target's tokenizer"
                )
        self.draft_vocab = draft_vocab
        self._draft_head = self._draft_ids = None
        if draft_vocab is not None:
            if draft is None:
                raise ValueError("draft_vocab needs a draft model (it trims the draft's head)")
            if draft_vocab.vocab_size != self.vocab_size:
                raise ValueError(
                    f"the draft vocabulary was made for {draft_vocab.vocab_size} tokens but the "
                    f"target has {self.vocab_size}; rebuild it for this target (python -m "
                    "specdec.vocab build --draft DIR --data DISTILLED.jsonl)"
                )
            self._draft_head = draft_vocab.sub_head(draft)  # [n, d] rows of the draft's head
            self._draft_ids = draft_vocab.ids.to(self.device)  # [n] sub-head row -> token id
        # bottom layers whose prefill the draft takes from the target's (0: none)
        self.shared_layers = (shared_layers(target, draft)
                              if share_prefill and lean and draft is not None else 0)
        self.eos_token_ids = _resolve_eos(target, eos_token_ids)
        self._buffers: dict[str, torch.Tensor] = {}
        self._cancelled: set[int] = set()  # request indices `cancel` asked to abort
        self.max_positions = min(
            getattr(m.config, "max_position_embeddings", None) or 2**62
            for m in (target, draft) if m is not None
        )

    # ------------------------------------------------------------------------------ public

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        stream: StreamCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode every prompt (token ids) to completion; one result per prompt, in order.

        stream(request_index, new_token_ids) is called after each step for every request that
        emitted tokens in it. Per-row cancellation: when it returns True (or `cancel` was
        called for the request), that request ends with finish_reason "abort" and its row
        leaves the batch at once; the other rows' outputs are unchanged. An exception raised
        by the callback ends the whole call.
        """
        prompts = self._check_prompts(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(
                f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one "
                "SamplingParams or one per prompt"
            )
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
            if p.stop and self.tokenizer is None:
                raise ValueError(
                    f"params[{i}] has stop strings but the engine has no tokenizer; pass "
                    "tokenizer= to SpeculativeEngine or use stop_token_ids"
                )
            if len(prompt) + p.max_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens and max_tokens={p.max_tokens}: more than "
                    f"the model's {self.max_positions} positions; lower max_tokens or shorten it"
                )
        if not prompts:
            return []
        self._cancelled = set()
        with torch.inference_mode():
            return self._generate(prompts, params, stream)

    def cancel(self, request_index: int) -> None:
        """Abort request `request_index` of the `generate` call in progress at its next step
        (finish_reason "abort"). Safe to call from another thread; a no-op for a request that
        already finished or an index the call does not have."""
        self._cancelled.add(request_index)

    # ---------------------------------------------------------------------------- the loop

    def _generate(self, prompts, params, stream) -> list[GenerationResult]:
        device, k_max = self.device, self.k_max
        reqs = [
            _Request(i, p, sp, self.eos_token_ids, self.tokenizer, k_max if self.draft else 0)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        batch = len(prompts)
        rows = list(range(batch))  # host: request index of each batch row
        st = SamplingTensors.from_params(params, device, seeds=[resolve_seed(p) for p in params])
        # slots a row can need: prompt, output, one step's drafts; plus holes when batched
        capacity = (max(len(p) for p in prompts) + max(sp.max_tokens for sp in params)
                    + 2 * (k_max + 1) + (self.compact_threshold if batch > 1 else 0))
        tkv = BatchKV(self.target, batch, device, capacity, lean=self.lean,
                      row_exact=self.row_exact, pack=self.pack_linears)
        dkv = (BatchKV(self.draft, batch, device, capacity, lean=self.lean, head=self._draft_head,
                       pack=self.pack_linears)
               if self.draft is not None else None)
        self._prefill(prompts, tkv, dkv)
        last = [p[-1] for p in prompts]
        target_pending = torch.tensor(last, dtype=torch.int64, device=device)  # [batch]
        draft_pending = torch.tensor([[0, t] for t in last], dtype=torch.int64, device=device)
        draft_pending_valid = torch.tensor([[False, True]] * batch, device=device)  # [batch, 2]
        draft_pending_n = [1] * batch  # host: valid pending tokens per row (1 or 2)
        offsets = torch.zeros(batch, dtype=torch.int64, device=device)  # per-row step counter
        k = k_max if self.draft is not None else 0

        while rows:
            if self.draft is None:
                logits = tkv.forward(target_pending[:, None])[:, -1]  # [batch, vocab]
                if st.needs_filter:
                    logits = apply_top_k_top_p(logits, st.temperature, st.top_k, st.top_p)
                temperature = 0.0 if st.all_greedy else st.temperature
                next_tokens = sample(logits, temperature, st.seeds, offsets, stream=STREAM_TARGET)
                out_tokens = next_tokens[:, None]  # [batch, 1]
                num_accepted = torch.zeros_like(next_tokens)
            else:
                draft_tokens, draft_logits = self._draft(
                    dkv, draft_pending, draft_pending_valid, draft_pending_n, st, offsets, k
                )
                verify_input = torch.cat([target_pending[:, None], draft_tokens], dim=1)
                target_logits = tkv.forward(verify_input)  # [batch, k + 1, vocab]
                out_tokens, num_accepted = self._verify(
                    target_logits, draft_tokens, draft_logits, st, offsets
                )
            # the one host sync of the step
            host = torch.cat([out_tokens, num_accepted[:, None]], dim=1).tolist()
            accepted = [h[-1] for h in host]

            # roll the caches back to the committed tokens (device work, no sync)
            target_pending = out_tokens.gather(1, num_accepted[:, None])[:, 0]
            if k > 0:
                tkv.reject(k, num_accepted, accepted)
                dkv.reject(k - 1, num_accepted, [min(a, k - 1) for a in accepted])
                all_accepted = num_accepted == k  # [batch]
                d_last = torch.where(all_accepted, draft_tokens[:, -1], torch.zeros_like(target_pending))
                draft_pending = torch.stack([d_last, target_pending], dim=1)
                draft_pending_valid = torch.stack([all_accepted, torch.ones_like(all_accepted)], dim=1)
                draft_pending_n = [2 if a == k else 1 for a in accepted]
            offsets = offsets + 1

            # host: counters, stops, streaming
            done = []
            for r, req_index in enumerate(rows):
                req = reqs[req_index]
                req.count(k, accepted[r])
                emitted = req.commit(host[r][: accepted[r] + 1])
                abort = stream is not None and emitted and stream(req.index, emitted) is True
                if not req.finished and (abort or req.index in self._cancelled):
                    req.abort()
                if req.finished:
                    done.append(r)
            if self.adaptive_k and k > 0:
                k = self._adapt(k, accepted)

            if done:
                finished = set(done)
                stay = [r for r in range(len(rows)) if r not in finished]
                rows = [rows[r] for r in stay]
                if not rows:
                    break
                idx = torch.tensor(stay, dtype=torch.int64, device=device)
                tkv.select(idx, stay)
                target_pending = target_pending[idx]
                offsets = offsets[idx]
                st = st.select(idx, stay)
                if dkv is not None:
                    dkv.select(idx, stay)
                    draft_pending = draft_pending[idx]
                    draft_pending_valid = draft_pending_valid[idx]
                    draft_pending_n = [draft_pending_n[r] for r in stay]
            for kv in (tkv, dkv):
                if kv is not None and kv.waste() > self.compact_threshold:
                    kv.compact()

        for req in reqs:
            req.result.text = req.final_text()
        return [req.result for req in reqs]

    def _prefill(self, prompts, tkv: BatchKV, dkv: BatchKV | None) -> None:
        """Both caches get every prompt token but the last, left-padded to a common width."""
        width = max(len(p) for p in prompts) - 1
        if width == 0:
            return
        n_valid = [len(p) - 1 for p in prompts]
        ids = [[0] * (width - n) + list(p[:-1]) for p, n in zip(prompts, n_valid)]
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        input_valid = None
        if min(n_valid) < width:
            valid = [[False] * (width - n) + [True] * n for n in n_valid]
            input_valid = torch.tensor(valid, dtype=torch.bool, device=self.device)
        shared = self.shared_layers if dkv is not None and tkv.lean and dkv.lean else 0
        if shared:  # the draft's bottom layers are the target's: take them from its prefill
            _, hidden = tkv.forward(input_ids, input_valid, n_valid, logits_to_keep=1,
                                    capture=shared)
            dkv.prefill_from(tkv, shared, hidden, input_ids, input_valid, n_valid, logits_to_keep=1)
            return
        for kv in (tkv, dkv):
            if kv is not None:
                kv.forward(input_ids, input_valid, n_valid, logits_to_keep=1)

    def _draft(self, dkv: BatchKV, pending, pending_valid, pending_n, st: SamplingTensors,
               offsets, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft tokens per row: draft_tokens [batch, k], draft_logits [batch, k, vocab]
        (processed; None when every row is greedy). No host sync."""
        batch = pending.shape[0]
        if max(pending_n) == 2:
            inp, inp_valid, n_valid = pending, pending_valid, pending_n
        else:
            inp, inp_valid, n_valid = pending[:, 1:], None, None
        sampled = not st.all_greedy
        temperature = st.temperature if sampled else 0.0
        draft_tokens = self._buffer("draft_tokens", (batch, k), torch.int64)
        draft_logits = None
        ids = self._draft_ids
        for j in range(k):
            logits = dkv.forward(inp, inp_valid, n_valid, logits_to_keep=1)[:, -1]  # [batch, vocab or n]
            if ids is not None:  # a trimmed head: logits over the subset only
                if not sampled:
                    token = ids[logits.argmax(dim=-1)]
                    draft_tokens[:, j] = token
                    inp, inp_valid, n_valid = token[:, None], None, None
                    continue
                full = self._buffer("draft_full_logits", (batch, self.vocab_size), logits.dtype)
                logits = full.fill_(float("-inf")).index_copy_(1, ids, logits)  # draft_probs 0 outside
            if sampled and st.needs_filter:
                logits = apply_top_k_top_p(logits, st.temperature, st.top_k, st.top_p)
            if sampled:
                if draft_logits is None:
                    shape = (batch, k, logits.shape[-1])
                    draft_logits = self._buffer("draft_logits", shape, logits.dtype)
                draft_logits[:, j] = logits
            token = sample(logits, temperature, st.seeds, offsets, position=j, stream=STREAM_DRAFT)
            draft_tokens[:, j] = token
            inp, inp_valid, n_valid = token[:, None], None, None  # d_k is never fed
        return draft_tokens, draft_logits

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` carved from a flat buffer kept across steps (and
        generate calls); it grows only when a step needs more elements than ever before."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def _verify(self, target_logits, draft_tokens, draft_logits, st: SamplingTensors, offsets):
        """-> (tokens [batch, k + 1], num_accepted [batch]); greedy rows by argmax."""
        if st.all_greedy:
            out = verify_greedy(target_logits, draft_tokens)
            return out.tokens, out.num_accepted
        greedy_out = verify_greedy(target_logits, draft_tokens) if st.any_greedy else None
        if st.needs_filter:
            target_logits = apply_top_k_top_p(target_logits, st.temperature, st.top_k, st.top_p)
        temperature = st.temperature
        if greedy_out is not None:  # greedy rows get a dummy temperature; their result is replaced
            temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        out = verify_sample(target_logits, draft_logits, draft_tokens, temperature, st.seeds, offsets)
        if greedy_out is None:
            return out.tokens, out.num_accepted
        is_greedy = st.temperature == 0
        tokens = torch.where(is_greedy[:, None], greedy_out.tokens, out.tokens)
        num_accepted = torch.where(is_greedy, greedy_out.num_accepted, out.num_accepted)
        return tokens, num_accepted

    def _adapt(self, k: int, accepted: Sequence[int]) -> int:
        if all(a == k for a in accepted):
            return min(k + 1, self.k_max)
        if 2 * sum(accepted) < k * len(accepted):
            return max(k - 1, 1)
        return k

    def _check_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of token id lists (tokenize text first)")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
            p = list(p)
            if not p:
                raise ValueError(f"prompts[{i}] is empty; give at least one token (e.g. BOS)")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size
                       for t in p):
                raise ValueError(
                    f"prompts[{i}] must hold token ids in [0, {self.vocab_size}); tokenize with the "
                    "target's tokenizer"
                )
            out.append(p)
        return out


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _resolve_eos(target, eos_token_ids) -> set[int]:
    if eos_token_ids is None:
        gen = getattr(target, "generation_config", None)
        eos_token_ids = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_ids is None:
            eos_token_ids = getattr(target.config, "eos_token_id", None)
    if eos_token_ids is None:
        return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    return {int(t) for t in eos_token_ids}
