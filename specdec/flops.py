"""Parameter and FLOP accounting for Llama-family configs, and the speculative decoding cost model.

Everything here is computed from a config alone (no weights): it works for the 8B target on a
laptop. A FLOP is one multiply or one add, so a matmul of [m, k] x [k, n] costs 2*m*k*n, the
same convention as `torch.utils.flop_counter.FlopCounterMode`; elementwise work (norms, RoPE,
softmax, SiLU) is not counted (it is < 1% and FlopCounterMode does not count it either).

Per token, per decoder layer (d = hidden, f = intermediate, h / g = query / KV heads, e = head dim):
    attention projections  2*d*(h*e + 2*g*e) + 2*h*e*d      (q, k, v, o; GQA shrinks k and v)
    attention over context 4*h*e*T                         (QK^T and AV against T keys)
    MLP                    2*3*d*f                         (gate, up, down)
plus the LM head 2*d*V per token that needs logits. The embedding lookup is a gather (0 FLOPs);
the "with embeddings" convention counts it as a one-hot matmul, 2*d*V, which is what the
popular "forward FLOPs = 2 * parameters" rule implies.

Which convention gives the paper's figure (Llama-3.1-8B, 32 -> 26 layers, arXiv 2410.09982):
    parameters, all (embeddings + LM head)    8.03B -> 6.72B   -16.3%   <- the paper's 16.3%
    2*N FLOPs/token with embeddings, T -> 0                    -16.3%   (the same ratio)
    FLOPs/token without embeddings, with LM head, T -> 0       -17.4%
    FLOPs/token, decoder layers only                           -18.75%  (= 6/32)
Attention over a context only adds per-layer work, so any context T > 0 moves the ratio up
toward 6/32; `python -m specdec.flops --model llama-3.1-8b-instruct --drop 6` prints them all.

Speculative decoding (Leviathan et al. 2023): a step drafts k tokens with k draft forwards and
verifies them with one target forward over k + 1 positions. With i.i.d. per-token acceptance
alpha, the tokens committed per step (accepted + one recovered or bonus) have expectation
    tau = (1 - alpha^(k+1)) / (1 - alpha)
so FLOPs per committed token = (k * draft + (k + 1) * target) / tau, and with c = the cost of a
draft forward relative to a target forward, the wall-clock speedup is tau / (k*c + 1).

    python -m specdec.flops --model llama-3.1-8b-instruct --drop 6
    python -m specdec.flops --model smollm2-135m-instruct --draft runs/x/pruned --k 4 --alpha 0.7
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class LlamaShape:
    """The numbers of a Llama-family config that parameters and FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "LlamaShape":
        if isinstance(config, LlamaShape):
            return config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    def with_layers(self, layers: int) -> "LlamaShape":
        if not 1 <= layers <= self.layers:
            raise ValueError(f"layers must be in 1..{self.layers}, got {layers}")
        return replace(self, layers=layers)


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    per_layer: int
    layers: int  # all decoder layers together
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        """All but the input embedding (an untied LM head counts; a tied one is the embedding)."""
        return self.total - self.embedding


def param_counts(config: Any) -> ParamCounts:
    s = LlamaShape.from_config(config)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn = s.hidden * (q + 2 * kv) + q * s.hidden
    if s.attention_bias:  # q, k, v and o biases (Llama's attention_bias covers all four)
        attn += q + 2 * kv + s.hidden
    mlp = 3 * s.hidden * s.intermediate
    if s.mlp_bias:
        mlp += 2 * s.intermediate + s.hidden
    per_layer = attn + mlp + 2 * s.hidden  # + input and post-attention RMSNorm weights
    embedding = s.vocab * s.hidden
    return ParamCounts(
        embedding=embedding,
        per_layer=per_layer,
        layers=per_layer * s.layers,
        final_norm=s.hidden,
        lm_head=0 if s.tied else embedding,
    )


def meta_param_count(config: Any) -> int:
    """Parameters of the real HF module built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one forward, split by where they go (see the module docstring)."""

    attn_proj: float
    attn_context: float
    mlp: float
    lm_head: float
    embedding: float  # one-hot matmul convention; a real lookup is 0 FLOPs

    @property
    def layers(self) -> float:
        return self.attn_proj + self.attn_context + self.mlp

    @property
    def total(self) -> float:
        """What FlopCounterMode measures: layers + LM head, no embedding."""
        return self.layers + self.lm_head

    @property
    def total_with_embedding(self) -> float:
        return self.total + self.embedding


def _linear_flops_per_token(s: LlamaShape) -> tuple[float, float]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn_proj = 2.0 * (s.hidden * (q + 2 * kv) + q * s.hidden) * s.layers
    mlp = 2.0 * 3 * s.hidden * s.intermediate * s.layers
    return attn_proj, mlp


def decode_flops(config: Any, context: int) -> FlopCounts:
    """One new token attending over `context` keys (its own included), with KV cache."""
    if context < 1:
        raise ValueError(f"context must be >= 1 (the token attends to itself), got {context}")
    s = LlamaShape.from_config(config)
    attn_proj, mlp = _linear_flops_per_token(s)
    return FlopCounts(
        attn_proj=attn_proj,
        attn_context=4.0 * s.heads * s.head_dim * context * s.layers,
        mlp=mlp,
        lm_head=2.0 * s.hidden * s.vocab,
        embedding=2.0 * s.hidden * s.vocab,
    )


def per_token_flops(config: Any, context: int = 0) -> FlopCounts:
    """Per-token forward FLOPs at an average attention context of `context` (0 allowed)."""
    s = LlamaShape.from_config(config)
    attn_proj, mlp = _linear_flops_per_token(s)
    return FlopCounts(attn_proj, 4.0 * s.heads * s.head_dim * context * s.layers, mlp,
                      2.0 * s.hidden * s.vocab, 2.0 * s.hidden * s.vocab)


def prefill_flops(config: Any, prompt_len: int, *, causal: bool = True,
                  all_logits: bool = True) -> FlopCounts:
    """A prefill of `prompt_len` tokens with an empty cache.

    causal=True counts the lower triangle of the attention matrix, P(P+1)/2 query-key pairs (the
    work a causal kernel does); causal=False counts the full P*P square (what a masked dense
    matmul does, and what FlopCounterMode reports). all_logits=False computes logits only for
    the last position (generation); True for all positions (HF's default forward, training).
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    s = LlamaShape.from_config(config)
    attn_proj, mlp = _linear_flops_per_token(s)
    pairs = prompt_len * (prompt_len + 1) / 2 if causal else float(prompt_len * prompt_len)
    return FlopCounts(
        attn_proj=attn_proj * prompt_len,
        attn_context=4.0 * s.heads * s.head_dim * pairs * s.layers,
        mlp=mlp * prompt_len,
        lm_head=2.0 * s.hidden * s.vocab * (prompt_len if all_logits else 1),
        embedding=2.0 * s.hidden * s.vocab * prompt_len,
    )


def measure_flops(model, input_ids: torch.Tensor, past_key_values=None) -> int:
    """FLOPs of one real forward as counted by FlopCounterMode.

    The model is switched to eager attention for the measurement (FlopCounterMode has no
    formula for the CPU SDPA kernel and would silently count 0 for attention), then restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # input_ids: [batch, seq]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids, past_key_values=past_key_values, use_cache=past_key_values is not None)
    finally:
        model.set_attn_implementation(previous)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Convention:
    name: str
    before: float
    after: float

    @property
    def reduction(self) -> float:
        return 1.0 - self.after / self.before


def pruning_reduction(config: Any, drop: int, context: int = 2048) -> list[Convention]:
    """What removing `drop` decoder layers saves, under every common convention."""
    s = LlamaShape.from_config(config)
    if not 1 <= drop < s.layers:
        raise ValueError(f"drop must be in 1..{s.layers - 1} for a {s.layers}-layer model, "
                         f"got {drop}")
    pruned = s.with_layers(s.layers - drop)
    p0, p1 = param_counts(s), param_counts(pruned)
    rows = [
        Convention("params, all", p0.total, p1.total),
        Convention("params, non-embedding", p0.non_embedding, p1.non_embedding),
    ]
    for t in (0, context):
        f0, f1 = per_token_flops(s, t), per_token_flops(pruned, t)
        rows += [
            Convention(f"FLOPs/tok T={t}, with emb (2N rule)",
                       f0.total_with_embedding, f1.total_with_embedding),
            Convention(f"FLOPs/tok T={t}, LM head, no emb", f0.total, f1.total),
            Convention(f"FLOPs/tok T={t}, layers only", f0.layers, f1.layers),
        ]
    return rows


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """E[tokens committed per verification step] = (1 - alpha^(k+1)) / (1 - alpha)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if k < 1:
        raise ValueError(f"k (draft length) must be >= 1, got {k}")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class SpecCost:
    k: int
    alpha: float
    context: int
    target_flops: float  # per token, target alone
    draft_flops: float  # per token, one draft forward
    tokens_per_step: float  # tau
    flops_per_token: float  # per committed token, speculative
    cost_ratio: float  # c: draft forward time / target forward time
    speedup: float  # tau / (k c + 1)

    @property
    def flops_overhead(self) -> float:
        """Speculative FLOPs per committed token / the target's alone (> 1: more compute)."""
        return self.flops_per_token / self.target_flops


def spec_cost(target_config: Any, draft_config: Any, k: int, alpha: float, context: int = 512,
              cost_ratio: float | None = None) -> SpecCost:
    """The cost model for a draft/target pair. cost_ratio defaults to the FLOPs ratio."""
    target = decode_flops(target_config, context).total
    draft = decode_flops(draft_config, context).total
    tau = expected_tokens_per_step(alpha, k)
    c = draft / target if cost_ratio is None else cost_ratio
    if c < 0:
        raise ValueError(f"cost_ratio must be >= 0, got {c}")
    return SpecCost(k=k, alpha=alpha, context=context, target_flops=target, draft_flops=draft,
                    tokens_per_step=tau, flops_per_token=(k * draft + (k + 1) * target) / tau,
                    cost_ratio=c, speedup=tau / (k * c + 1.0))


def best_k(target_config: Any, draft_config: Any, alpha: float, context: int = 512,
           cost_ratio: float | None = None, k_max: int = 16) -> SpecCost:
    """The draft length in 1..k_max with the highest theoretical speedup."""
    costs = [spec_cost(target_config, draft_config, k, alpha, context, cost_ratio)
             for k in range(1, k_max + 1)]
    return max(costs, key=lambda c: c.speedup)


# ----------------------------------------------------------------------------------------- CLI


@dataclass
class FlopsConfig:
    model: str = "llama-3.1-8b-instruct"
    draft: str | None = None
    drop: int | None = None  # a draft made of the model minus its `drop` layers (config only)
    k: int = 4
    alpha: float | None = None
    context: int = 512
    prompt: int = 512
    cost_ratio: float | None = None


def _load_config(name: str):
    from specdec.models import load_config

    return load_config(name)


def _short(name: str) -> str:
    return name if len(name) <= 28 else "…" + name[-27:]


def _fmt(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}"
    return f"{x:.0f}"


def run(cfg: FlopsConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    configs = {"model": _load_config(cfg.model)}
    names = {"model": cfg.model}
    if cfg.draft is not None and cfg.drop is not None:
        raise ValueError("give either --draft or --drop, not both")
    if cfg.draft is not None:
        configs["draft"], names["draft"] = _load_config(cfg.draft), cfg.draft
    elif cfg.drop is not None:
        shape = LlamaShape.from_config(configs["model"])
        if not 1 <= cfg.drop < shape.layers:
            raise ValueError(f"--drop must be in 1..{shape.layers - 1} for {cfg.model} "
                             f"({shape.layers} layers), got {cfg.drop}")
        configs["draft"] = shape.with_layers(shape.layers - cfg.drop)
        names["draft"] = f"{cfg.model} minus {cfg.drop} layers"

    result: dict[str, Any] = {"models": {}}
    table = Table(title="parameters and FLOPs per forward (FLOP = multiply or add; matmuls)",
                  caption="decode: one token over T keys, LM head included; prefill: causal")
    table.add_column("", no_wrap=True)
    for role in configs:
        table.add_column(_short(names[role]), justify="right", overflow="fold")
    rows: dict[str, list[str]] = {}
    for role, config in configs.items():
        s = LlamaShape.from_config(config)
        p = param_counts(s)
        dec, pre = decode_flops(s, cfg.context), prefill_flops(s, cfg.prompt)
        info = {
            "layers": s.layers, "hidden": s.hidden, "heads/kv": f"{s.heads}/{s.kv_heads}",
            "vocab": s.vocab, "tied": s.tied, "params": p.total,
            "params non-emb": p.non_embedding,
            f"decode T={cfg.context}": dec.total,
            "  + embedding": dec.total_with_embedding,
            f"prefill P={cfg.prompt}": pre.total,
        }
        result["models"][role] = info
        for key, value in info.items():
            text = _fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and key not in ("layers", "hidden", "vocab") else str(value)
            rows.setdefault(key, []).append(text)
    for key, values in rows.items():
        table.add_row(key, *values)
    console.print(table)

    if cfg.drop is not None:
        layers = LlamaShape.from_config(configs["model"]).layers
        conv = Table(caption="T: attention context; 2N rule: embedding lookup counted as a matmul",
                     title=f"removing {cfg.drop} of {layers} layers: which convention gives "
                           "which reduction")
        for col in ("convention", "before", "after", "reduction"):
            conv.add_column(col, justify="left" if col == "convention" else "right",
                            no_wrap=col != "convention")
        result["conventions"] = []
        for c in pruning_reduction(configs["model"], cfg.drop, cfg.context):
            conv.add_row(c.name, _fmt(c.before), _fmt(c.after), f"{100 * c.reduction:.2f}%")
            result["conventions"].append({"name": c.name, "before": c.before, "after": c.after,
                                          "reduction": c.reduction})
        console.print(conv)

    if "draft" in configs and cfg.alpha is not None:
        sc = spec_cost(configs["model"], configs["draft"], cfg.k, cfg.alpha, cfg.context,
                       cfg.cost_ratio)
        bk = best_k(configs["model"], configs["draft"], cfg.alpha, cfg.context, cfg.cost_ratio)
        spec = Table(title=f"speculative decoding cost model (alpha={cfg.alpha}, T={cfg.context})")
        for col in ("k", "tau", "FLOPs/token", "vs target", "c", "speedup"):
            spec.add_column(col, justify="right", no_wrap=True)
        spec.caption = ("tau: tokens per step; FLOPs per committed token, also as a multiple of "
                        "the target's; c: draft/target cost per forward")
        for row in (sc, bk):
            spec.add_row(f"{row.k}{' (best)' if row is bk else ''}", f"{row.tokens_per_step:.3f}",
                         _fmt(row.flops_per_token), f"{row.flops_overhead:.3f}x",
                         f"{row.cost_ratio:.3f}", f"{row.speedup:.3f}x")
        console.print(spec)
        result["spec"] = {"k": sc.k, "alpha": sc.alpha, "tokens_per_step": sc.tokens_per_step,
                          "flops_per_token": sc.flops_per_token, "cost_ratio": sc.cost_ratio,
                          "speedup": sc.speedup, "best_k": bk.k, "best_speedup": bk.speedup}
    elif cfg.alpha is not None:
        console.print("[yellow]--alpha needs a draft (--draft or --drop) for the cost "
                      "model[/yellow]")
    return result


def main(argv: list[str] | None = None) -> int:
    d = FlopsConfig()
    parser = argparse.ArgumentParser(prog="python -m specdec.flops",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=d.model,
                        help="registry name, checkpoint dir or hub id (default %(default)s)")
    parser.add_argument("--draft", default=d.draft, help="draft model, same forms as --model")
    parser.add_argument("--drop", type=int, default=d.drop,
                        help="use the model minus DROP layers as the draft (config only)")
    parser.add_argument("--k", type=int, default=d.k, help="draft length (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="per-token acceptance rate")
    parser.add_argument("--context", type=int, default=d.context,
                        help="decode context T (default %(default)s)")
    parser.add_argument("--prompt", type=int, default=d.prompt,
                        help="prefill length P (default %(default)s)")
    parser.add_argument("--cost-ratio", type=float, default=d.cost_ratio,
                        help="c = draft/target forward time (default: the FLOPs ratio)")
    args = parser.parse_args(argv)
    console = Console()
    try:
        run(FlopsConfig(**vars(args)), console)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RuntimeError as exc:  # ModelError (unknown or unreachable model) is a RuntimeError
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
