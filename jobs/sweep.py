"""Job: the whole-model run for every row of the benchmark's model table matching --rows.

    ray job submit --working-dir . -- python jobs/sweep.py --rows 'SigLIP|DINOv2' \
        --core /data/ilias/images --yfcc /data/yfcc100m --hdf5_dir /data/features

Each row writes into `--hdf5_dir/<label>/` with the table's framework, model, pooling and
resolution, and text queries when the row has a text tower. Finished files are skipped on a
rerun, so a sweep can be resubmitted after a failure. Unknown flags are `ilias-ray extract` flags
for every extraction, checked before the first one.
`ilias_ray` comes from the installed package or the `--working-dir` copy, as in extract_model.py.
"""

import argparse
import sys

from ilias_ray.cli.flags import overrides
from ilias_ray.cli.sweep import run_sweep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="regular expression on the table's label or model")
    p.add_argument("--core", required=True)
    p.add_argument("--yfcc", default=None)
    p.add_argument("--hdf5_dir", required=True)
    p.add_argument("--start_tar", type=int, default=0)
    p.add_argument("--total_tars", type=int, default=10)
    args, extra = p.parse_known_args()
    settings = overrides(extra)  # checked now, before the first job: a wrong flag is one line
    return run_sweep(args.rows, args.core, args.yfcc, args.hdf5_dir, args.start_tar, args.total_tars, settings)


if __name__ == "__main__":
    sys.exit(main())
