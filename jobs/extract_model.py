"""Job: one model's whole ILIAS run in one submission (what the reference's cluster script does).

    ray job submit --working-dir . -- python jobs/extract_model.py --framework timm \
        --model vit_large_patch16_siglip_384.webli --resolution 512 \
        --core /data/ilias/images --yfcc /data/yfcc100m --hdf5_dir /data/features/siglip \
        --start_tar 0 --total_tars 10

It runs two extractions in one driver: the image queries, positives and the distractor shards as
one job with one model load (`--partition image_queries,positives,distractors --distractors_dir`),
then the text queries when the model has a text tower.

Flags it does not know are passed to every `ilias-ray extract` (e.g. --checkpoint, --batch_size).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ilias_ray.jobs import model_commands, run_commands  # noqa: E402


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
    cmds = model_commands(
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
        extra,
    )
    return run_commands(cmds)


if __name__ == "__main__":
    sys.exit(main())
