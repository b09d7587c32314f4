"""Fit stage: one sparse linear datamodel per target from a run's masks and margins.

Reads the complete rows of the store, leaves out models whose margins are NaN or infinite
(diverged training; counted and reported), and calls :func:`datamodels.solver.fit_lasso`,
which streams the masks in row blocks. The result goes to the run's ``datamodels/`` group::

    datamodels/   attrs: fit config, targets, models used, models left out, seconds
      weight   (N, T') float32   raw mask units: prediction = bias + mask @ weight
      bias     (T',)   lam (T',)   val_mse (T',)   nnz (T',)
      lambdas  (L, T')  val_mse_path (L, T')
      rows     (M',) int64        the store rows the fit used

T' = T test targets, or T + N with ``fit.targets: test+train`` (test columns first). A new fit
is written beside the old one and swapped in only once complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from datamodels.config import FitConfig
from datamodels.errors import StoreError
from datamodels.solver import LassoFit, fit_lasso
from datamodels.store import RunStore

__all__ = ["fit_run", "load_datamodels", "RowView", "usable_rows"]

log = logging.getLogger(__name__)


class RowView:
    """Rows ``rows`` of one or more (M, *) zarr arrays, hstacked, sliceable like an array.

    Lets the solver stream a non-contiguous subset of the store's rows in blocks without
    loading the whole matrix.
    """

    def __init__(self, arrays, rows: np.ndarray):
        self.arrays = list(arrays)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dtype = np.dtype(self.arrays[0].dtype)
        self.shape = (len(self.rows), sum(int(a.shape[1]) for a in self.arrays))

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("RowView supports row slices only")
        sel = self.rows[key]
        if len(sel) == 0:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        parts = [np.asarray(a.get_orthogonal_selection((sel, slice(None)))) for a in self.arrays]
        return parts[0] if len(parts) == 1 else np.hstack(parts)


def _margin_arrays(store: RunStore, targets: str):
    arrays = [store.group["test_margins"]]
    if targets == "test+train":
        arrays.append(store.group["train_margins"])
    return arrays


def usable_rows(store: RunStore, targets: str = "test", block: int = 4096) -> tuple[np.ndarray, int]:
    """Complete rows whose margins are all finite, and how many complete rows were left out."""
    complete = np.flatnonzero(store.complete_mask())
    keep = np.ones(len(complete), dtype=bool)
    view = RowView(_margin_arrays(store, targets), complete)
    for a in range(0, len(complete), block):
        keep[a : a + block] = np.isfinite(view[a : a + block]).all(axis=1)
    return complete[keep], int((~keep).sum())


def fit_run(run: str | Path, cfg: FitConfig | None = None, *,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Fit datamodels for a run and store them; return a summary.

    Raises StoreError when the run has fewer usable models than ``cfg.min_models`` (saying
    how many exist and how many are needed).
    """
    store = RunStore.open(run, mode="r+")
    run_cfg = store.config
    cfg = cfg or run_cfg.fit
    t0 = time.perf_counter()
    rows, dropped = usable_rows(store, cfg.targets)
    n_complete = len(rows) + dropped
    if dropped:
        log.warning("%d of %d complete models have NaN or infinite margins (diverged) and are left out",
                    dropped, n_complete)
    if len(rows) < cfg.min_models:
        raise StoreError(
            f"{store.path}: {len(rows)} usable models (of {store.requested} requested, {n_complete} complete, "
            f"{dropped} with non-finite margins); fitting needs at least {cfg.min_models} "
            f"(fit.min_models). Train more: datamodels train CONFIG --out {store.path} --models M"
        )
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    X = RowView([store.group["masks"]], rows)
    Y = RowView(_margin_arrays(store, cfg.targets), rows)
    result = fit_lasso(
        X, Y, n_lambdas=cfg.n_lambdas, eps=cfg.eps, val_fraction=cfg.val_fraction, seed=run_cfg.seed,
        backend=cfg.backend, device=device, dtype=cfg.dtype, block_rows=cfg.block_rows, tol=cfg.tol,
        patience=cfg.patience, progress=progress,
    )
    seconds = time.perf_counter() - t0
    attrs = {
        "fit": asdict(cfg),
        "targets": cfg.targets,
        "num_test_targets": int(store.group["test_margins"].shape[1]),
        "models_used": int(len(rows)),
        "models_left_out": dropped,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomically(store, result, rows, attrs)
    return {**attrs, "mean_nnz": float(result.nnz.mean()), "mean_val_mse": float(result.val_mse.mean())}


def _write_atomically(store: RunStore, result: LassoFit, rows: np.ndarray, attrs: dict) -> None:
    """Write ``datamodels.tmp/`` completely, then swap it in for ``datamodels/``."""
    final = store.path / "datamodels"
    tmp = store.path / "datamodels.tmp"
    old = store.path / "datamodels.old"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    g = zarr.open_group(str(tmp), mode="w")
    n, t = result.weight.shape
    g.create_array("weight", data=result.weight, chunks=(n, min(t, 1024)))
    for name in ("bias", "lam", "val_mse", "nnz", "lambdas", "val_mse_path"):
        g.create_array(name, data=np.asarray(getattr(result, name)))
    g.create_array("rows", data=rows)
    g.attrs.update(attrs)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def load_datamodels(store: RunStore | str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (N, T'), bias (T',), attrs) of a run's fitted datamodels."""
    store = store if isinstance(store, RunStore) else RunStore.open(store)
    if not (store.path / "datamodels" / "zarr.json").is_file():
        raise StoreError(f"{store.path} has no fitted datamodels yet; run `datamodels fit {store.path}` first")
    g = zarr.open_group(str(store.path / "datamodels"), mode="r")
    return np.asarray(g["weight"][:]), np.asarray(g["bias"][:]), dict(g.attrs)
