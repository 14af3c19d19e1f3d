"""What every framework module shares: the typed model spec, the Backbone it builds, the Framework
protocol, and the weight-loading helpers (weights_only=True or safetensors, never hub code
without --trust_remote_code)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from ilias_ray.config import POOLINGS
from ilias_ray.errors import UserError  # noqa: F401 - FRAMEWORKS is this registry's

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ALL_POOLINGS = POOLINGS  # declared once, as the --pooling choices (ilias_ray.config)
CNN_POOLINGS = tuple(p for p in ALL_POOLINGS if p != "cls")


@dataclass
class Weights:
    """Where a model's weights come from, and whether they are on this machine."""

    source: str  # e.g. "hf-hub:timm/vit_base_patch16_224.augreg_in1k", a URL, or "user checkpoint"
    cached: Optional[bool]  # None: cannot tell; False: not on this machine
    hint: str = ""  # what to download and where to put it
    public: bool = True  # False: no public hub serves these weights; --checkpoint is required


@dataclass
class ModelSpec:
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    patch: int = 0
    poolings: tuple = ALL_POOLINGS
    has_text: bool = False
    weights: Weights = field(default_factory=lambda: Weights("", None))


@dataclass
class Backbone:
    model: torch.nn.Module
    dim: int  # width of the `head` output (text towers: of encode_text), read from the model, not measured
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    patch: int = 0  # ViT inputs are zero-padded to a multiple of this (0 = no padding)
    token_pool: bool = False  # feature tokens start with a class token at x[:, 0]
    tokenizer: Optional[Callable] = None  # text towers only
    head: Optional[Callable] = None  # `--pooling head`; default model(x)
    features: Optional[Callable] = None  # input of the other poolings; default model.forward_features

    def __post_init__(self):
        self.head = self.head or self.model
        self.features = self.features or getattr(self.model, "forward_features", None)


@runtime_checkable
class Framework(Protocol):
    """What every module in FRAMEWORKS provides (tests/models/test_model_contract.py checks each one).

    A setting that some backbone needs beyond these (a resolution, a pooling) becomes one more
    explicit keyword argument here and in every module's `build`, never a dict of the config.
    """

    def names(self) -> tuple:
        """The model names it knows (for "did you mean" errors and the models table)."""

    def spec(self, name: str) -> ModelSpec:
        """Mean/std, padding multiple, poolings, text tower, weights: cheap, no weights loaded.
        An unknown `name` raises a one-line UserError."""

    def build(
        self, name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
    ) -> Backbone:
        """The backbone in eval mode on the CPU, its weights loaded once: from `checkpoint` (a local
        file read with weights_only=True or safetensors) if given, else the published weights if
        `pretrained`, else seeded random weights (every actor builds the same ones). Hub code runs
        only with `trust_remote_code`. An unknown `name` raises a one-line UserError."""


def unknown_model(framework_name: str, model: str, candidates) -> UserError:
    close = difflib.get_close_matches(model, list(candidates), n=5, cutoff=0.4)
    hint = f"; nearest: {', '.join(close)}" if close else ""
    return UserError(f"--framework {framework_name} has no model {model!r}{hint}")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hf_cached(
    repo: str,
    filenames=("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"),
) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for f in filenames:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return True
    return False


def url_cached(url: str) -> bool:
    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


def url_hint(url: str) -> str:
    return f"download {url} into {os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass --checkpoint FILE"


def hf_hint(repo: str) -> str:
    return f"download the hub repo {repo} into the HF cache (HF_HOME) or pass --checkpoint FILE"


def load_state_dict(path: str) -> dict:
    """Read a weights file safely: safetensors, or torch.load with weights_only=True."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module", "teacher", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    return obj


def strip_prefixes(sd: dict, prefixes) -> dict:
    """Remove the first matching prefix from each key (checkpoints wrap models differently)."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def load_into(model: torch.nn.Module, sd: dict, path: str, drop=()) -> None:
    """Strict load (after dropping classifier keys); a mismatch is a clear user error."""
    sd = {k: v for k, v in sd.items() if not any(k.startswith(d) for d in drop)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(
            f"--checkpoint {path} does not fit the model: {len(missing)} missing key(s) "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
            f"(e.g. {', '.join(unexpected[:3]) or '-'})"
        )
