"""Shared fixtures: tiny configs that train in a fraction of a second, one Ray per module."""

from __future__ import annotations

import hashlib
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


def new_store(where, cfg, dataset):
    """Create an empty run store as a driver would (under the run's claim); return it opened."""
    from datamodels.claim import DriverClaim
    from datamodels.storage import Location
    from datamodels.store import RunStore

    loc = Location(where)
    with DriverClaim(loc) as claim:
        RunStore.create(loc, cfg, dataset, claim=claim)
    return RunStore.open(loc, mode="r+")


def completed(where) -> int:
    """Complete collect models in the store at ``where`` so far (0 while it does not exist)."""
    from datamodels.store import RunStore

    try:
        return int(RunStore.open(where).complete_mask().sum())
    except Exception:
        return 0


def put_rows(store, cfg, rows):
    """Write hand-made collect rows {i: (test margins (T,), train margins (N,))} through the
    store's collect table, exactly as the driver writes trained models."""
    import numpy as np

    from datamodels.collect import collect_spec
    from datamodels.specs import output_shape

    table = store.models_table()
    specs = [collect_spec(cfg, i) for i in range(max(max(rows) + 1, len(table)))]
    table.plan(specs)
    n = table.dims["N"]
    for i, (test_m, train_m) in sorted(rows.items()):
        res = {"mask": specs[i].subset.mask(n), "test_margins": test_m, "train_margins": train_m, "seconds": 0.0}
        for o in specs[i].outputs:  # logits (the first collect.logit_models models): zeros
            res.setdefault(o, np.zeros(output_shape(o, table.dims), np.float32))
        table.write([i], [res], [specs[i]])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    from datamodels.cluster import shutdown_pool

    shutdown_pool()
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def tree_digest(path) -> str:
    """Hash of every file's name (relative to ``path``) and bytes under ``path``: proves a store
    was left untouched."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, path).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``datamodels ARGV`` in this process: exit status, stdout, stderr."""
    from datamodels import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The single ``error:`` line of ``err`` (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
