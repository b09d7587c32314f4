"""Full-set reference models: F models trained on the whole training set (alpha = 1).

They measure what the datamodels cannot: the target's margin when nothing is removed (the
baseline B_x of the brittleness estimates, docs/brittleness.md), the runner-up class of each
target (label flips), and penultimate features (the representation baseline).

Full-set model f is the spec :func:`full_spec`: every training example, seed from
(run seed, FULL_DOMAIN, f). They live in ``full/models`` (a model table, key (f,)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import zarr

from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.domains import FULL_DOMAIN
from datamodels.errors import StoreError
from datamodels.runner import run_specs
from datamodels.specs import ModelSpec, Subset
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.train import training_seed

__all__ = ["FULL_DOMAIN", "FULL_OUTPUTS", "full_spec", "train_full_models", "FullModels", "full_models"]

log = logging.getLogger(__name__)

FULL_OUTPUTS = ("test_margins", "test_logits", "test_features", "train_features")
TABLE = "full/models"


def full_spec(cfg: RunConfig, f: int) -> ModelSpec:
    return ModelSpec(key=(int(f),), seed=training_seed(cfg.seed, int(f), domain=(FULL_DOMAIN,)),
                     subset=Subset.all_but(), outputs=FULL_OUTPUTS)


def _table(store: RunStore) -> ModelTable:
    return store.table(TABLE, key_names=["f"], outputs=FULL_OUTPUTS, rows_per_chunk=1)


def train_full_models(store: RunStore, cfg: RunConfig, dataset: Dataset, *, address: str | None = None,
                      progress: bool = True) -> list[int]:
    """Train the full-set models the run is missing (F = cfg.brittleness.full_models).

    ``store`` must hold the run's claim. Returns the indices trained by this call.
    """
    specs = [full_spec(cfg, f) for f in range(cfg.brittleness.full_models)]
    run = run_specs(store, _table(store), specs, cfg=cfg, dataset=dataset, address=address, progress=progress,
                    desc="full-set models")
    return sorted(k[0] for k in run.trained)


@dataclass(frozen=True)
class FullModels:
    """What the F complete full-set models measured."""

    test_margins: np.ndarray  # (F, T)
    test_logits: np.ndarray  # (F, T, K)
    rows: np.ndarray  # (F,) table rows
    group: zarr.Group

    @property
    def baseline(self) -> np.ndarray:
        """(T,) mean margin B of the full-set models."""
        return self.test_margins.mean(axis=0)

    @property
    def accuracy(self) -> np.ndarray:
        """(T,) fraction of full-set models that classify the target correctly."""
        return (self.test_margins > 0).mean(axis=0)

    def mean_logits(self) -> np.ndarray:
        return self.test_logits.mean(axis=0)

    def features(self, which: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Penultimate features of ``which`` in {"train", "test"}, concatenated over the F
        models: (rows, F * D) float32 (distance = root of the summed squared distances)."""
        arr = self.group[f"{which}_features"]
        parts = [np.asarray(arr[int(f)][rows], dtype=np.float32) for f in self.rows]
        return np.concatenate(parts, axis=-1)


def full_models(store: RunStore) -> FullModels:
    """The complete full-set models; StoreError when there are none."""
    done = np.array([], dtype=np.int64)
    if "full" in store.group and "models" in store.group["full"]:
        table = ModelTable(store.group["full"]["models"])
        done = np.flatnonzero(table.complete_mask())
    if len(done) == 0:
        raise StoreError(f"{store.loc} has no full-set models yet; run `datamodels brittleness {store.loc}` first")
    margins, logits = table.read("test_margins", done), table.read("test_logits", done)
    finite = np.isfinite(margins).all(axis=1) & np.isfinite(logits).all(axis=(1, 2))  # diverged: left out
    if not finite.any():
        raise StoreError(f"{store.loc}/full/models: every full-set model diverged (non-finite margins); see "
                         f"`datamodels check {store.loc}`")
    return FullModels(margins[finite], logits[finite], done[finite], table.group)
