"""Pipeline stages built from settings written as a dict (tests write them as dataclasses.asdict(Config)
plus overrides): each stage gets only its narrow arguments, unpacked as the job does (job/stage_args.py)."""

from __future__ import annotations

from ilias_ray.config import Config
from ilias_ray.job.stage_args import decoder as _decoder
from ilias_ray.job.stage_args import embedder_args


def embedder(settings: dict, threads: int = 0):
    """The model stage of a run with these settings."""
    from ilias_ray.stages.embed import Embedder

    return Embedder(**embedder_args(Config(**settings)), threads=threads)


def decoder(settings: dict):
    """The decode stage's settings (preprocess.Decoder) of a run with these settings."""
    return _decoder(Config(**settings))
