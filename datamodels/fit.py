"""Fit stage: one linear datamodel per target from a run's masks and margins (and gradients).

Reads the complete rows of the collect table, leaves out models whose margins are NaN or
infinite (diverged training; counted and reported), and fits them with ``fit.estimator``:
``lasso`` (:func:`datamodels.solver.fit_lasso`, streaming the masks in row blocks), ``ridge``,
``trak`` or ``trak-ridge`` (:mod:`datamodels.estimators`; the TRAK estimators first train their
featurised models through the spec path, table ``trak/p<P>``). See docs/estimators.md.

Where it runs (``resources.fit_on``): in the driver, or as a Ray task on a cluster node with
``resources.fit_cpus/fit_gpus/fit_memory_gb`` (the GPU node, not a CPU-only head). A remote fit
reads the store itself (it must be at a URL or on storage that node mounts) and returns the
arrays; the driver writes them.

The result goes to the run's ``datamodels/`` group::

    datamodels/           attrs: fits = {name: group id} (one fit per name, e.g. per estimator),
                                 current = the name later stages read by default
      <group id>/         attrs: name, fit config, targets, models used, models left out, seconds
        weight   (N, T') float32   raw mask units: prediction = bias + mask @ weight; chunks of
                                    all N rows x a few targets (16 MiB), read by targets (FitWeights)
        bias     (T',)   lam (T',)   val_mse (T',)   nnz (T',)
        lambdas  (L, T')  val_mse_path (L, T')
        rows     (M',) int64        the collect rows the fit used

T' = T test targets, or T + N with ``fit.targets: test+train`` (test columns first). A new fit
is written completely under a new id (the lasso writes its weights there one target block at a
time, so the driver never holds an (N, T') array), then its name is switched to it (one small
write), then the group it replaced is deleted: readers see the old fit or the new one, never a
part. Later stages read the weights by target blocks (:class:`FitWeights`; docs/memory.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from datamodels.config import FitConfig, ResourcesConfig, RunConfig
from datamodels.errors import ConfigError, StoreError
from datamodels.estimators import EstimatorFit, check_size, fit_ridge, fit_trak, mask_stats
from datamodels.integrity import create_array, whole_chunks
from datamodels.solver import EXACT_ROWS, LassoFit, fit_lasso, target_block
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.trak import TRAK_OUTPUTS, trak_scores, trak_spec, trak_table_path

__all__ = ["fit_run", "fit_arrays", "train_trak_models", "trak_table", "save_datamodels", "load_datamodels", "fit_group", "fit_names", "RowView",
           "usable_rows", "fit_weights", "FitWeights", "weight_chunks"]

log = logging.getLogger(__name__)

_WEIGHT_CHUNK_BYTES = 2**24  # one chunk of a stored weight: all N rows, a few targets
_READ_BYTES = 2**28  # targets read at once by FitWeights.blocks


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
    g = store.models_table().group
    arrays = [g["test_margins"]]
    if targets == "test+train":
        arrays.append(g["train_margins"])
    return arrays


def usable_rows(store: RunStore, targets: str = "test", block: int = 4096) -> tuple[np.ndarray, int]:
    """Complete rows whose margins are all finite, and how many complete rows were left out."""
    complete = np.flatnonzero(store.complete_mask())
    keep = np.ones(len(complete), dtype=bool)
    view = RowView(_margin_arrays(store, targets), complete)
    for a in range(0, len(complete), block):
        keep[a : a + block] = np.isfinite(view[a : a + block]).all(axis=1)
    return complete[keep], int((~keep).sum())


def trak_table(store: RunStore, dim: int, *, create: bool = False) -> ModelTable | None:
    """The table of TRAK's featurised models for projection dimension ``dim`` (None if absent)."""
    parent, _, name = trak_table_path(dim).rpartition("/")
    if not create:
        return ModelTable(store.group[parent][name]) if parent in store.group and name in store.group[parent] else None
    return ModelTable.require(store.group.require_group(parent), name, key_names=["m"], outputs=TRAK_OUTPUTS,
                              dims={**store.dims, "P": int(dim)}, rows_per_chunk=1)


def train_trak_models(store: RunStore, run_cfg: RunConfig, *, address: str | None = None, progress: bool = True,
                      dataset=None) -> np.ndarray:
    """Train (or resume) the ``fit.trak_models`` featurised models of ``run_cfg.fit``; return
    their table rows. ``store`` must hold the run's claim."""
    from datamodels.runner import run_specs

    fc = run_cfg.fit
    table = trak_table(store, fc.trak_dim, create=True)
    specs = [trak_spec(run_cfg, m) for m in range(fc.trak_models)]
    run_specs(store, table, specs, cfg=run_cfg, dataset=store.dataset(dataset), address=address,
              progress=progress, desc=f"TRAK models (P={fc.trak_dim})")
    return table.rows_of([s.key for s in specs])


def fit_arrays(where: str | Location, rows: np.ndarray, cfg: FitConfig, seed: int, *,
               progress: Callable[[int, int], None] | None = None,
               trak_rows: np.ndarray | None = None, out=None) -> LassoFit | EstimatorFit:
    """The numerics of the stage: open the run at ``where`` read-only and fit ``rows`` with
    ``cfg.estimator`` (TRAK estimators also read ``trak_rows`` of the TRAK table, whose masks
    and margins join the mask statistics).

    ``out``: an (N, T') array the lasso writes its weights into, one target block at a time
    (the driver passes the new fit's Zarr array, so no (N, T') array is held in memory).

    A plain function, so it runs the same in the driver and as a Ray task on another node.
    """
    try:
        store = RunStore.open(where)
    except StoreError as e:
        raise StoreError(f"fit on {os.uname().nodename}: {e}. A store on a local path is visible only to "
                         "machines that mount it: put it on shared storage or a bucket (s3://...), or set "
                         "resources.fit_on=driver") from None
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    X = RowView([store.models_table().group["masks"]], rows)
    Y = RowView(_margin_arrays(store, cfg.targets), rows)
    if cfg.estimator != "lasso":
        return _fit_estimator(store, X, Y, cfg, device=device, trak_rows=trak_rows)
    n, t = X.shape[1], Y.shape[1]
    chunk = weight_chunks(n, t)[1]
    block = whole_chunks(target_block(n, t, device), chunk)  # whole chunks per target block
    return fit_lasso(
        X, Y, n_lambdas=cfg.n_lambdas, eps=cfg.eps, val_fraction=cfg.val_fraction, seed=seed,
        backend=cfg.backend, device=device, dtype=cfg.dtype, block_rows=cfg.block_rows, tol=cfg.tol,
        patience=cfg.patience, progress=progress, target_block=block, out=out,
    )


def _fit_estimator(store: RunStore, X: RowView, Y: RowView, cfg: FitConfig, *, device: str,
                   trak_rows: np.ndarray | None) -> EstimatorFit:
    sources = [(X, Y)] if len(X.rows) else []
    if cfg.estimator == "ridge":
        return fit_ridge(mask_stats(sources, block_rows=cfg.block_rows), grid=cfg.ridge_grid, device=device)
    table = trak_table(store, cfg.trak_dim)
    if table is None or trak_rows is None or len(trak_rows) == 0:
        raise StoreError(f"{store.loc} has no TRAK models for P={cfg.trak_dim}; run `datamodels fit {store.loc} "
                         f"--estimator {cfg.estimator}`, which trains them")
    g = table.group
    sources.append((RowView([g["masks"]], trak_rows), RowView([g["test_margins"]], trak_rows)))
    stats = mask_stats(sources, block_rows=cfg.block_rows)
    tau = trak_scores((g["train_grads"][int(r)] for r in trak_rows), (g["test_grads"][int(r)] for r in trak_rows),
                      ridge=cfg.trak_ridge, device=device)
    fit = fit_trak(stats, tau, combine=cfg.estimator == "trak-ridge", grid=cfg.ridge_grid, device=device)
    fit.arrays["trak_rows"] = np.asarray(trak_rows)
    return fit


def _where(resources: ResourcesConfig, store: RunStore, address: str | None) -> str:
    if resources.fit_on != "auto":
        return resources.fit_on
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    return "cluster" if joined and not store.loc.local else "driver"


def fit_run(run: str | Path | Location, cfg: FitConfig | None = None, *,
            progress: Callable[[int, int], None] | None = None, resources: ResourcesConfig | None = None,
            address: str | None = None, takeover: bool = False, make_current: bool = True,
            dataset=None) -> dict:
    """Fit datamodels for a run with ``cfg.estimator`` and store them as the run's fit of that
    name (``make_current``: later stages read it by default); return a summary.

    TRAK estimators first train (or resume) their ``fit.trak_models`` featurised models through
    the spec path (table ``trak/p<P>``); ``dataset`` is for hand-made data (tests).

    Raises StoreError when the run has fewer usable models than ``cfg.min_models`` (saying
    how many exist and how many are needed), before anything is computed.
    """
    store = RunStore.open(run)
    run_cfg = store.config
    cfg = cfg or run_cfg.fit
    resources = resources or run_cfg.resources
    if cfg.estimator in ("trak", "trak-ridge") and cfg.targets != "test":
        raise ConfigError(f"fit.targets={cfg.targets}: the {cfg.estimator} estimator fits test targets only "
                          "(TRAK models record no margins on training examples); use lasso or ridge")
    check_size(cfg.estimator, int(store.dims["N"]))
    t0 = time.perf_counter()
    rows, dropped = usable_rows(store, cfg.targets)
    n_complete = len(rows) + dropped
    if dropped:
        log.warning("%d of %d complete models have NaN or infinite margins (diverged) and are left out",
                    dropped, n_complete)
    if len(rows) < cfg.min_models and cfg.estimator not in ("trak", "trak-ridge"):
        raise StoreError(
            f"{store.loc}: {len(rows)} usable models (of {store.requested} requested, {n_complete} complete, "
            f"{dropped} with non-finite margins); fitting needs at least {cfg.min_models} "
            f"(fit.min_models). Train more: datamodels train CONFIG --out {store.loc} --models M"
        )
    if cfg.estimator == "lasso" and cfg.backend == "torch" and cfg.dtype == "float32" and len(rows) > EXACT_ROWS:
        raise ConfigError(f"{store.loc}: {len(rows)} usable models; the lasso's float32 statistics of 0/1 masks are "
                          f"exact up to 2^24 = {EXACT_ROWS} models: set fit.dtype=float64 (twice the memory) or fit "
                          "fewer models")
    where = _where(resources, store, address)
    with store.writing(takeover=takeover):
        store.check_writable("datamodels")  # a read-only run fails here, before any solving
        trak_rows = None
        if cfg.estimator in ("trak", "trak-ridge"):
            run_cfg = dataclasses.replace(run_cfg, fit=cfg, resources=resources)
            trak_rows = train_trak_models(store, run_cfg, address=address, progress=progress is not None,
                                          dataset=dataset)
        if where == "cluster":
            from datamodels import cluster

            cluster.connect(address)
            log.info("fitting as a Ray task (%g CPUs, %g GPUs)", resources.fit_cpus, resources.fit_gpus)
            fn = functools.partial(fit_arrays, trak_rows=trak_rows)
            result = cluster.run_remote(fn, store.loc.url, rows, cfg, run_cfg.seed,
                                        cpus=resources.fit_cpus, gpus=resources.fit_gpus,
                                        memory_gb=resources.fit_memory_gb, wait_timeout=resources.wait_timeout,
                                        what="fit task")
            fit_id = None
        elif cfg.estimator == "lasso":  # weights go straight into the new fit's array, block by block
            n, t = int(store.dims["N"]), sum(int(a.shape[1]) for a in _margin_arrays(store, cfg.targets))
            fit_id, group, out = _new_fit(store, cfg.estimator, n, t)
            try:
                result = fit_arrays(store.loc, rows, cfg, run_cfg.seed, progress=progress, out=out)
            except BaseException:
                _discard(store, fit_id)
                raise
        else:
            fit_id = None
            result = fit_arrays(store.loc, rows, cfg, run_cfg.seed, progress=progress, trak_rows=trak_rows)
        attrs = {
            "estimator": cfg.estimator,
            "fit": asdict(cfg),
            "targets": cfg.targets,
            "num_test_targets": int(store.dims["T"]),
            "models_used": int(len(rows)) + (0 if trak_rows is None else len(trak_rows)),
            "trak_models": 0 if trak_rows is None else int(len(trak_rows)),
            "models_left_out": dropped,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "seconds": time.perf_counter() - t0,
            "ran_on": where,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if isinstance(result, LassoFit) and result.seconds:
            attrs["solver_seconds"] = {k: float(v) for k, v in result.seconds.items()}
        if isinstance(result, LassoFit):
            arrays = {k: getattr(result, k) for k in ("lam", "val_mse", "nnz", "lambdas", "val_mse_path")}
        else:
            arrays = {**result.arrays, "nnz": result.nnz}
        arrays = {**arrays, "rows": rows}
        if fit_id is None:
            save_datamodels(store, result.weight, result.bias, attrs=attrs, arrays=arrays, name=cfg.estimator,
                            make_current=make_current)
        else:
            _publish(store, fit_id, group, result.bias, attrs=attrs, arrays=arrays, name=cfg.estimator,
                     make_current=make_current)
    out = {**attrs, "name": cfg.estimator, "mean_nnz": float(result.nnz.mean())}
    if isinstance(result, LassoFit):
        out["mean_val_mse"] = float(result.val_mse.mean())
    return out


def weight_chunks(n: int, t: int) -> tuple[int, int]:
    """Zarr chunks of a fit's weight (N, T'): all N rows and as many targets as fill 16 MiB
    (69 at N = 60,000), so reading one target or a block of targets decodes only their chunks."""
    n = max(int(n), 1)
    return n, max(1, min(int(t), _WEIGHT_CHUNK_BYTES // (4 * n)))


def _new_fit(store: RunStore, name: str, n: int, t: int) -> tuple[str, zarr.Group, zarr.Array]:
    """A fresh fit group (not yet named: readers do not see it) and its empty weight (N, T')."""
    store.check_claim()
    if not name or "/" in name:
        raise ValueError(f"fit name: expected a non-empty name without '/', got {name!r}")
    root = store.group.require_group("datamodels")
    fit_id = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    g = root.require_group(fit_id)
    weight = create_array(g, "weight", shape=(n, t), chunks=weight_chunks(n, t), dtype="float32", fill_value=0.0)
    return fit_id, g, weight


def _discard(store: RunStore, fit_id: str) -> None:
    """Remove an unfinished fit group (never named, so no reader saw it); best effort."""
    try:
        del store.group["datamodels"][fit_id]
    except Exception as e:  # the next fit removes it anyway
        log.warning("%s: could not remove the unfinished fit %s (%s)", store.loc, fit_id, e)


def _publish(store: RunStore, fit_id: str, g: zarr.Group, bias: np.ndarray, *, attrs: dict,
             arrays: dict[str, np.ndarray] | None, name: str, make_current: bool) -> str:
    """Write the fit's other arrays and attributes, then switch ``name`` to it (one small write)
    and delete the group it replaced."""
    create_array(g, "bias", data=np.asarray(bias))
    for key, value in (arrays or {}).items():
        create_array(g, key, data=np.asarray(value))
    g.attrs.update({**attrs, "name": name})
    store.check_claim()
    root = store.group["datamodels"]
    fits = {**root.attrs.get("fits", {}), name: fit_id}
    current = name if make_current or "current" not in root.attrs else root.attrs["current"]
    root.attrs.update({"fits": fits, "current": current})
    for old in [k for k in root.group_keys() if k not in fits.values()]:
        del root[old]
    return fit_id


def save_datamodels(store: RunStore, weight: np.ndarray, bias: np.ndarray, *, attrs: dict,
                    arrays: dict[str, np.ndarray] | None = None, name: str = "lasso",
                    make_current: bool = True) -> str:
    """Store datamodels (weight (N, T') in raw-mask units, bias (T',)) as the run's fit ``name``.

    A run keeps one fit per name (e.g. per estimator); ``current`` names the one later stages
    read by default. The fit is written under a new id, then the name is switched to it (one
    small write), then what it replaced is deleted: readers see the old fit or the new one.
    ``arrays`` are stored beside them (the solver's lam, val_mse, ...). The store must hold the
    run's claim. Returns the group id.
    """
    n, t = weight.shape
    fit_id, g, arr = _new_fit(store, name, n, t)
    arr[:, :] = np.asarray(weight, dtype=np.float32)
    return _publish(store, fit_id, g, bias, attrs=attrs, arrays=arrays, name=name, make_current=make_current)


def fit_names(store: RunStore) -> list[str]:
    """Names of the run's stored fits (e.g. estimators), the current one first."""
    if "datamodels" not in store.group:
        return []
    root = store.group["datamodels"]
    fits, current = dict(root.attrs.get("fits", {})), root.attrs.get("current")
    return sorted(fits, key=lambda n: (n != current, n))


def fit_group(store: RunStore | str | Path, name: str | None = None) -> zarr.Group:
    """The group of the run's fit ``name`` (default: the current one); StoreError naming the
    command to run when there is none."""
    store = store if isinstance(store, RunStore) else RunStore.open(store)
    root = store.group["datamodels"] if "datamodels" in store.group else None
    fits = dict(root.attrs.get("fits", {})) if root is not None else {}
    name = name or (root.attrs.get("current") if root is not None else None)
    if name is None or name not in fits or fits[name] not in root:
        have = f" (it has: {', '.join(sorted(fits))})" if fits else ""
        what = f"no fit named {name!r}{have}" if name and fits else "no fitted datamodels yet"
        raise StoreError(f"{store.loc} has {what}; run `datamodels fit {store.loc}` first")
    return root[fits[name]]


def load_datamodels(store: RunStore | str | Path, name: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight (N, T'), bias (T',), attrs) of a run's fit ``name`` (default: the current one),
    the weight read whole: for small runs and notebooks. Stages read it by targets
    (:func:`fit_weights`)."""
    g = fit_group(store, name)
    return np.asarray(g["weight"][:]), np.asarray(g["bias"][:]), dict(g.attrs)


def fit_weights(store: RunStore | str | Path, name: str | None = None, *, targets: int | None = None) -> "FitWeights":
    """The weight of a run's fit ``name`` (default: the current one) as a :class:`FitWeights`
    reader over its first ``targets`` columns (default: all T')."""
    return FitWeights(fit_group(store, name)["weight"], targets)


class FitWeights:
    """A stored fit's weight (N, T') float32, read by targets. Each Zarr chunk holds all N rows
    of a few targets (:func:`weight_chunks`), so a column or a block of columns decodes only
    the chunks that hold them, never the whole array.

    Indexes like an array by columns -- ``w[:, t]`` (N,), ``w[:, cols]`` (N, len(cols)),
    ``w[:, a:b]`` -- and :meth:`blocks` walks the targets ~256 MiB at a time. ``targets``
    restricts it to the first columns (the test targets of a test+train fit).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, array: zarr.Array, targets: int | None = None):
        self.array = array
        n, t = (int(v) for v in array.shape)
        self.shape = (n, t if targets is None else min(int(targets), t))

    @property
    def block(self) -> int:
        """Targets :meth:`blocks` reads at once: whole chunks, about 256 MiB."""
        return whole_chunks(_READ_BYTES // (4 * max(self.shape[0], 1)), int(self.array.chunks[1]))

    def columns(self, cols) -> np.ndarray:
        """(N, len(cols)) float32 for target indices ``cols`` in [0, T')."""
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        if cols.size == 0:
            return np.zeros((self.shape[0], 0), dtype=np.float32)
        if cols.min() < 0 or cols.max() >= self.shape[1]:
            raise IndexError(f"target index out of range [0, {self.shape[1]}): {cols[(cols < 0) | (cols >= self.shape[1])][:3]}")
        a, b = int(cols[0]), int(cols[-1]) + 1
        if b - a == len(cols) and np.array_equal(cols, np.arange(a, b)):
            return np.asarray(self.array[:, a:b], dtype=np.float32)
        return np.asarray(self.array.get_orthogonal_selection((slice(None), cols)), dtype=np.float32)

    def blocks(self, cols=None):
        """Yield (targets (B,), weight (N, B)) over ``cols`` (default all) in order."""
        cols = np.arange(self.shape[1]) if cols is None else np.asarray(cols, dtype=np.int64).reshape(-1)
        b = self.block
        for a in range(0, len(cols), b):
            yield cols[a:a + b], self.columns(cols[a:a + b])

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], slice) and key[0] == slice(None)):
            raise TypeError("FitWeights reads whole columns: w[:, t], w[:, cols] or w[:, a:b]")
        c = key[1]
        if isinstance(c, (int, np.integer)):
            return self.columns([int(c)])[:, 0]
        if isinstance(c, slice):
            c = np.arange(self.shape[1])[c]
        return self.columns(c)

    def __array__(self, dtype=None, copy=None):
        a = self.columns(np.arange(self.shape[1]))
        return a if dtype is None else a.astype(dtype)
