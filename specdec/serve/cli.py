"""`python -m specdec.serve`: run the OpenAI-compatible server.

    python -m specdec.serve --target smollm2-135m-instruct --draft runs/demo/sd-draft --k 4
    python -m specdec.serve --target T --draft D --api-key secret --port 8000
    python -m specdec.serve --backend vllm --target T --draft D   # vLLM's engine (specdec.vllm)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

from specdec.models import ModelError
from specdec.serve.config import ServeConfig

API_KEY_ENV = "SPECDEC_API_KEY"


def run(cfg: ServeConfig) -> int:
    """Serve until interrupted (Ctrl-C / SIGTERM); returns the exit status."""
    if cfg.backend == "vllm":
        return _run_vllm(cfg)
    import uvicorn

    from specdec.serve.app import create_app

    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=10)
    return 0


def _run_vllm(cfg: ServeConfig) -> int:
    """Hand the config to `specdec.vllm.serve(cfg)`, the vLLM backend, where it exists."""
    try:
        module = importlib.import_module("specdec.vllm")
    except ImportError as exc:
        if exc.name not in ("specdec.vllm", "vllm"):
            raise
        print(f"error: --backend vllm needs the vLLM backend (specdec.vllm and the vllm "
              f"package): {exc}. Install vllm (see the README's vLLM section) or serve with "
              f"the default backend.", file=sys.stderr)
        return 2
    serve = getattr(module, "serve", None)
    if not callable(serve):
        print("error: --backend vllm: specdec.vllm has no serve(cfg) entry point in this "
              "version; use `python -m specdec.vllm config` to print the `vllm serve` command "
              "line, or serve with the default backend.", file=sys.stderr)
        return 2
    status = serve(cfg)
    return int(status or 0)


def _arg_type(annotation: str) -> Any:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "str": str, "float": float}[base]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m specdec.serve",
        description="OpenAI-compatible server for speculative decoding (FastAPI + uvicorn).",
    )
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=helptext)
        else:
            if "default" not in helptext:
                helptext = f"{helptext} (default: {f.default})"
            parser.add_argument(flag, type=_arg_type(f.type), default=f.default,
                                choices=f.metadata.get("choices"), help=helptext)
    return parser


def config_from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None
                     ) -> ServeConfig:
    args = vars(build_parser().parse_args(argv))
    environ = os.environ if environ is None else environ
    if args.get("api_key") is None and environ.get(API_KEY_ENV):
        args["api_key"] = environ[API_KEY_ENV]
    return ServeConfig(**args)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"warning: serving on {cfg.host} without an API key; anyone who can reach this "
              f"port can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    try:
        return run(cfg)
    except (ValueError, ModelError) as exc:  # a model that cannot be served as asked
        print(f"error: {exc}", file=sys.stderr)
        return 2
