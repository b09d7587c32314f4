"""Brittleness stage: how few training examples hold each prediction up.

For target x with datamodel weights w (N,) (raw-mask units: the datamodel predicts
``bias + mask @ w`` for a subset mask), rank the training examples by w, largest (most
supportive) first, and estimate for every threshold C <= 0 the smallest k such that removing
the top k drives the predicted margin to C or below (Ilyas et al., 2022, section 4)::

    predicted margin of S \\ R_k = B_x - sum(w[R_k])          (removal)
    predicted margin of S with R_k flipped = B_x - e * sum(w[R_k])   (flip; e = flip_effect)

B_x is the *measured* mean margin of F models trained on the FULL training set, not the
datamodel's extrapolation ``bias + sum(w)``: the datamodel is fitted on alpha = 0.5 subsets and
its extrapolation to alpha = 1 is biased (docs/brittleness.md). The datamodel supplies only the
removal effect.

Layout of ``RUN/brittleness/`` (T targets, C thresholds)::

    brittleness/   attrs: thresholds, flip_effect, flip_label, flip_class, max_k, status_codes,
                          full_models, datamodels (the fit's `created`), updated
      status       (T,)   int8    codes in attrs["status_codes"]: pending, estimated,
                                  misclassified (B_x <= 0), unreachable (no C reached)
      baseline     (T,)   float32 B_x, mean margin of the full-set models
      k_remove     (T, C) int32   smallest k with predicted margin <= C; -1 = not within max_k
      k_flip       (T, C) int32   the same for label flips

The full-set models come from :mod:`datamodels.fullset`, rankings from
:mod:`datamodels.baselines`, the CDF report from :mod:`datamodels.reports`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from datamodels.baselines import baseline_ranking, pixels, rank_examples
from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.domains import FLIP_DOMAIN
from datamodels.errors import ConfigError, StoreError
from datamodels.fit import FitWeights
from datamodels.fullset import FullModels, full_models, train_full_models
from datamodels.integrity import create_array
from datamodels.reports import summarize, write_cdf, write_cdf_comparison
from datamodels.storage import Location
from datamodels.store import RunStore

__all__ = [
    "FLIP_DOMAIN",
    "STATUS",
    "FLIP_RULES",
    "target_datamodels",
    "parse_targets",
    "estimate_k",
    "class_ranking",
    "flip_labels",
    "Analysis",
    "brittleness",
    "read_brittleness",
    "compare_brittleness",
]

log = logging.getLogger(__name__)

# Distinct seed domains: (run seed, domain, ...) never collides with training's (run seed, i)
# or the other stages' (datamodels.evaluate, .fullset, .baselines, .verify).

FLIP_RULES = ("runner-up", "random", "fixed")
STATUS = ("pending", "estimated", "misclassified", "unreachable")
_CODE = {s: i for i, s in enumerate(STATUS)}


# --------------------------------------------------------------------------- inputs


def target_datamodels(store: RunStore) -> tuple[FitWeights, np.ndarray]:
    """(weight (N, T), bias (T,)) of the run's fitted datamodels, test targets only. The weight
    is a :class:`~datamodels.fit.FitWeights` reader: ``weight[:, t]``, ``weight[:, cols]`` and
    ``weight.blocks()`` read only those targets' chunks (never the whole (N, T) array).

    Raises StoreError naming the command to run when the fit stage has not run yet.
    """
    from datamodels.fit import fit_group

    g = fit_group(store)
    arr = g["weight"]
    n, t = store.dims["N"], store.dims["T"]
    if arr.shape[0] != n or arr.shape[1] < t:
        raise StoreError(f"{store.loc}/datamodels: weight has shape {arr.shape}, expected (N={n}, at least "
                         f"T={t}); re-run `datamodels fit {store.loc}`")
    return FitWeights(arr, t), np.asarray(g["bias"][:t]).astype(np.float32)


def parse_targets(spec: str | Sequence[int] | None, num_targets: int) -> np.ndarray:
    """Target indices from ``None``/"all" (every target), a list of ints, or "0,5,10-19".

    Raises ConfigError naming the offending value when an index is outside [0, T).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return np.arange(num_targets)
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ConfigError(f"--targets: expected indices or ranges like 0,5,10-19, got {part!r}")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise ConfigError(f"--targets: range {part!r} is empty (expected A-B with A <= B)")
            out += range(a, b + 1)
        spec = out
    idx = np.asarray(list(spec), dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ConfigError("targets: expected at least one target index, got none")
    bad = idx[(idx < 0) | (idx >= num_targets)]
    if bad.size:
        raise ConfigError(f"targets: expected indices in [0, {num_targets}) (T={num_targets} targets), "
                          f"got {bad[:5].tolist()}")
    return np.unique(idx)


# --------------------------------------------------------------------------- science


def estimate_k(weight: np.ndarray, baseline: np.ndarray, thresholds: Sequence[float], *,
               effect: float = 1.0, max_k: int | None = None, block: int = 256) -> np.ndarray:
    """Smallest k whose removal (or flip, ``effect`` = flip_effect) drives the margin to C.

    weight (N, T) raw-mask units, baseline (T,) full-set margins B. For each target and
    threshold C returns the smallest k in [1, max_k] with ``B - effect * sum(top-k w) <= C``,
    or -1 when no such k exists. Returns (T, C) int32. Targets with ``B <= C`` get the
    smallest k anyway (callers give them the status "misclassified" instead of a size).
    """
    weight = np.asarray(weight)
    n, t = weight.shape
    thresholds = np.asarray(thresholds, dtype=np.float64)
    max_k = n if max_k is None else max(1, min(int(max_k), n))
    out = np.full((t, len(thresholds)), -1, dtype=np.int32)
    for a in range(0, t, block):
        w = np.asarray(weight[:, a : a + block], dtype=np.float64)
        top = -np.sort(-w, axis=0)[:max_k]  # (max_k, b) largest first
        pred = np.asarray(baseline[a : a + block], dtype=np.float64)[None] - effect * np.cumsum(top, axis=0)
        for c, thr in enumerate(thresholds):
            hit = pred <= thr
            out[a : a + block, c] = np.where(hit.any(axis=0), hit.argmax(axis=0) + 1, -1)
    return out


def class_ranking(mean_logits: np.ndarray, label: int) -> np.ndarray:
    """Classes (K,) by the target's mean logit, largest first, the target's own label last.

    Its first entry is the target's runner-up class.
    """
    order = np.argsort(-np.asarray(mean_logits, dtype=np.float64), kind="stable")
    return np.concatenate([order[order != label], [label]])


def flip_labels(original: np.ndarray, *, rule: str, num_classes: int, ranking: np.ndarray | None = None,
                flip_class: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """New labels (k,) for training examples with labels ``original`` (k,); never the original.

    rule "runner-up": the first class of ``ranking`` (see :func:`class_ranking`) that differs
    from the example's label -- the target's runner-up, else the next-ranked class.
    "random": uniform over the K-1 classes other than the example's label (drawn from ``rng``).
    "fixed": ``flip_class``, or ``(flip_class + 1) % K`` for examples already labelled so.
    """
    original = np.asarray(original, dtype=np.int64)
    k = int(num_classes)
    if k < 2:
        raise ConfigError(f"label flips need at least 2 classes, got K={k}")
    if rule == "runner-up":
        if ranking is None:
            raise ValueError("rule 'runner-up' needs the target's class ranking")
        ranking = np.asarray(ranking, dtype=np.int64)
        first, second = ranking[0], ranking[1]
        return np.where(original == first, second, first).astype(np.int64)
    if rule == "random":
        rng = rng if rng is not None else np.random.default_rng()
        draw = rng.integers(0, k - 1, size=original.shape)
        return (draw + (draw >= original)).astype(np.int64)
    if rule == "fixed":
        if not 0 <= flip_class < k:
            raise ConfigError(f"brittleness.flip_class: expected a class in [0, {k}), got {flip_class}")
        return np.where(original == flip_class, (flip_class + 1) % k, flip_class).astype(np.int64)
    raise ConfigError(f"brittleness.flip_label: expected one of {list(FLIP_RULES)}, got {rule!r}")


# --------------------------------------------------------------------------- the stage


@dataclass
class Analysis:
    """Everything the brittleness and verify stages need about a run, loaded once."""

    store: RunStore
    cfg: RunConfig
    weight: FitWeights  # (N, T), read by targets
    bias: np.ndarray  # (T,)
    train_y: np.ndarray  # (N,)
    test_y: np.ndarray  # (T,)
    num_classes: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run: str | Path | Location | RunStore, cfg: RunConfig | None = None) -> "Analysis":
        store = run if isinstance(run, RunStore) else RunStore.open(run)
        cfg = cfg or store.config
        weight, bias = target_datamodels(store)
        ds = store.group.attrs["dataset"]
        return cls(store, cfg, weight, bias, store.read("train_labels"), store.read("test_labels"),
                   len(ds["classes"]))

    @property
    def num_targets(self) -> int:
        return int(self.weight.shape[1])

    def flip_rng(self, target: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, FLIP_DOMAIN, int(target)]))

    def new_labels(self, target: int, ranked: np.ndarray, full: FullModels | None = None) -> np.ndarray:
        """Flip labels for the ranked examples ``ranked`` (a prefix of a ranking; labels of a
        prefix do not depend on its length)."""
        bc = self.cfg.brittleness
        ranking = None
        if bc.flip_label == "runner-up":
            full = full or full_models(self.store)
            ranking = class_ranking(full.mean_logits()[target], int(self.test_y[target]))
        original = self.train_y[ranked]
        if bc.flip_label == "random":
            # Draw for all N positions so a prefix's labels do not depend on its length.
            rng = self.flip_rng(target)
            draw = rng.integers(0, self.num_classes - 1, size=len(self.train_y))[: len(ranked)]
            return (draw + (draw >= original)).astype(np.int64)
        return flip_labels(original, rule=bc.flip_label, num_classes=self.num_classes, ranking=ranking,
                           flip_class=bc.flip_class)

    def fit_weights(self, name: str) -> FitWeights:
        """The weights (N, T) of the run's fit ``name``, read by targets (``w[:, cols]``,
        ``w.blocks(cols)``: only those columns' chunks are read)."""
        from datamodels.fit import fit_weights

        return fit_weights(self.store, name, targets=self.num_targets)

    def ranking(self, target: int, method: str, full: FullModels | None = None,
                dataset: Dataset | None = None) -> np.ndarray:
        """Ranked training indices for ``method`` (see :mod:`datamodels.baselines`)."""
        if method == "datamodel":
            return rank_examples(self.weight[:, target])
        label = int(self.test_y[target])
        kw = dict(train_y=self.train_y, target_label=label, seed=self.cfg.seed)
        if method == "representation":
            if "representation" not in self._cache:  # (N, F*D), read once per Analysis
                full = full or full_models(self.store)
                self._cache["representation"] = (full.features("train"), full.features("test"))
            train_r, test_r = self._cache["representation"]
            return baseline_ranking(method, target, train_repr=train_r, target_repr=test_r[target], **kw)
        if method == "pixel":
            if "pixel" not in self._cache:
                dataset = self.store.dataset(dataset)
                self._cache["pixel"] = (pixels(dataset.train_x), pixels(dataset.test_x))
            train_p, test_p = self._cache["pixel"]
            return baseline_ranking(method, target, train_repr=train_p, target_repr=test_p[target], **kw)
        return baseline_ranking(method, target, **kw)


def _result_group(store: RunStore, t: int, c: int, attrs: dict) -> zarr.Group:
    g = store.group.require_group("brittleness")
    old = g.attrs.get("thresholds")
    if old is not None and "k_remove" in g and (list(old) != list(attrs["thresholds"])
                                                  or g["k_remove"].shape != (t, c)):
        log.info("thresholds changed from %s to %s: estimates recomputed for the targets asked", old,
                 attrs["thresholds"])
        for name in ("k_remove", "k_flip", "status"):
            del g[name]
    specs = {"status": ((t,), "int8", 0), "baseline": ((t,), "float32", np.nan),
             "k_remove": ((t, c), "int32", -1), "k_flip": ((t, c), "int32", -1)}
    for name, (shape, dtype, fill) in specs.items():
        if name not in g:
            create_array(g, name, shape=shape, dtype=dtype, fill_value=fill)
    g.attrs.update(attrs)
    return g


def brittleness(run: str | Path | Location, *, targets: str | Sequence[int] | None = None,
                cfg: RunConfig | None = None, dataset: Dataset | None = None, cdf_path: str | Path | None = None,
                address: str | None = None, progress: bool = True, takeover: bool = False) -> dict:
    """Estimate removal and flip set sizes for ``targets`` (default: all T) and store them.

    Trains the missing full-set models first, then writes ``brittleness/`` and the CDF
    over targets as CSV and PNG (``cdf_path``, a local path or URL without suffix; default next
    to the store, ``<run>_brittleness_cdf.{csv,png}``). ``cfg`` defaults to the store's config
    (its brittleness/resources sections may differ; training settings must not). ``dataset``
    replaces the configured data (it must be what the run was trained on).

    Returns a dict: targets, thresholds, status (names), baseline, k_remove, k_flip (arrays over
    ``targets``), full_models_trained, cdf (paths) and summary (see :func:`reports.summarize`).
    """
    store = RunStore.open(run)
    cfg = cfg or store.config
    an = Analysis.open(store, cfg)
    idx = parse_targets(targets, an.num_targets)
    dataset = store.dataset(dataset)
    bc = cfg.brittleness
    if bc.flip_label == "fixed" and bc.flip_class >= an.num_classes:
        raise ConfigError(f"brittleness.flip_class: expected a class in [0, {an.num_classes}), got {bc.flip_class}")
    cdf_base = _cdf_base(store.loc, cdf_path)
    _check_report_path(cdf_base)
    with store.writing(takeover=takeover):
        store.check_writable("brittleness")
        trained = train_full_models(store, cfg, dataset, address=address, progress=progress)
        full = full_models(store)
        baseline = full.baseline
        thresholds = [float(c) for c in bc.thresholds]
        k_rm = np.empty((len(idx), len(thresholds)), dtype=np.int32)
        k_fl = np.empty_like(k_rm)
        pos = 0
        for cols, w in an.weight.blocks(idx):  # idx is sorted and unique; one block of targets at a time
            sl = slice(pos, pos + len(cols))
            k_rm[sl] = estimate_k(w, baseline[cols], thresholds, max_k=bc.max_k)
            k_fl[sl] = estimate_k(w, baseline[cols], thresholds, effect=bc.flip_effect, max_k=bc.max_k)
            pos += len(cols)
        status = np.where(baseline[idx] <= 0, _CODE["misclassified"],
                          np.where(k_rm[:, 0] < 0, _CODE["unreachable"], _CODE["estimated"])).astype(np.int8)
        mis = status == _CODE["misclassified"]
        k_rm[mis] = -1
        k_fl[mis] = -1
        from datamodels.fit import fit_group

        store.check_claim()
        g = _result_group(store, an.num_targets, len(thresholds), {
            "thresholds": thresholds, "flip_effect": bc.flip_effect, "flip_label": bc.flip_label,
            "flip_class": bc.flip_class, "max_k": bc.max_k if bc.max_k is not None else int(an.weight.shape[0]),
            "status_codes": list(STATUS), "full_models": int(full.test_margins.shape[0]),
            "datamodels": fit_group(store).attrs.get("created"), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        g["baseline"][:] = baseline.astype(np.float32)
        sel = (idx,)
        g["status"].set_orthogonal_selection(sel, status)
        g["k_remove"].set_orthogonal_selection(sel + (slice(None),), k_rm)
        g["k_flip"].set_orthogonal_selection(sel + (slice(None),), k_fl)
    names = [STATUS[s] for s in status]
    result = {"targets": idx, "thresholds": thresholds, "status": names,
              "baseline": baseline[idx], "k_remove": k_rm, "k_flip": k_fl, "full_models_trained": trained}
    result["summary"] = summarize(k_rm, k_fl, names, thresholds)
    result["cdf"] = write_cdf(k_rm, k_fl, names, thresholds, cdf_base)
    return result


def _cdf_base(run: Location, cdf_path, *, verified: bool = False) -> str:
    """Where a CDF report goes (without suffix): ``cdf_path``, else next to the store,
    ``<run>_brittleness_cdf``; the verified figure adds ``_verified`` to a given path and is
    ``<run>_verified_cdf`` by default."""
    if cdf_path is None:
        return run.sibling(f"{run.name}_{'verified' if verified else 'brittleness'}_cdf").url
    text = str(cdf_path)
    base = text[: -4] if text.endswith((".csv", ".png")) else text
    return f"{base}_verified" if verified else base


def _check_report_path(base: str) -> None:
    """Refuse, before any work, a report path (``base``.csv/.png) whose directory cannot take it."""
    loc = Location(base)
    if not loc.local:
        return
    path = Path(loc.url)
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"--cdf {path}: is a directory; expected a path without suffix, e.g. {path}/cdf "
                          "(writes cdf.csv and cdf.png)")
    if not parent.is_dir():
        raise ConfigError(f"--cdf {path}: the directory {parent} does not exist; create it or choose another path")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--cdf {path}: the directory {parent} is not writable; choose another path")


def read_brittleness(store: RunStore) -> dict:
    """The stored estimates over all T targets: status (names), baseline, k_remove, k_flip,
    thresholds. Raises StoreError when the brittleness stage has not run."""
    if "brittleness" not in store.group or "k_remove" not in store.group["brittleness"]:
        raise StoreError(f"{store.loc} has no brittleness estimates yet; "
                         f"run `datamodels brittleness {store.loc}` first")
    g = store.group["brittleness"]
    codes = list(g.attrs["status_codes"])
    return {"status": [codes[s] for s in np.asarray(g["status"][:])], "baseline": np.asarray(g["baseline"][:]),
            "k_remove": np.asarray(g["k_remove"][:]), "k_flip": np.asarray(g["k_flip"][:]),
            "thresholds": list(g.attrs["thresholds"]), "attrs": dict(g.attrs)}


def _run_label(store: RunStore) -> str:
    share = float(getattr(store.config.train, "label_corruption", 0.0) or 0.0)
    return f"{store.loc.name}: " + (f"{share:.0%} labels corrupted" if share > 0 else "clean labels")


def compare_brittleness(runs: Sequence[str | Path | Location], *, labels: Sequence[str] | None = None,
                        thresholds: Sequence[float] | None = None, out: str | Path | None = None) -> dict:
    """The stored brittleness CDFs of two or more runs over the same targets on one figure,
    e.g. a run trained with ``train.label_corruption=0.2`` next to the clean run.

    Reads each run's ``brittleness/`` (nothing is trained); the runs must share their data (the
    dataset fingerprint, so the same T targets). ``labels`` default to the run's name and its
    label corruption; ``thresholds`` default to the C values every run has. Writes ``out.csv``
    and ``out.png`` (default: next to the first run, ``<a>_vs_<b>_brittleness_cdf``). Returns
    runs (label, url, label_corruption, summary per :func:`reports.summarize`), thresholds, cdf.
    """
    if len(runs) < 2:
        raise ConfigError(f"brittleness comparison: expected at least 2 runs, got {len(runs)}")
    stores = [RunStore.open(r) for r in runs]
    if labels is not None and len(labels) != len(stores):
        raise ConfigError(f"--labels: expected one label per run ({len(stores)}), got {len(labels)}")
    fps = [s.group.attrs["dataset"]["fingerprint"] for s in stores]
    for s, fp in zip(stores[1:], fps[1:]):
        if fp != fps[0]:
            raise StoreError(f"{s.loc} was trained on other data than {stores[0].loc} (dataset fingerprint "
                             f"{fp[:12]}... vs {fps[0][:12]}...): their targets differ")
    est = [read_brittleness(s) for s in stores]
    common = [c for c in est[0]["thresholds"] if all(float(c) in map(float, e["thresholds"]) for e in est[1:])]
    if thresholds is None:
        thresholds = common
        if not thresholds:
            raise ConfigError("the runs share no brittleness threshold C: "
                              + "; ".join(f"{s.loc.name}: {e['thresholds']}" for s, e in zip(stores, est)))
    else:
        thresholds = [float(c) for c in thresholds]
        for s, e in zip(stores, est):
            missing = [c for c in thresholds if c not in map(float, e["thresholds"])]
            if missing:
                raise ConfigError(f"--threshold: {s.loc} has estimates for C in {e['thresholds']}, not {missing}")
    labels = list(labels) if labels is not None else [_run_label(s) for s in stores]
    table = [{"label": lab, "k_remove": e["k_remove"], "k_flip": e["k_flip"], "status": e["status"],
              "thresholds": e["thresholds"]} for lab, e in zip(labels, est)]
    if out is None:
        base = stores[0].loc.sibling("_vs_".join(s.loc.name for s in stores) + "_brittleness_cdf").url
    else:
        base = str(out)[: -4] if str(out).endswith((".csv", ".png")) else str(out)
    cdf = write_cdf_comparison(table, thresholds, base)
    rows = []
    for lab, s, e in zip(labels, stores, est):
        cols = [list(map(float, e["thresholds"])).index(float(c)) for c in thresholds]
        rows.append({"label": lab, "run": s.loc.url,
                     "label_corruption": float(getattr(s.config.train, "label_corruption", 0.0) or 0.0),
                     "summary": summarize(e["k_remove"][:, cols], e["k_flip"][:, cols], e["status"], thresholds)})
    return {"runs": rows, "thresholds": [float(c) for c in thresholds], "cdf": cdf}
