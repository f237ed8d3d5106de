"""The server's configuration and how it builds its engine from model names."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.models import DEFAULT_TARGET

DTYPES = ("auto", "float32", "bfloat16", "float16")
# int8 / w8: the draft's linears quantized at load (specdec.quant), CPU only
DRAFT_DTYPES = DTYPES + ("int8", "w8")


@dataclass
class ServeConfig:
    """Everything `python -m specdec.serve` takes (one place for the defaults)."""

    target: str = field(default=DEFAULT_TARGET, metadata={
        "help": "target model: registry name, hub id or checkpoint dir"})
    draft: str | None = field(default=None, metadata={
        "help": "draft model (same tokenizer as the target); none = target-only decoding"})
    k: int | None = field(default=None, metadata={
        "help": "draft tokens per speculative step (default: the draft's recommended k from its "
                "specdec.json, else 4)"})
    adaptive_k: bool = field(default=False, metadata={
        "help": "adapt k per step between 1 and --k from the acceptance seen"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it)"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    max_batch: int = field(default=8, metadata={"help": "most requests decoded in one batch"})
    max_queue: int = field(default=64, metadata={
        "help": "most requests waiting for a batch; past it requests get 429"})
    dtype: str = field(default="auto", metadata={
        "choices": DTYPES, "help": "weights' dtype (auto: bf16 on CUDA, fp32 on the CPU)"})
    draft_dtype: str = field(default="auto", metadata={
        "choices": DRAFT_DTYPES, "help": "the draft's dtype (auto: its recommended one, else "
        "--dtype; int8 / w8: fp32 weights quantized at load, CPU only -- w8 int8 weights "
        "with fp32 activations on the rowmm kernel)"})
    draft_vocab: str = field(default="auto", metadata={
        "help": "auto (the draft's trimmed vocabulary, draft_vocab.json, if it has one) | full | "
                "a path to a draft_vocab.json (default: auto)"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | cuda:N | auto"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on every route but /health "
                "(default: $SPECDEC_API_KEY if set, else no key)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model id clients send (default: --target as given)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context length served (prompt + max_tokens); default: the model's"})
    default_max_tokens: int = field(default=512, metadata={
        "help": "max_tokens of a request that does not say (capped by the context left)"})
    backend: str = field(default="specdec", metadata={
        "choices": ("specdec", "vllm"), "help": "specdec (this server and engine) | vllm (vLLM's engine, see specdec.vllm)"})
    log_level: str = field(default="info", metadata={
        "choices": ("critical", "error", "warning", "info", "debug"), "help": "uvicorn log level"})

    def __post_init__(self) -> None:
        from specdec.recommend import recommended_k

        if self.k is None:
            self.k = recommended_k(self.draft)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        for name, choices in (("dtype", DTYPES), ("draft_dtype", DRAFT_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got "
                                 f"{getattr(self, name)!r}")
        if self.backend not in ("specdec", "vllm"):
            raise ValueError(f"backend must be 'specdec' or 'vllm', got {self.backend!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.api_key == "":
            self.api_key = None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.target


def build_engine(cfg: ServeConfig):
    """(SpeculativeEngine, tokenizer) for the config's target and draft."""
    import torch

    from specdec.decode.engine import SpeculativeEngine
    from specdec.models import load_model
    from specdec.quant import load_draft
    from specdec.recommend import dtype_of, recommended
    from specdec.vocab import resolve_draft_vocab

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    target, tokenizer = load_model(cfg.target, dtype=dtype, device=device)
    draft = vocab = None
    if cfg.draft is not None:
        draft_dtype = (recommended(cfg.draft).get("draft_dtype")
                       if cfg.draft_dtype == "auto" else cfg.draft_dtype)
        if draft_dtype in ("int8", "w8") and cfg.draft_dtype == "auto" and device != "cpu":
            draft_dtype = None  # recommended on a CPU; elsewhere the target's dtype
        if draft_dtype in ("int8", "w8"):
            draft, draft_tokenizer = load_draft(cfg.draft, draft_dtype, device=device)
        else:
            draft, draft_tokenizer = load_model(cfg.draft, dtype=dtype_of(draft_dtype, dtype),
                                                device=device)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the draft {cfg.draft} has a different tokenizer from the target {cfg.target}; "
                "a draft must share the target's vocabulary (prune the draft from this target)"
            )
        vocab_size = target.get_output_embeddings().weight.shape[0]
        vocab = resolve_draft_vocab(cfg.draft_vocab, cfg.draft, vocab_size)
    engine = SpeculativeEngine(target, draft, k=cfg.k, adaptive_k=cfg.adaptive_k,
                               tokenizer=tokenizer, draft_vocab=vocab)
    return engine, tokenizer
