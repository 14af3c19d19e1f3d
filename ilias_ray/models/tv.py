"""torchvision classification models by name (`--framework tv`, e.g. `alexnet`)."""

from __future__ import annotations

import functools

import torch
import torchvision

from ilias_ray.models import (CNN_POOLINGS, Backbone, ModelSpec, Weights, load_into, load_state_dict,
                              strip_prefixes, unknown_model, url_cached, url_hint)


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


def drop_classifier(model: torch.nn.Module) -> str:
    """Replace the last Linear layer by Identity, so `head` gives the penultimate features (the
    reference's AlexNet: `classifier[6] = Identity`, 4096-d). Returns the removed layer's name."""
    for prefix in ("classifier", "heads", ""):
        parent = model.get_submodule(prefix) if prefix else model
        for name, child in reversed(list(parent.named_children())):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, torch.nn.Identity())
                return f"{prefix}.{name}" if prefix else name
    return ""


def build(cfg: dict) -> Backbone:
    name = cfg["model"]
    spec(name)
    ckpt = cfg.get("checkpoint")
    torch.manual_seed(0)  # --pretrained false: every actor builds the same random weights
    model = torchvision.models.get_model(name, weights=None)
    features = trunk(model)
    removed = drop_classifier(model)
    drop = (removed + ".",) if removed else ()
    if ckpt:
        load_into(model, strip_prefixes(load_state_dict(ckpt), ("module.",)), ckpt, drop=drop)
    elif cfg.get("pretrained", True):
        # Our own download (into $TORCH_HOME, hash-checked) so the file is read with weights_only=True.
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        load_into(model, sd, url, drop=drop)
    return Backbone(model=model.eval(), features=features)
