"""Command line options generated from `OffloadConfig`'s field declarations (config.py), so a setting is declared once.

`add_config_arguments(parser)` adds one flag per field (`--expert-bits`, `--max-memory SIZE`, ...) with its help,
choices and default; `config_values(args)` returns the fields the user set (flags left unset keep `OffloadConfig`'s
defaults, or the caller's). Used by `mixtral-offload generate/chat/info/bench/convert/synth`. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from .config import OffloadConfig, option_help, parse_size
from .errors import ConfigError


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, *, names: Iterable[str] | None = None,
                         defaults: dict[str, Any] | None = None, title: str = "offload options") -> None:
    """One flag per `OffloadConfig` field (or per name in `names`), in a basic and an advanced group. `defaults`
    replaces a field's default where this command's differs (shown in the help; applied by `config_values`)."""
    defaults = defaults or {}
    wanted = list(names) if names is not None else [f.name for f in dataclasses.fields(OffloadConfig)]
    groups = {"basic": parser.add_argument_group(title),
              "advanced": parser.add_argument_group(f"advanced {title}")}
    types = {f.name: str(f.type) for f in dataclasses.fields(OffloadConfig)}
    for name in wanted:
        o = option_help(name)
        default = defaults.get(name, o["default"])
        kw: dict[str, Any] = {"dest": name, "default": None, "help": f"{o['help']} (default: {_shown(default)})"}
        if types[name] == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif o["kind"] == "size":
            kw.update(type=_size, metavar="SIZE")
        elif types[name].startswith("int"):
            kw["type"] = int
        if o["choices"] and types[name] != "bool":
            kw["choices"] = o["choices"]
        groups[o["audience"]].add_argument(o["flag"], **kw)
    parser.set_defaults(_config_defaults={**dict(parser.get_default("_config_defaults") or {}), **defaults})


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `OffloadConfig` fields given on the command line, over the command's own defaults."""
    values = dict(getattr(args, "_config_defaults", None) or {})
    for f in dataclasses.fields(OffloadConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return values


def config_from_args(args: argparse.Namespace, **overrides: Any) -> OffloadConfig:
    """`OffloadConfig` of the flags (validated: a bad value raises ConfigError naming the field)."""
    return OffloadConfig(**{**config_values(args), **overrides})
