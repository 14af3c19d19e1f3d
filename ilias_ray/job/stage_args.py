"""The run's settings unpacked once into what each stage takes: the decoder, the model stage's
arguments, the read stage's grouper. No stage sees the whole Config."""

from __future__ import annotations

from ilias_ray.config import ANGLES, SCALES, Config
from ilias_ray.job.sizing import forward_group


def decoder(cfg: Config):
    """The decode stage's settings (stages/decode.Decoder), unpacked from the run's."""
    from ilias_ray.stages.decode import Decoder

    return Decoder(
        transforms=cfg.transforms,
        resolution=cfg.resolution,
        min_size=cfg.min_size,
        crop_resize=cfg.crop_resize,
        masking=cfg.masking,
    )


def embedder_args(cfg: Config) -> dict:
    """The model stage's constructor arguments (embed.Embedder), unpacked from the run's settings."""
    from ilias_ray.stages.embed import BackboneSpec

    backbone = BackboneSpec(
        framework=cfg.framework,
        model=cfg.model,
        checkpoint=cfg.checkpoint,
        checkpoint_sha256=cfg.checkpoint_sha256,
        pretrained=cfg.pretrained,
        trust_remote_code=cfg.trust_remote_code,
    )
    return dict(
        backbone=backbone,
        pooling=cfg.pooling,
        scales=SCALES if cfg.multiscale else (1.0,),
        angles=ANGLES if cfg.multirotate else (0,),
        pad=decoder(cfg).pad,
        batch_size=cfg.batch_size,
        comp_fp16=cfg.comp_fp16,
        store_fp16=cfg.store_fp16,
    )


HOLD_ROWS_PER_TOKEN = 512  # --pooling local: a row's features are a token grid, so the sink may buffer fewer


def grouper(cfg: Config):
    """The read stage's Grouper factory: blocks of whole forward passes of one shape."""
    from functools import partial

    from ilias_ray.stages.grouper import HOLD_ROWS, Grouper

    window = HOLD_ROWS_PER_TOKEN if cfg.pooling == "local" else HOLD_ROWS
    return partial(Grouper, shape_of=decoder(cfg).group_key, group=forward_group(cfg), window=window)
