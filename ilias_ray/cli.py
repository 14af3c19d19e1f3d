"""`ilias-ray extract` (the reference tool's flags, same names and defaults), `models`, `verify`
and `demo`."""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from dataclasses import MISSING

from ilias_ray.config import Config, UserError, bool_flag


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


def add_extract_flags(p: argparse.ArgumentParser) -> None:
    """One `--name` per setting Config declares as a flag, with its default, choices and help."""
    for f in Config.flags():
        kw = dict(type=flag_type(f.name), help=f.metadata["help"] or None)
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", **kw)


def config_from_args(ns: argparse.Namespace) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in vars(ns).items() if k in fields})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default, unless the flag is required or its help already says
    what the default is."""

    def _get_help_string(self, action):
        if action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ilias-ray", description="ILIAS feature extraction on Ray Data")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser(
        "extract",
        help="extract features for one partition, or several image partitions as one job",
        formatter_class=_HelpFormatter,
    )
    add_extract_flags(ex)
    models = sub.add_parser("models", help="the benchmark's model table, or one model's details")
    models.add_argument("--framework", default=None)
    models.add_argument("--model", default=None)
    verify = sub.add_parser("verify", help="check every HDF5 file in a directory; non-zero exit on any problem")
    verify.add_argument("--hdf5_dir", required=True)
    verify.add_argument(
        "--strict",
        action="store_true",
        help="warnings (shards that ended early, files with 0 rows, IDs the input repeats) fail too",
    )
    demo = sub.add_parser("demo", help="build a small ILIAS-shaped sample and extract every partition")
    demo.add_argument("--workdir", default="demo_output", help="where the sample and features go")
    demo.add_argument("--address", default=None)
    return parser


def user_error(e: BaseException):
    """The UserError behind `e`, also when Ray wrapped it (raised inside an actor or task)."""
    seen, first = set(), e
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    # Ray Data may pass on only the text of an error raised in an actor: find ours in it.
    found = re.findall(r"ilias_ray\.config\.UserError: (.+)", str(first))
    return UserError(found[-1].strip()) if found else None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    try:
        if args.command == "extract":
            from ilias_ray.pipeline import run

            run(config_from_args(args))
        elif args.command == "models":
            from ilias_ray.models.table import describe, print_table

            if args.model:
                describe(args.framework or "timm", args.model)
            else:
                print_table()
        elif args.command == "verify":
            from ilias_ray.verify import verify

            return verify(args.hdf5_dir, strict=args.strict)
        elif args.command == "demo":
            from ilias_ray.demo import run_demo

            run_demo(args.workdir, address=args.address)
        return 0
    except KeyboardInterrupt:
        print(
            "ilias-ray: interrupted: finished files and shards are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if "ilias_ray.pipeline" in sys.modules:
            sys.modules["ilias_ray.pipeline"].stop_ray()
        user = user_error(e)
        if user is not None:
            print(f"ilias-ray: error: {user}", file=sys.stderr)
            return 2
        # Unexpected: one line by default, the traceback on request.
        if os.environ.get("ILIAS_RAY_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"ilias-ray: failed: {type(e).__name__}: {first} (ILIAS_RAY_DEBUG=1 shows the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
