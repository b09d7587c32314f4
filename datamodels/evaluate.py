"""Evaluate stage: the linear datamodeling score (LDS) on held-out models.

E fresh masks (never used for fitting), each trained R times with different training seeds,
stored in the run's ``eval/`` group::

    eval/   attrs: masks E, repeats R, report (the last LDS report)
      masks         (E, N) bool
      test_margins  (E, R, T) float32
      complete      (E, R) bool

The driver writes results as they come back (actors return small arrays), so there is one
writer and no chunk is ever shared. The mask of evaluation model e is keyed by
(run seed, EVAL_DOMAIN, e) and its r-th training seed by (run seed, EVAL_DOMAIN, e, r):
disjoint from the training models' (run seed, i).

LDS (Ilyas et al., 2022): per target, the Spearman correlation across the E masks between the
datamodel's predicted margin and the actual margin averaged over the R repeats; averaged over
targets. The noise ceiling is what a perfect predictor could reach given the repeats: per
target the split-half reliability of the averaged margin (Spearman between the means of two
halves of the repeats, Spearman-Brown corrected to R), and sqrt of it as a correlation bound.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from scipy.stats import rankdata

from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.store import RunStore
from datamodels.train import eval_options, margins, resolve_device, subset_mask, train_on, training_seed

__all__ = ["EVAL_DOMAIN", "lds_report", "train_eval_models", "evaluate_run", "eval_mask"]

log = logging.getLogger(__name__)
EVAL_DOMAIN = 1_000_001


def eval_mask(cfg: RunConfig, e: int, n: int) -> np.ndarray:
    return subset_mask(cfg.seed, e, n, cfg.collect.alpha, domain=(EVAL_DOMAIN,))


def train_eval_models(dataset: Dataset, cfg: RunConfig, items: list[tuple[int, int]]) -> list[tuple]:
    """Work function: train evaluation models (e, r); return [(e, r, test margins (T,))]."""
    device = resolve_device(cfg.train.device)
    out = []
    for e, r in items:
        mask = eval_mask(cfg, e, dataset.num_train)
        model = train_on(dataset, torch.from_numpy(np.flatnonzero(mask)), cfg,
                         training_seed(cfg.seed, r, domain=(EVAL_DOMAIN, e)), device=device)
        m = margins(model, dataset.test_x.to(device), dataset.test_y.to(device),
                    **eval_options(dataset, cfg, device))
        out.append((e, r, m.float().cpu().numpy()))
    return out


def _spearman_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Spearman correlation of (E, T) arrays; NaN where a column is constant."""
    return _pearson_cols(rankdata(a, axis=0), rankdata(b, axis=0))


def _pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), np.nan)


def lds_report(pred: np.ndarray, actual: np.ndarray) -> dict:
    """LDS and friends from predictions (E, T) and actual margins (E, R, T).

    Returns mean (over targets) Spearman = LDS, Pearson, MSE, the split-half reliability of the
    R-averaged actual margins and the noise ceiling sqrt(reliability) (None when R < 2), and the
    per-target LDS (T,). Targets whose actual or predicted margins are constant over the E
    masks have no correlation; they are counted in ``targets_undefined`` and skipped.
    """
    pred = np.asarray(pred, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if pred.ndim != 2 or actual.ndim != 3 or actual.shape[0] != pred.shape[0] or actual.shape[2] != pred.shape[1]:
        raise ValueError(f"expected pred (E, T) and actual (E, R, T); got {pred.shape} and {actual.shape}")
    e, r, t = actual.shape
    avg = actual.mean(axis=1)
    spear = _spearman_cols(pred, avg)
    pear = _pearson_cols(pred, avg)
    ok = np.isfinite(spear)
    report = {
        "E": e, "R": r, "T": t,
        "lds": float(np.nanmean(spear)) if ok.any() else None,
        "pearson": float(np.nanmean(pear)) if ok.any() else None,
        "mse": float(np.mean((pred - avg) ** 2)),
        "targets_undefined": int((~ok).sum()),
        "split_half_reliability": None,
        "noise_ceiling": None,
        "per_target_lds": spear,
    }
    if r >= 2:
        half = r // 2
        sh = _spearman_cols(actual[:, :half].mean(1), actual[:, half : 2 * half].mean(1))
        # Spearman-Brown: reliability of the mean of R repeats from the correlation of two halves.
        # A negative split-half correlation means no reliable signal: reliability 0.
        k = r / (2 * half)
        sh = np.clip(sh, 0.0, 1.0)
        rel = (2 * k * sh) / (1 + (2 * k - 1) * sh)
        report["split_half_reliability"] = float(np.nanmean(rel))
        report["noise_ceiling"] = float(np.nanmean(np.sqrt(np.clip(rel, 0, None))))
    return report


def _open_eval(store: RunStore, cfg: RunConfig, n: int, t: int) -> zarr.Group:
    e, r = cfg.eval.masks, cfg.eval.repeats
    path = store.path / "eval"
    if (path / "zarr.json").is_file():
        g = zarr.open_group(str(path), mode="r+")
        old_e, old_r = g["complete"].shape
        e, r = max(e, old_e), max(r, old_r)
        if (e, r) != (old_e, old_r):  # more masks or repeats: grow, keeping what exists
            g["masks"].resize((e, n))
            g["test_margins"].resize((e, r, t))
            g["complete"].resize((e, r))
            g.attrs.update({"masks": e, "repeats": r})
        return g
    g = zarr.open_group(str(path), mode="w")
    g.create_array("masks", shape=(e, n), chunks=(e, n), dtype=bool, fill_value=False)
    g.create_array("test_margins", shape=(e, r, t), chunks=(e, r, t), dtype="float32", fill_value=np.nan)
    g.create_array("complete", shape=(e, r), chunks=(e, r), dtype=bool, fill_value=False)
    g.attrs.update({"masks": e, "repeats": r, "domain": EVAL_DOMAIN})
    return g


def evaluate_run(run: str | Path, *, masks: int | None = None, repeats: int | None = None,
                 address: str | None = None, progress: bool = True) -> dict:
    """Train the missing evaluation models (E masks x R repeats, default from the run's eval
    config), then report the LDS of the run's fitted datamodels on them. Resumable."""
    from datamodels import cluster
    from datamodels.config import EvalConfig, config_from_dict
    from datamodels.fit import load_datamodels

    store = RunStore.open(run, mode="r+")
    cfg = store.config
    cfg = cfg.replace(eval=config_from_dict(
        EvalConfig, {"masks": masks or cfg.eval.masks, "repeats": repeats or cfg.eval.repeats},
        source="evaluate", prefix="eval."))
    weight, bias, attrs = load_datamodels(store)  # fail before training if nothing is fitted
    ds_info = store.group.attrs["dataset"]
    n, t = ds_info["num_train"], ds_info["num_test"]
    g = _open_eval(store, cfg, n, t)
    e_n, r_n = cfg.eval.masks, cfg.eval.repeats
    with store.lock():
        done = np.asarray(g["complete"][:e_n, :r_n])
        todo = [(e, r) for e in range(e_n) for r in range(r_n) if not done[e, r]]
        if todo:
            step = max(1, store.block_size)
            tasks = [(("eval", a), train_eval_models, (cfg, todo[a : a + step]), len(todo[a : a + step]))
                     for a in range(0, len(todo), step)]

            def write(_key, res):
                for e, r, m in res:
                    g["masks"][e] = eval_mask(cfg, e, n)
                    g["test_margins"][e, r] = m
                    g["complete"][e, r] = True  # last: the flag claims only what is written

            cluster.run_tasks(tasks, data_cfg=cfg.data, train_cfg=cfg.train, resources=cfg.resources,
                              address=address, progress=progress, unit="models", desc="eval",
                              on_result=write)
    masks = np.asarray(g["masks"][:e_n])
    actual = np.asarray(g["test_margins"][:e_n, :r_n])
    pred = bias[None, :t] + masks.astype(np.float32) @ weight[:, :t]
    report = lds_report(pred, actual)
    per_target = report.pop("per_target_lds")
    g.attrs["report"] = {**report, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "models_used_for_fit": attrs.get("models_used")}
    if "per_target_lds" in g:
        del g["per_target_lds"]
    g.create_array("per_target_lds", data=per_target.astype(np.float32))
    report["models_used_for_fit"] = attrs.get("models_used")
    return report
