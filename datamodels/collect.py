"""Collect stage: train the models a run is missing and write them into its store.

``train_block`` is the plain unit of work (no Ray): a Ray actor, a test or a notebook calls it
the same way. ``collect`` is the driver: it validates, creates or extends the store, and hands
blocks to :mod:`datamodels.cluster`.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable

from datamodels.config import RunConfig
from datamodels.data import Dataset, load_dataset
from datamodels.store import RunStore
from datamodels.train import train_model

__all__ = ["train_block", "collect", "CollectSummary"]

log = logging.getLogger(__name__)


def train_block(dataset: Dataset, cfg: RunConfig, store_path: str, indices: list[int], *,
                after_array: Callable[[str], None] | None = None) -> list[dict]:
    """Train and write every model of ``indices`` that is not complete in the store yet.

    Idempotent: a retried block skips rows a previous attempt completed. Returns one small
    summary per model trained here (index, seconds, test accuracy).
    """
    store = RunStore.open(store_path, mode="r+")
    done = store.complete_mask()
    out = []
    for i in indices:
        if done[i]:
            continue
        result = train_model(dataset, cfg, i)
        store.write_result(result, after_array=after_array)
        summary = {"model": i, "seconds": round(result.seconds, 4),
                   "test_accuracy": result.test_accuracy, "host": socket.gethostname()}
        store.log_event({"event": "complete", **summary})
        out.append(summary)
    return out


class CollectSummary(dict):
    """status() of the store after collecting, plus ``trained`` (indices trained this call)."""


def collect(cfg: RunConfig, out: str | Path, *, address: str | None = None,
            progress: bool = True) -> CollectSummary:
    """Train until the store at ``out`` holds ``cfg.collect.models`` complete models.

    Everything is checked before anything is written: config (already validated), dataset
    (must load), store (compatible config, writable path). Re-running trains only what is
    missing; asking for more models extends the run.
    """
    from datamodels import cluster  # Ray stays out of the science modules

    dataset = load_dataset(cfg.data)
    RunStore.prepare(out, cfg, dataset)
    store = RunStore.create(out, cfg, dataset)
    with store.lock():
        missing = store.missing(cfg.collect.models)
        blocks = store.blocks(missing)
        log.info("%s: %d of %d models missing, %d blocks", out, len(missing), cfg.collect.models, len(blocks))
        trained: list[int] = []
        if blocks:
            tasks = [(tuple(b), train_block, (cfg, str(store.path), b), len(b)) for b in blocks]
            results = cluster.run_tasks(
                tasks, data_cfg=cfg.data, train_cfg=cfg.train, resources=cfg.resources,
                address=address, progress=progress, unit="models", desc="train",
            )
            for res in results.values():
                trained += [r["model"] for r in res]
        summary = CollectSummary(store.status())
        summary["trained"] = sorted(trained)
        return summary
