"""job/stage_args.py: each stage gets only its settings."""

from __future__ import annotations

import pickle

from ilias_ray.config import Config


def default(**kw) -> Config:
    return Config(dataset_dir=".", hdf5_dir=".", **kw)


def test_stages_get_only_their_settings():
    """What Ray ships to decode tasks and model actors: small, picklable, and no whole Config."""
    from ilias_ray.job.stage_args import decoder, embedder_args
    from ilias_ray.stages.decode import Decoder
    from ilias_ray.stages.embed import BackboneSpec

    cfg = default(
        transforms="RESIZE_PAD",
        resolution=224,
        masking=True,
        multirotate=True,
        checkpoint="s3://b/w.pt",
        checkpoint_sha256="ab",
        batch_size=16,
    )
    dec = decoder(cfg)
    assert dec == Decoder(transforms="RESIZE_PAD", resolution=224, min_size=0, crop_resize=False, masking=True)
    assert (
        dec.pad == 224
        and decoder(default(min_size=600)).pad == 600
        and decoder(default(transforms="RESIZE_SMALL", min_size=600)).pad == 0
    )
    args = embedder_args(cfg)
    assert args == dict(
        backbone=BackboneSpec(
            framework="timm",
            model="vit_large_patch16_siglip_384.webli",
            checkpoint="s3://b/w.pt",
            checkpoint_sha256="ab",
            pretrained=True,
            trust_remote_code=False,
        ),
        pooling="head",
        scales=(1.0,),
        angles=(0, 90, 180, 270),
        pad=224,
        batch_size=16,
        comp_fp16=True,
        store_fp16=True,
    )
    assert embedder_args(default(multiscale=True))["scales"] == (0.707, 1.0, 1.414)
    for shipped in (dec, args):
        assert pickle.loads(pickle.dumps(shipped)) == shipped
        assert len(pickle.dumps(shipped)) < 1000
