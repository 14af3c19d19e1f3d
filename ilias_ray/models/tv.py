"""torchvision classification models by name (`--framework tv`, e.g. `alexnet`)."""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torchvision

from ilias_ray.models.base import (
    CNN_POOLINGS,
    Backbone,
    ModelSpec,
    Weights,
    load_into,
    load_state_dict,
    strip_prefixes,
    unknown_model,
    url_cached,
    url_hint,
)


@functools.lru_cache(maxsize=1)
def names() -> tuple:
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def weights(name: str) -> Weights:
    try:
        w = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return Weights("none", None, "torchvision publishes no weights for it; pass --checkpoint FILE")
    return Weights(w.url, url_cached(w.url), url_hint(w.url))


def spec(name: str) -> ModelSpec:
    if name not in names():
        raise unknown_model("tv", name, names())
    return ModelSpec(poolings=CNN_POOLINGS, weights=weights(name))


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The convolutional part, whose map the poolings read (the layers before global pooling)."""
    if isinstance(model, torchvision.models.DenseNet):
        return torch.nn.Sequential(model.features, torch.nn.ReLU())  # DenseNet applies ReLU before pooling
    if hasattr(model, "features"):  # AlexNet, VGG, MobileNet, EfficientNet, ConvNeXt, ...
        return model.features
    if hasattr(model, "avgpool") and hasattr(model, "fc"):  # ResNet family, RegNet, ...
        return torch.nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc")])
    raise NotImplementedError(f"no feature trunk known for {type(model).__name__}; use --pooling head")


def drop_classifier(model: torch.nn.Module) -> tuple:
    """Replace the last Linear layer by Identity, so `head` gives the penultimate features (the
    reference's AlexNet: `classifier[6] = Identity`, 4096-d). Returns the removed layer's name and
    its input width (the `head` width), or ("", 0) when the model has no Linear classifier."""
    for prefix in ("classifier", "heads", ""):
        if prefix and not isinstance(getattr(model, prefix, None), torch.nn.Module):
            continue  # e.g. ResNet: no `classifier`, its `fc` is a child of the model itself
        parent = model.get_submodule(prefix) if prefix else model
        for name, child in reversed(list(parent.named_children())):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, torch.nn.Identity())
                return (f"{prefix}.{name}" if prefix else name), child.in_features
    return "", 0


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    spec(name)
    torch.manual_seed(0)  # --pretrained false: every actor builds the same random weights
    model = torchvision.models.get_model(name, weights=None)
    features = trunk(model)
    removed, width = drop_classifier(model)
    drop = (removed + ".",) if removed else ()
    if checkpoint:
        load_into(model, strip_prefixes(load_state_dict(checkpoint), ("module.",)), checkpoint, drop=drop)
    elif pretrained:
        # Our own download (into $TORCH_HOME, hash-checked) so the file is read with weights_only=True.
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        load_into(model, sd, url, drop=drop)
    # Without a Linear classifier (SqueezeNet's is a conv), `head` is the classifier's output.
    return Backbone(model=model.eval(), dim=width or model.num_classes, features=features)
