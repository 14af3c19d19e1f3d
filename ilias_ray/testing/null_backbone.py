"""`--framework null` (tests and benches only): a backbone that costs nothing, so that what a run
measures is Ray, the sink and the driver (bench/scale.py).

`null_D` gives D-wide features: a constant direction plus the image's first pixel, so that rows
differ without the model reading the pixels. It exists only with ILIAS_RAY_TESTING=1
(`ilias_ray.models.framework`); it is not in config.FRAMEWORKS, so the command line, the models
table and the model contract tests never list it.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ilias_ray.models.base import Backbone, ModelSpec, Weights, unknown_model

NAMES = ("null_1024", "null_768", "null_16")  # any null_D is accepted; these are examples
NAME = re.compile(r"^null_([1-9][0-9]{0,5})$")


def names() -> tuple:
    return NAMES


def dim(name: str) -> int:
    m = NAME.match(name)
    if not m:
        raise unknown_model("null", name, NAMES)
    return int(m.group(1))


def spec(name: str) -> ModelSpec:
    dim(name)
    return ModelSpec(poolings=("head",), weights=Weights("none: no weights", True))


class Null(torch.nn.Module):
    """(B, 3, H, W) -> (B, D): the same direction for every image, shifted by its first pixel."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("direction", torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.direction + x[:, :1, 0, 0]


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    d = dim(name)
    return Backbone(model=Null(d).eval(), dim=d)
