"""`ilias-ray demo`: a small ILIAS-shaped sample, every partition extracted, no network.

Two jobs, side by side: the image partitions together (one model load), and the text queries
(the text tower).

The image model is a small timm ViT whose seeded random weights are written to a local
checkpoint first, so the run also exercises `--checkpoint`. The text tower is open_clip's RN50
with seeded random weights (`--pretrained false`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ilias_ray.config import Config
from ilias_ray.job.progress import say
from ilias_ray.job.run import run
from ilias_ray.job.session import init_ray
from ilias_ray.output.verify import verify
from ilias_ray.testing.sample import build_sample

IMAGE_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TEXT_MODEL = "RN50.openai"
RESOLUTION = 224


def write_random_checkpoint(model_name: str, path: Path, seed: int = 0) -> Path:
    """A timm state_dict (safetensors) with seeded random weights: what a hub would ship."""
    import timm
    import torch
    from safetensors.torch import save_file

    if not path.exists():
        torch.manual_seed(seed)
        model = timm.create_model(model_name, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_demo(workdir: str, address=None) -> list:
    root = Path(workdir).resolve()
    sample = build_sample(root / "sample")
    ckpt = write_random_checkpoint(IMAGE_MODEL, root / "vit_tiny_random.safetensors")
    out = str(root / "features")
    # A sample of 80 images: one model actor per job is enough (each actor loads the model once).
    common = dict(hdf5_dir=out, address=address, resolution=RESOLUTION, batch_size=32, overwrite=True, model_actors=1)
    # One job, one model load, for the three image partitions; each still gets its own files.
    image = Config(
        dataset_dir=str(sample["core"]),
        distractors_dir=str(sample["yfcc"]),
        partition="image_queries,positives,distractors",
        model=IMAGE_MODEL,
        checkpoint=str(ckpt),
        tar_batch_size=2,
        **common,
    )
    text = Config(
        dataset_dir=str(sample["core"]),
        partition="text_queries",
        framework="text",
        model=TEXT_MODEL,
        pretrained=False,
        **common,
    )
    say(f"\n== {image.partition} (one job), and {text.partition} (the text tower's job, beside it) ==")
    t0 = time.time()
    init_ray(image)  # one Ray connection for both jobs
    # The text tower's actor starts while the image job runs: on a few cores, the two overlap.
    with ThreadPoolExecutor(1) as beside:
        text_job = beside.submit(run, text)
        summaries = [run(image), text_job.result()]
    wall = time.time() - t0
    say("\n== demo summary ==")
    say(f"sample data: {root / 'sample'}")
    say(f"features:    {out}")
    for name in sorted(os.listdir(out)):
        say(f"  {name}")
    rows = sum(s["rows"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    say(f"{rows} rows, {skipped} skipped (recorded in the files), {wall:.1f} s of extraction")
    say(f"\n== ilias-ray verify --hdf5_dir {out} ==")
    if verify(out, out=say):
        raise RuntimeError("the demo's own files did not verify")
    return summaries
