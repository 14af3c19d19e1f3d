"""Shared fixtures: one local Ray cluster per test session, one sample dataset, one checkpoint."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster, never one a `ray start` left behind.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    from ilias_ray.sample import build_sample

    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory):
    from ilias_ray.demo import write_random_checkpoint

    return write_random_checkpoint(VIT, tmp_path_factory.mktemp("ckpt") / "vit.safetensors", seed=1)
