"""The `ilias-ray extract` flags, derived from Config's declarations, and the Config they give."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING

from ilias_ray.config import Config, bool_flag


def _bool(value: str) -> bool:
    try:
        return bool_flag(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_bool(value: str):
    return None if str(value).lower() == "auto" else _bool(value)


def flag_type(name: str):
    """The argparse `type` of a declared setting, from its annotation: int, a bool spelling
    (bool_flag; `auto` too where None means "decide at run time"), or a plain string (None)."""
    hint = typing.get_type_hints(Config)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if base is bool:
        return _auto_bool if optional else _bool
    return {int: int, str: None}[base]


def add_extract_flags(p: argparse.ArgumentParser, given_only: bool = False) -> None:
    """One `--name` per setting Config declares as a flag, with its default, choices and help.
    `given_only`: no defaults and nothing required (the parse holds only the flags given)."""
    for f in Config.flags():
        kw = dict(type=flag_type(f.name), help=f.metadata["help"] or None)
        if given_only:
            kw["default"] = argparse.SUPPRESS
        elif f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", **kw)


def config_from_args(ns: argparse.Namespace) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in vars(ns).items() if k in fields})


def overrides(argv: list) -> dict:
    """{setting: value} of the `ilias-ray extract` flags given in `argv` (only those given; each
    parsed and checked as on the command line: a wrong one exits 2 with argparse's one line)."""
    p = argparse.ArgumentParser(prog="ilias-ray extract")
    add_extract_flags(p, given_only=True)
    return vars(p.parse_args(argv))


def command_line(cfg: Config) -> str:
    """`cfg` as the `ilias-ray extract` flags that differ from the defaults (the required ones always)."""
    out = []
    for f in Config.flags():
        value = getattr(cfg, f.name)
        if f.default is MISSING or value != f.default:
            out.append(f"--{f.name} {str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(out)
