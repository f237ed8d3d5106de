"""Llama-3.1's real tokenizer and chat template, offline, and a CPU-sized rehearsal target.

The Llama-3 tokenizer is a tiktoken BPE (128,000 ranks, `tokenizer.model`) plus 256 special
tokens at ids 128000..128255. Meta's `llama-models` wheel on PyPI ships the rank file
(pinned in specdec.hub as source `llama3-tokenizer`); this module turns it into a Hugging Face
fast tokenizer once and caches it (`$SPECDEC_CACHE/tokenizers/llama-3.1-b<build>/`):

- byte-level BPE with the ranks as the vocabulary, merges recovered from the ranks (every
  split of a token into two tokens, ordered by the joined token's rank: tiktoken joins the
  adjacent pair whose join ranks lowest), whole-piece lookup first (`ignore_merges`, as
  tiktoken does), Llama-3's split regex;
- the 256 special tokens at their real ids, `<|begin_of_text|>` prepended like the hub
  tokenizer does, EOS `<|eot_id|>` and no pad token (as on the hub);
- our chat template: the Llama-3.1 format with the date-stamped system header that the hub's
  template writes (`Cutting Knowledge Date: December 2023` / `Today Date: 26 Jul 2024`, the
  date overridable with `date_string=`), every message rendered as `llama_models`' ChatFormat
  encodes it (role header, content as is, `<|eot_id|>`; `tool` becomes `ipython`). Unlike the
  hub's template it does not strip message content and has no tool-calling preamble.

The rehearsal target (`llama-3.1-8b-rehearsal` in specdec.models) is this tokenizer with the
8B config's vocabulary, GQA ratio, rope scaling, untied head and EOS ids, at a width and depth
a CPU test runs, with random weights (seed 0): built once into the cache, hashed like any
target.

    python -m specdec.models fetch llama-3.1-8b-rehearsal
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from rich.console import Console

from specdec.hub import cache_dir, fetch_source

TOKENIZER_SOURCE = "llama3-tokenizer"
TOKENIZER_BUILD = 2  # bump when build_tokenizer changes: the cached dirs are rebuilt
NUM_BASE_TOKENS = 128000
NUM_SPECIAL_TOKENS = 256
BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
# The stop tokens of Llama-3.1-Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
EOS_TOKEN_IDS = (128001, 128008, 128009)
DEFAULT_DATE = "26 Jul 2024"
# Llama-3's pre-tokenizer split: contractions, letters, up to 3 digits, punctuation runs,
# newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '" + DEFAULT_DATE + "' %}"
    "{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] in ['tool', 'ipython'] %}{%- set role = 'ipython' %}"
    "{%- else %}{%- set role = message['role'] %}{%- endif %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def system_header(date_string: str = DEFAULT_DATE) -> str:
    """The text the chat template puts before the system message (the date-stamped header)."""
    return f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n"


def special_tokens() -> list[str]:
    """The 256 special tokens, in id order from 128000."""
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))]
    return _NAMED_SPECIALS + reserved


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:80]!r}")
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    return ranks


def _byte_symbols() -> list[str]:
    """The byte-level alphabet: byte b as one printable character (the ByteLevel convention:
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order)."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges that reproduce tiktoken's: every split of a token into two tokens, ordered by
    the rank of the joined token (tiktoken joins the adjacent pair whose join ranks lowest)."""
    found = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = ranks.get(tok[:i]), ranks.get(tok[i:])
            if left is not None and right is not None:
                found.append((rank, left, right, tok[:i], tok[i:]))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def build_tokenizer(rank_file: str | Path):
    """A PreTrainedTokenizerFast equal to Llama-3's tiktoken tokenizer, from its rank file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    ranks = read_ranks(rank_file)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{rank_file}: ranks are not 0..{len(ranks) - 1}")
    symbols = _byte_symbols()

    def text(b: bytes) -> str:
        return "".join(symbols[x] for x in b)

    vocab = {text(tok): r for tok, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _merges(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = special_tokens()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for i, s in enumerate(specials):  # the real ids, or nothing downstream is Llama-3
        if backend.token_to_id(s) != len(ranks) + i:
            raise ValueError(f"{s} got id {backend.token_to_id(s)}, expected {len(ranks) + i}")
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOT, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"], model_max_length=131072)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_dir(console: Console | None = None) -> Path:
    """The cached tokenizer dir (tokenizer.json, tokenizer_config.json, chat template)."""
    dest = cache_dir() / "tokenizers" / f"llama-3.1-b{TOKENIZER_BUILD}"
    if (dest / "tokenizer.json").is_file():
        return dest
    import os
    import shutil
    import tempfile

    rank_file = fetch_source(TOKENIZER_SOURCE, console)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".llama-3.1.tmp-"))
    try:
        build_tokenizer(rank_file).save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race: its dir is identical
            if not (dest / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_tokenizer(console: Console | None = None):
    """Llama-3.1's tokenizer with our chat template (built once from the pinned wheel)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(console))


def build_rehearsal(name: str, config: dict[str, Any], dest: Path, seed: int = 0,
                    scale: float = 5.0, console: Console | None = None) -> Path:
    """The rehearsal target: random weights (seed) on `config`, the real tokenizer, saved.

    The 2-D block and head weights are scaled up from Hugging Face's init (`scale`), so that
    greedy text varies instead of repeating one token and top-2 logits rarely nearly tie (the
    mechanics tests compare argmaxes of batched and one-by-one forwards)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from specdec.models import MANIFEST, read_manifest, save_checkpoint

    recipe = {"seed": seed, "scale": scale, "tokenizer_build": TOKENIZER_BUILD}
    if (dest / MANIFEST).is_file() and read_manifest(dest).get("recipe") == recipe:
        return dest
    console = console or Console(stderr=True)
    tokenizer = load_tokenizer(console)
    cfg = LlamaConfig(**config)
    cfg.name_or_path = name
    with console.status(f"Building {name} (random weights, seed {seed}, once)"):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32).eval()
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in param_name:
                    p.mul_(scale)
        # What the hub's Llama-3.1-8B-Instruct generation_config.json says.
        model.generation_config = GenerationConfig(
            bos_token_id=config["bos_token_id"], eos_token_id=list(config["eos_token_id"]),
            do_sample=True, temperature=0.6, top_p=0.9)
        manifest = {"stage": "rehearsal", "model": name, "recipe": recipe,
                    "tokenizer_source": TOKENIZER_SOURCE}
        return save_checkpoint(model, tokenizer, dest, manifest)
