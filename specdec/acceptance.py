"""Teacher-forced acceptance metrics of a draft against a target.

One target forward and one draft forward over the same token sequences give, at every scored
position i (the model has seen tokens 0..i and predicts token i+1):
- top-1 agreement: the draft's argmax equals the target's argmax (greedy acceptance);
- alpha = sum_x min(target_probs, draft_probs) at a temperature (expected acceptance when
  sampling; `specdec.kernels.acceptance_stats`), and KL between the two;
- the greedy mean accepted length (MAL, tau) for any draft length k, by simulating greedy
  speculative decoding over the agreement run: at a block start i, count consecutive agreements
  (up to k) from i, commit that many + 1 (the accepted tokens and one recovered or bonus token),
  and jump to the next block start. A step that runs into the end of a sequence commits only
  the positions left.

The simulation is exact when the sequences are the target's own greedy continuations (then an
accepted draft token is the next token of the text, so the draft's next prediction is the one
scored here): `target_matches_text` reports the fraction of positions where the target's
argmax is the text's next token, 1.0 for such text. On other text it is a teacher-forced
estimate.

Only positions from the last prompt token on are scored (`prompt_lens`), so the numbers measure
the response, not the prompt. Sequences are right-padded into batches (sorted by length), logits
are computed from the final hidden states in chunks of positions and compared in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 8)

# forward(input_ids [b, L], attention_mask [b, L], batch_index) -> final hidden states [b, L, d]
HiddenFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, L] right-padded
    attention_mask: torch.Tensor  # [b, L] 1 for real tokens
    score_mask: torch.Tensor  # [b, L] True where the position's prediction is scored
    next_tokens: torch.Tensor  # [n_scored] the text's next token at each scored position
    order: list[int]  # index of each row in the caller's sequence list


@dataclass
class TeacherForcedData:
    """Sequences cut into padded batches; scored positions are listed batch by batch, row by row."""

    batches: list[Batch]
    lengths: list[int]  # scored positions per sequence, caller's order
    num_sequences: int

    @property
    def num_scored(self) -> int:
        return sum(self.lengths)


def make_batches(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None,
                 batch_size: int = 8, pad_id: int = 0) -> TeacherForcedData:
    """Pad sequences into batches; score positions max(p - 1, 0) .. len - 2 of each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not sequences:
        raise ValueError("no sequences to score; pass at least one token sequence")
    prompt_lens = list(prompt_lens) if prompt_lens is not None else [0] * len(sequences)
    if len(prompt_lens) != len(sequences):
        raise ValueError(f"{len(prompt_lens)} prompt_lens for {len(sequences)} sequences; "
                         "give one prompt length per sequence")
    starts = []
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        start = max(p - 1, 0)
        if len(seq) < 2 or start > len(seq) - 2:
            raise ValueError(f"sequence {i} (length {len(seq)}, prompt {p}) has nothing to score: "
                             "it needs at least one token after the prompt")
        starts.append(start)
    by_length = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    lengths = [len(seq) - 1 - s for seq, s in zip(sequences, starts)]
    batches = []
    for b in range(0, len(by_length), batch_size):
        rows = by_length[b:b + batch_size]
        width = len(sequences[rows[0]])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        score = torch.zeros((len(rows), width), dtype=torch.bool)
        nxt = []
        for r, i in enumerate(rows):
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            ids[r, :len(seq)] = seq
            attn[r, :len(seq)] = 1
            score[r, starts[i]:len(seq) - 1] = True
            nxt.append(seq[starts[i] + 1:])
        batches.append(Batch(ids, attn, score, torch.cat(nxt), rows))
    return TeacherForcedData(batches, lengths, len(sequences))


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         eos_token_id: int | Sequence[int] | None, pad_token_id: int | None = None,
                         batch_size: int = 8, progress: Progress | None = None
                         ) -> list[list[int]]:
    """Each prompt followed by the model's greedy continuation, cut after its first EOS.

    Scoring a draft on the target's own greedy text makes the greedy MAL simulation exact.
    """
    from transformers import GenerationConfig

    eos_ids = sorted(set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                         [] if eos_token_id is None else [eos_token_id]))
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                           eos_token_id=eos_ids or None)
    device = next(model.parameters()).device
    task = progress.add_task("greedy continuations", total=len(prompts)) if progress else None
    seqs = []
    for s in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[s:s + batch_size]]
        width = max(map(len, chunk))  # left padding: every prompt ends at the same column
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for p, row in zip(chunk, out[:, width:].tolist()):
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            seqs.append(p + row[:cut])
        if progress is not None:
            progress.advance(task, len(chunk))
    return seqs


def model_hidden_fn(model) -> HiddenFn:
    """The final (normed) hidden states of a HF causal LM, without computing logits."""
    decoder = model.get_decoder()
    device = next(model.parameters()).device

    def forward(input_ids, attention_mask, batch_index):
        out = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      use_cache=False)
        return out.last_hidden_state

    return forward


@torch.no_grad()
def scored_hidden(forward: HiddenFn, data: TeacherForcedData, progress: Progress | None = None,
                  description: str = "forward") -> torch.Tensor:
    """Final hidden states at every scored position, [num_scored, d], in data order."""
    task = progress.add_task(description, total=len(data.batches)) if progress else None
    out = []
    for index, batch in enumerate(data.batches):
        hidden = forward(batch.input_ids, batch.attention_mask, index)  # [b, L, d]
        out.append(hidden[batch.score_mask.to(hidden.device)])
        if progress is not None:
            progress.advance(task)
    return torch.cat(out)


@dataclass
class PositionStats:
    """Per scored position, in data order."""

    agree: torch.Tensor  # [n] bool, draft argmax == target argmax
    alpha: torch.Tensor  # [n] float32, sum_x min(target_probs, draft_probs)
    kl: torch.Tensor  # [n] float32 (NaN at temperature 0)
    target_top1: torch.Tensor  # [n] long, the target's argmax


def _acceptance_stats(target_logits, draft_logits, temperature):
    from specdec.kernels import acceptance_stats

    return acceptance_stats(target_logits, draft_logits, temperature)


@torch.no_grad()
def position_stats(target_hidden: torch.Tensor, target_head: torch.nn.Module,
                   draft_hidden: torch.Tensor, draft_head: torch.nn.Module,
                   temperature: float = 1.0, chunk: int = 256) -> PositionStats:
    """Logits from hidden states chunk by chunk (fp32) and the per-position comparison."""
    # target_hidden, draft_hidden: [n, d_target], [n, d_draft]
    if target_hidden.shape[0] != draft_hidden.shape[0]:
        raise ValueError(f"{target_hidden.shape[0]} target positions vs {draft_hidden.shape[0]} "
                         "draft positions; score both on the same TeacherForcedData")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    agree, alpha, kl, top1 = [], [], [], []
    for s in range(0, target_hidden.shape[0], chunk):
        t_logits = _head_logits(target_head, target_hidden[s:s + chunk])  # [c, vocab]
        d_logits = _head_logits(draft_head, draft_hidden[s:s + chunk])  # [c, vocab]
        if t_logits.shape[-1] != d_logits.shape[-1]:
            raise ValueError(f"target vocabulary {t_logits.shape[-1]} != draft vocabulary "
                             f"{d_logits.shape[-1]}; a draft must share the target's tokenizer")
        t_top, d_top = t_logits.argmax(-1), d_logits.argmax(-1)
        agree.append((t_top == d_top).cpu())
        top1.append(t_top.cpu())
        if temperature == 0:
            alpha.append((t_top == d_top).float().cpu())
            kl.append(torch.full((len(t_top),), float("nan")))
        else:
            a, k = _acceptance_stats(t_logits.contiguous(), d_logits.contiguous(), temperature)
            alpha.append(a.float().cpu())
            kl.append(k.float().cpu())
    return PositionStats(torch.cat(agree), torch.cat(alpha), torch.cat(kl), torch.cat(top1))


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    weight = head.weight
    return head(hidden.to(device=weight.device, dtype=weight.dtype)).float()


def greedy_accepted_length(agree: Sequence[bool] | torch.Tensor, k: int) -> tuple[int, int]:
    """(tokens committed, verification steps) of greedy speculative decoding over one sequence.

    agree[i]: the draft's argmax at position i equals the target's. Each step starts at a
    position i, accepts the run of agreements from i (at most k), and commits it + 1 tokens.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flags = [bool(a) for a in (agree.tolist() if isinstance(agree, torch.Tensor) else agree)]
    i, steps, n = 0, 0, len(flags)
    while i < n:
        run = 0
        while run < k and i + run < n and flags[i + run]:
            run += 1
        i += run + 1
        steps += 1
    return n, steps


@dataclass
class AcceptanceReport:
    sequences: int
    tokens: int  # scored positions
    temperature: float
    top1_agreement: float
    alpha: float  # mean expected acceptance at `temperature`
    kl: float | None
    target_matches_text: float  # 1.0 when the text is the target's greedy output
    mean_accepted_length: dict[int, float]  # k -> greedy MAL (tau), tokens per target forward
    tau_from_alpha: dict[int, float]  # k -> (1 - alpha^(k+1)) / (1 - alpha), i.i.d. model
    per_sequence_agreement: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "sequences": self.sequences, "tokens": self.tokens, "temperature": self.temperature,
            "top1_agreement": self.top1_agreement, "alpha": self.alpha, "kl": self.kl,
            "target_matches_text": self.target_matches_text,
            "mean_accepted_length": {str(k): v for k, v in self.mean_accepted_length.items()},
            "tau_from_alpha": {str(k): v for k, v in self.tau_from_alpha.items()},
        }


def summarize(stats: PositionStats, data: TeacherForcedData, temperature: float,
              ks: Sequence[int] = DEFAULT_KS) -> AcceptanceReport:
    """Aggregate per-position stats into the report (MAL simulated per sequence)."""
    from specdec.flops import expected_tokens_per_step

    next_tokens = torch.cat([b.next_tokens for b in data.batches])
    rows = [i for b in data.batches for i in b.order]
    per_seq: dict[int, torch.Tensor] = {}
    offset = 0
    for i in rows:
        per_seq[i] = stats.agree[offset:offset + data.lengths[i]]
        offset += data.lengths[i]
    assert offset == len(stats.agree), "scored positions and stats disagree"
    mal = {}
    for k in ks:
        committed = steps = 0
        for agree in per_seq.values():
            c, s = greedy_accepted_length(agree, k)
            committed, steps = committed + c, steps + s
        mal[k] = committed / steps
    alpha = float(stats.alpha.mean())
    kl = float(stats.kl.mean()) if temperature > 0 else None
    return AcceptanceReport(
        sequences=data.num_sequences,
        tokens=data.num_scored,
        temperature=temperature,
        top1_agreement=float(stats.agree.float().mean()),
        alpha=alpha,
        kl=kl,
        target_matches_text=float((stats.target_top1 == next_tokens).float().mean()),
        mean_accepted_length=mal,
        tau_from_alpha={k: expected_tokens_per_step(min(max(alpha, 0.0), 1.0), k) for k in ks},
        per_sequence_agreement=[float(per_seq[i].float().mean()) for i in range(len(per_seq))],
    )


def compare(target, draft, sequences: Sequence[Sequence[int]],
            prompt_lens: Sequence[int] | None = None, *, temperature: float = 1.0,
            ks: Sequence[int] = DEFAULT_KS, batch_size: int = 8, pad_id: int = 0,
            chunk: int = 256, progress: bool = True, draft_vocab=None) -> AcceptanceReport:
    """Teacher-forced acceptance of `draft` against `target` (HF causal LMs, same vocabulary).

    draft_vocab: a `specdec.vocab.DraftVocab`; the draft is scored as the engine runs it with
    that trimmed vocabulary (logits over the subset, draft_probs = 0 elsewhere)."""
    data = make_batches(sequences, prompt_lens, batch_size, pad_id)
    with Progress(disable=not progress, transient=True) as bar:
        target_hidden = scored_hidden(model_hidden_fn(target), data, bar, "target forward")
        draft_hidden = scored_hidden(model_hidden_fn(draft), data, bar, "draft forward")
    draft_head = (draft.get_output_embeddings() if draft_vocab is None
                  else draft_vocab.masked_head(draft))
    stats = position_stats(target_hidden, target.get_output_embeddings(), draft_hidden,
                           draft_head, temperature, chunk)
    return summarize(stats, data, temperature, ks)


# --------------------------------------------------------------- drafts that skip target layers


@contextmanager
def layers_subset(model, kept: Sequence[int]):
    """Temporarily run `model` with only the decoder layers `kept` (no KV cache while inside)."""
    decoder = model.get_decoder()
    old_layers, old_n = decoder.layers, model.config.num_hidden_layers
    decoder.layers = torch.nn.ModuleList([old_layers[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    try:
        yield model
    finally:
        decoder.layers = old_layers
        model.config.num_hidden_layers = old_n


@torch.no_grad()
def score_layer_skips(model, data: TeacherForcedData, blocks: Sequence[tuple[int, int]],
                      temperature: float = 1.0, ks: Sequence[int] = DEFAULT_KS,
                      progress: Progress | None = None,
                      on_scored: Callable[[int, AcceptanceReport], None] | None = None
                      ) -> list[AcceptanceReport]:
    """Acceptance of drafts made by removing one block (start, size) of the target's layers.

    Exact and cheap: a draft without layers start..start+size-1 shares everything up to the
    hidden state entering `start` with the target, so one target forward (keeping those hidden
    states) plus, per block, the layers after the block fed that state as inputs_embeds (Llama
    has no absolute positions) give the draft's output. `on_scored(i, report)` is called as
    each block finishes, so callers can save progress.
    """
    n_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    if not blocks:
        return []
    for start, size in blocks:
        if not (0 <= start and 1 <= size and start + size <= n_layers and size < n_layers):
            raise ValueError(f"block start {start}, size {size} does not fit a {n_layers}-layer "
                             "model with at least one layer left")
    starts = sorted({start for start, _ in blocks})
    entering: dict[int, list[torch.Tensor]] = {l: [] for l in starts}  # per batch, [b, L, d]
    target_hidden = []
    task = progress.add_task("target forward", total=len(data.batches)) if progress else None
    for batch in data.batches:
        out = model.get_decoder()(input_ids=batch.input_ids.to(device),
                                  attention_mask=batch.attention_mask.to(device),
                                  output_hidden_states=True, use_cache=False)
        for l in starts:
            entering[l].append(out.hidden_states[l])  # the state entering layer l
        target_hidden.append(out.last_hidden_state[batch.score_mask.to(device)])
        if progress is not None:
            progress.advance(task)
    target_hidden = torch.cat(target_hidden)
    head = model.get_output_embeddings()
    reports = []
    for i, (start, size) in enumerate(blocks):
        def forward(input_ids, attention_mask, index, start=start):
            return model.get_decoder()(inputs_embeds=entering[start][index],
                                       attention_mask=attention_mask.to(device),
                                       use_cache=False).last_hidden_state

        with layers_subset(model, range(start + size, n_layers)):
            draft_hidden = scored_hidden(forward, data, progress,
                                         f"draft without layers {start}..{start + size - 1}")
        stats = position_stats(target_hidden, head, draft_hidden, head, temperature)
        reports.append(summarize(stats, data, temperature, ks))
        if on_scored is not None:
            on_scored(i, reports[-1])
    return reports

