"""Evaluate stage: the linear datamodeling score (LDS) on held-out models.

E fresh masks (never used for fitting), each trained R times with different training seeds.
Evaluation model (e, r) is the spec :func:`eval_spec`: its mask is keyed by
(run seed, EVAL_DOMAIN, e) and its training seed by (run seed, EVAL_DOMAIN, e, r), disjoint
from the training models' (run seed, i). They live in the run's ``eval/`` group::

    eval/        attrs: report (the last LDS report)
      models/    a model table (datamodels.table), key (e, r), output test_margins (T,)
      per_target_lds (T,) float32

More masks or repeats add rows; re-running trains only what is missing.

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
from scipy.stats import rankdata

from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.domains import EVAL_DOMAIN
from datamodels.integrity import create_array
from datamodels.runner import run_specs
from datamodels.specs import ModelSpec, Subset
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.train import subset_mask, training_seed

__all__ = ["EVAL_DOMAIN", "lds_report", "eval_spec", "evaluate_run", "read_eval", "eval_mask", "predict"]

log = logging.getLogger(__name__)


def eval_mask(cfg: RunConfig, e: int, n: int) -> np.ndarray:
    return subset_mask(cfg.seed, e, n, cfg.collect.alpha, domain=(EVAL_DOMAIN,))


def eval_spec(cfg: RunConfig, e: int, r: int) -> ModelSpec:
    """Evaluation model (e, r): mask e (shared by its R repeats), training seed (e, r)."""
    return ModelSpec(key=(int(e), int(r)), seed=training_seed(cfg.seed, int(r), domain=(EVAL_DOMAIN, int(e))),
                     subset=Subset.random((cfg.seed, EVAL_DOMAIN, int(e)), cfg.collect.alpha),
                     outputs=("test_margins",))


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


def predict(store: RunStore, masks: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Predicted margins (E, T) of the run's fit ``name`` (default: the current one) for masks
    (E, N): ``bias + masks @ weight`` (a float32 product, the bias added in its stored dtype),
    the weight read one block of targets at a time: memory O(E T + N T_block), never the whole
    (N, T) weight."""
    from datamodels.fit import fit_group, fit_weights

    t = store.dims["T"]
    bias = np.asarray(fit_group(store, name)["bias"][:t])
    x = np.asarray(masks, dtype=np.float32)
    out = np.empty((x.shape[0], t), dtype=np.result_type(bias.dtype, np.float32))
    for cols, w in fit_weights(store, name, targets=t).blocks():
        out[:, cols] = bias[cols] + x @ w
    return out


def read_eval(store: RunStore, masks: int, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``masks`` evaluation masks (E, N) bool and their margins (E, R, T); KeyError
    when a model (e, r) is not in the store, StoreError when one is not complete."""
    from datamodels.errors import StoreError
    from datamodels.table import ModelTable

    table = ModelTable(store.group["eval"]["models"])
    keys = [(e, r) for e in range(masks) for r in range(repeats)]
    rows = table.rows_of(keys)  # e-major: the rows of (e, 0..R-1) are adjacent
    if not table.complete_mask()[rows].all():
        raise StoreError(f"{store.loc}: evaluation models missing; run `datamodels evaluate {store.loc} "
                         f"--masks {masks} --repeats {repeats}`")
    return table.read("masks", rows[::repeats]), table.read("test_margins", rows).reshape(masks, repeats, -1)


def evaluate_run(run: str | Path | Location, *, masks: int | None = None, repeats: int | None = None,
                 address: str | None = None, progress: bool = True, takeover: bool = False,
                 dataset: Dataset | None = None) -> dict:
    """Train the missing evaluation models (E masks x R repeats, default from the run's eval
    config), then report the LDS of the run's fitted datamodels on them. Resumable."""
    from datamodels.config import EvalConfig, config_from_dict
    from datamodels.fit import fit_group

    store = RunStore.open(run)
    cfg = store.config
    cfg = cfg.replace(eval=config_from_dict(  # 0 is refused like any bad value, never "the default"
        EvalConfig, {"masks": cfg.eval.masks if masks is None else masks,
                     "repeats": cfg.eval.repeats if repeats is None else repeats},
        source="evaluate --masks/--repeats", prefix="eval."))
    attrs = dict(fit_group(store).attrs)  # fail before training if nothing is fitted
    dataset = store.dataset(dataset)
    e_n, r_n = cfg.eval.masks, cfg.eval.repeats
    specs = [eval_spec(cfg, e, r) for e in range(e_n) for r in range(r_n)]
    with store.writing(takeover=takeover):
        store.check_writable("eval")
        table = store.table("eval/models", key_names=["e", "r"], outputs=["test_margins"],
                            rows_per_chunk=store.block_size)
        run_specs(store, table, specs, cfg=cfg, dataset=dataset, address=address, progress=progress, desc="eval")
        masks_e, actual = read_eval(store, e_n, r_n)
        finite = np.isfinite(actual).all(axis=(1, 2))  # a mask with a diverged repeat is left out
        if not finite.all():
            log.warning("%d of %d evaluation masks have a diverged model (non-finite margins); left out of the LDS",
                        int((~finite).sum()), e_n)
            if finite.sum() < 2:
                from datamodels.errors import StoreError

                raise StoreError(f"{store.loc}/eval/models: only {int(finite.sum())} of {e_n} evaluation masks have "
                                 "finite margins in every repeat; the LDS needs at least 2 (see `datamodels check "
                                 f"{store.loc}`)")
            masks_e, actual = masks_e[finite], actual[finite]
        pred = predict(store, masks_e)
        report = lds_report(pred, actual)
        report["masks_left_out"] = int((~finite).sum())
        per_target = report.pop("per_target_lds")
        g = store.group["eval"]
        g.attrs["report"] = {**report, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "models_used_for_fit": attrs.get("models_used")}
        create_array(g, "per_target_lds", data=per_target.astype(np.float32), overwrite=True)
    report["models_used_for_fit"] = attrs.get("models_used")
    return report
