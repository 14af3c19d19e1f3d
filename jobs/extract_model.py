"""Job: one model's whole ILIAS run in one submission (what the reference's cluster script does).

    ray job submit --working-dir . -- python jobs/extract_model.py --framework timm \
        --model vit_large_patch16_siglip_384.webli --resolution 512 \
        --core /data/ilias/images --yfcc /data/yfcc100m --hdf5_dir /data/features/siglip \
        --start_tar 0 --total_tars 10

It runs two extractions in one driver: the image queries, positives and the distractor shards as
one job with one model load (`--partition image_queries,positives,distractors --distractors_dir`),
then the text queries when the model has a text tower.

Flags it does not know are `ilias-ray extract` flags for every job (e.g. --checkpoint, --batch_size),
checked before the first one starts.

`ilias_ray` is the installed package (the Dockerfile's image installs it), or the `--working-dir`
copy, which Ray puts first on the job's PYTHONPATH; this script edits no sys.path.
"""

import argparse
import sys

from ilias_ray.cli.flags import overrides
from ilias_ray.cli.sweep import model_configs, run_configs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", default="timm")
    p.add_argument("--model", required=True)
    p.add_argument("--pooling", default="head")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--core", required=True, help="ILIAS core image folder")
    p.add_argument("--yfcc", default=None, help="folder of YFCC100M tar shards (omit to skip distractors)")
    p.add_argument("--hdf5_dir", required=True)
    p.add_argument("--start_tar", type=int, default=0)
    p.add_argument("--total_tars", type=int, default=10)
    p.add_argument(
        "--text",
        choices=("auto", "true", "false"),
        default="auto",
        help="text queries: auto = when the model has a text tower",
    )
    args, extra = p.parse_known_args()
    cfgs = model_configs(
        args.framework,
        args.model,
        args.core,
        args.yfcc,
        args.hdf5_dir,
        args.pooling,
        args.resolution,
        args.start_tar,
        args.total_tars,
        args.text,
        overrides(extra),  # checked now, before the first job: a wrong flag is one line
    )
    return run_configs(cfgs)


if __name__ == "__main__":
    sys.exit(main())
