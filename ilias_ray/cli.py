"""`ilias-ray extract` (the reference tool's flags, same names and defaults), `models`, `verify`
and `demo`."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ilias_ray.config import PARTITIONS, POOLINGS, TRANSFORMS, Config, UserError, bool_flag


def _bool(value: str) -> bool:
    try:
        return bool_flag(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_bool(value: str):
    return None if str(value).lower() == "auto" else _bool(value)


def add_extract_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--dataset_dir", required=True, help="directory with the images, or with the tar shards")
    a("--partition", default="image_queries", choices=PARTITIONS)
    a("--hdf5_dir", required=True, help="directory for the HDF5 feature files")
    a("--hdf5_name", default="features", help="base name of the HDF5 files")
    a("--hdf5_compression", type=int, default=0, help="gzip level for the features dataset (0 = none)")
    a("--overwrite", type=_bool, default=False, help="replace existing feature files")
    a("--framework", default="timm", help="model codebase: timm, tv, och, fb, or text for text_queries")
    a("--model", default="vit_large_patch16_siglip_384.webli", help="model name in the framework")
    a("--pooling", default="head", choices=POOLINGS)
    a("--batch_size", type=int, default=128, help="images per forward pass")
    a("--webdl_batch_size", type=int, default=128, help="rows per batch sent to a model actor")
    a("--transforms", default="RESIZE_LARGE", choices=TRANSFORMS)
    a("--resolution", type=int, default=512)
    a("--min_size", type=int, default=0, help="RESIZE_LARGE: zero-pad each side up to this size")
    a("--multiscale", type=_bool, default=False)
    a("--multirotate", type=_bool, default=False)
    a("--masking", type=_bool, default=False)
    a("--crop_resize", type=_bool, default=False)
    a("--comp_fp16", type=_bool, default=True, help="fp16 autocast on CUDA (a CPU computes in fp32)")
    a("--start_tar", type=int, default=0)
    a("--total_tars", type=int, default=None, help="shards to process (default: all remaining)")
    a("--tar_batch_size", type=int, default=10, help="shards per distractor HDF5 file")
    a("--num_workers", type=int, default=8, help="concurrent decode tasks")
    a("--store_fp16", type=_bool, default=True)
    a("--selected_ids", default=None,
      help="file or URI with one ID per line (mini-ILIAS, uned); a line may have more comma-separated columns: "
           "only the first one is the ID. For folder partitions an ID is a path below --dataset_dir (no absolute "
           "paths, no '..'); for distractors a tar key or SHARD.tar/KEY")
    # ilias-ray additions
    a("--skip_missing", type=_bool, default=False,
      help="files listed in --selected_ids that do not exist are recorded as skipped instead of failing the run")
    a("--checkpoint", default=None, help="local weights file in the format the model's hub ships")
    a("--pretrained", type=_bool, default=True,
      help="false: seeded random weights, no download (tests and demos)")
    a("--trust_remote_code", type=_bool, default=False,
      help="allow torch.hub to run a model repository's code (never by default)")
    a("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    a("--model_actors", type=int, default=None,
      help="max model actors: the pool grows up to this as nodes join (default: GPUs in the cluster, "
           "or one single-threaded actor per CPU (at most one per 3 GiB of memory) without GPUs)")
    a("--use_gpu", type=_auto_bool, default=None,
      help="auto: GPU actors if the cluster has GPUs now; true: request GPUs even before an autoscaler adds them")


def config_from_args(ns: argparse.Namespace) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in vars(ns).items() if k in fields})


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ilias-ray", description="ILIAS feature extraction on Ray Data")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser("extract", help="extract features for one partition",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_extract_flags(ex)
    models = sub.add_parser("models", help="the benchmark's model table, or one model's details")
    models.add_argument("--framework", default=None)
    models.add_argument("--model", default=None)
    verify = sub.add_parser("verify", help="check every HDF5 file in a directory; non-zero exit on any problem")
    verify.add_argument("--hdf5_dir", required=True)
    verify.add_argument("--strict", action="store_true",
                        help="warnings (shards that ended early, files with 0 rows, IDs the input repeats) fail too")
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
        print("ilias-ray: interrupted: finished files and shards are kept; rerun the same command to resume",
              file=sys.stderr)
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
        print(f"ilias-ray: failed: {type(e).__name__}: {first} (ILIAS_RAY_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
