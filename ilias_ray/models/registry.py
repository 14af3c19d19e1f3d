"""Backbone registry: `--framework` name -> module. One module per framework (timm-style).

Every framework module is a `Framework` (the Protocol below): `names()`, `spec(name)` and
`build(name, *, checkpoint, pretrained, trust_remote_code)`, the same typed entry point for all
of them, in the spirit of timm's `create_model`. No framework sees the whole run configuration:
`build` and `check` here take the settings by name.
"""

from __future__ import annotations

import importlib
from typing import Optional

from ilias_ray.config import FRAMEWORKS  # the --framework names and their modules
from ilias_ray.errors import UserError
from ilias_ray.models.base import Backbone, Framework, ModelSpec, offline
from ilias_ray.testing import faults

# Frameworks that exist only under the test switch (ILIAS_RAY_TESTING=1): never listed, never
# usable in production. `null`: features at no cost, for bench/scale.py.
TEST_FRAMEWORKS = {"null": "ilias_ray.testing.null_backbone"}


def framework(name: str) -> Framework:
    module = FRAMEWORKS.get(name) or (TEST_FRAMEWORKS.get(name) if faults.testing() else None)
    if module is None:
        raise UserError(f"unknown --framework {name!r}; known: {', '.join(FRAMEWORKS)}")
    return importlib.import_module(module)


def build(
    framework_name: str,
    model: str,
    *,
    checkpoint: Optional[str] = None,
    pretrained: bool = True,
    trust_remote_code: bool = False,
) -> Backbone:
    """`--framework framework_name --model model` built by its module (see `Framework.build`)."""
    return framework(framework_name).build(
        model, checkpoint=checkpoint, pretrained=pretrained, trust_remote_code=trust_remote_code
    )


def check(
    framework_name: str, model: str, *, pooling: str, checkpoint: Optional[str] = None, pretrained: bool = True
) -> ModelSpec:
    """Name, pooling and weight checks on the driver, so mistakes fail before any Ray work."""
    spec = framework(framework_name).spec(model)
    if framework_name != "text" and pooling not in spec.poolings:
        raise UserError(
            f"--pooling {pooling} is not supported by {framework_name}:{model} (supported: {', '.join(spec.poolings)})"
        )
    w = spec.weights
    if checkpoint:
        return spec
    if not pretrained:
        return spec  # seeded random weights: nothing to fetch
    if not w.public:
        raise UserError(f"{model}: no public weights; pass --checkpoint FILE ({w.hint})")
    if w.cached is False and offline():
        raise UserError(f"{model}: weights are not in the local cache and HF_HUB_OFFLINE=1; {w.hint}")
    return spec
