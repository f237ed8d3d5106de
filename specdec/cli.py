"""Command lines built from a stage's @dataclass config: one place for defaults."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def config_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per field of dataclass `cls` (the one place for
    defaults). Field metadata may give `help` and `choices`; bools become --x/--no-x, lists
    take several values, and a `T | None` field also takes 'none' (or 'all')."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        args = typing.get_args(typ)
        optional = typing.get_origin(typ) in (typing.Union, types.UnionType)
        if optional:
            typ = next(a for a in args if a is not type(None))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = argparse.SUPPRESS if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kwargs: dict[str, Any] = dict(dest=f.name,
                                      help=f.metadata.get("help", "(default: %(default)s)"))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                **kwargs)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(typ)[0], default=default,
                                required=required, **kwargs)
        else:
            parser.add_argument(flag, type=_or_none(typ) if optional else typ, default=default,
                                required=required, **kwargs)
    return parser


def _or_none(typ: type):
    def parse(text: str):
        return None if text.lower() in ("none", "all") else typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its error message
    return parse


def config_from_args(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def config_to_args(cfg: Any) -> list[str]:
    """The command line that `config_parser` turns back into `cfg` (for running a stage in
    another interpreter, e.g. distillation in the vLLM environment)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            argv += [flag, "none"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
