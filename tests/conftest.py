"""Shared fixtures: tiny configs that train in a fraction of a second, one Ray per module."""

from __future__ import annotations

import os

import pytest
import torch

from datamodels.config import load_config

torch.set_num_threads(1)

TINY = [
    "name=tiny",
    "data.train_size=120",
    "model.widths=[4, 8, 8, 8]",
    "train.epochs=2",
    "train.batch_size=32",
    "collect.models=8",
    "collect.block_size=4",
]


def tiny_config(*overrides: str):
    """A digits config small enough for tests: N=120, T=1677, 2 epochs, 4-8 channels."""
    return load_config(None, TINY + list(overrides))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
