"""`ilias-ray extract` (the reference tool's flags, same names and defaults), `models`, `verify`
and `demo`."""

from __future__ import annotations

import argparse
import os
import sys

from ilias_ray.cli.flags import add_extract_flags, config_from_args
from ilias_ray.errors import one_line, user_error
from ilias_ray.job.session import stop_ray


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


def guarded(fn, *args) -> int:
    """fn(*args) as a command: its exit status (an int it returns, else 0), 130 when interrupted, 2
    with one line for a user error (also one raised in a Ray task or actor), 1 with one line for
    anything else (ILIAS_RAY_DEBUG=1: the traceback). The run's Ray connection is closed first."""
    try:
        rc = fn(*args)
        return rc if isinstance(rc, int) else 0
    except KeyboardInterrupt:
        print(
            "ilias-ray: interrupted: finished files and shards are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        stop_ray()
        user = user_error(e)
        if user is not None:
            # Its first line: Ray Data appends its retry hints to an error raised in a stage.
            print(f"ilias-ray: error: {one_line(user)}", file=sys.stderr)
            return 2
        # Unexpected: one line by default, the traceback on request.
        if os.environ.get("ILIAS_RAY_DEBUG"):
            raise
        print(
            f"ilias-ray: failed: {type(e).__name__}: {one_line(e)} (ILIAS_RAY_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def command(args) -> int:
    """The subcommand `args` names."""
    if args.command == "extract":
        from ilias_ray.job.run import run

        run(config_from_args(args))
    elif args.command == "models":
        from ilias_ray.models.table import describe, print_table

        if args.model:
            describe(args.framework or "timm", args.model)
        else:
            print_table()
    elif args.command == "verify":
        from ilias_ray.output.verify import verify

        return verify(args.hdf5_dir, strict=args.strict)
    elif args.command == "demo":
        from ilias_ray.cli.demo import run_demo

        run_demo(args.workdir, address=args.address)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    return guarded(command, args)


if __name__ == "__main__":
    sys.exit(main())
