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

Layout of ``RUN/brittleness/`` (T targets, C thresholds, F full models, K classes, D features)::

    brittleness/   attrs: thresholds, flip_effect, flip_label, flip_class, max_k, status_codes,
                          datamodels (the fit's `created`), updated
      status       (T,)   int8    codes in attrs["status_codes"]: pending, estimated,
                                  misclassified (B_x <= 0), unreachable (no C reached)
      baseline     (T,)   float32 B_x, mean margin of the full-set models
      k_remove     (T, C) int32   smallest k with predicted margin <= C; -1 = not within max_k
      k_flip       (T, C) int32   the same for label flips
      full/        attrs: domain
        test_margins  (F, T)    float32
        test_logits   (F, T, K) float32   (runner-up class of each target)
        test_features (F, T, D) float16   penultimate layer (representation baseline)
        train_features(F, N, D) float16
        seconds (F,) float32, complete (F,) bool   (complete written last)

The full-set models are trained through :func:`datamodels.cluster.run_tasks`; the actors
return arrays and the driver writes them as each task finishes, so there is one writer.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import zarr

from datamodels.config import RunConfig
from datamodels.data import Dataset, load_dataset
from datamodels.errors import ConfigError, StoreError
from datamodels.store import RunStore
from datamodels.train import (_autocast, _normalise, eval_options, margin_from_logits, resolve_device, train_on,
                              training_seed)

__all__ = [
    "FULL_DOMAIN",
    "BASELINE_DOMAIN",
    "FLIP_DOMAIN",
    "METHODS",
    "STATUS",
    "FLIP_RULES",
    "target_datamodels",
    "parse_targets",
    "rank_examples",
    "estimate_k",
    "class_ranking",
    "flip_labels",
    "baseline_ranking",
    "train_full_model",
    "train_full_models",
    "full_models",
    "Analysis",
    "brittleness",
    "read_brittleness",
    "cdf_table",
    "write_cdf",
    "summarize",
]

log = logging.getLogger(__name__)

# Distinct seed domains: (run seed, domain, ...) never collides with training's (run seed, i)
# or evaluation's (run seed, 1_000_001, ...).
FULL_DOMAIN = 1_000_002
BASELINE_DOMAIN = 1_000_004  # random-baseline rankings
FLIP_DOMAIN = 1_000_005  # random flip labels

METHODS = ("datamodel", "representation", "pixel", "random")
FLIP_RULES = ("runner-up", "random", "fixed")
STATUS = ("pending", "estimated", "misclassified", "unreachable")
_CODE = {s: i for i, s in enumerate(STATUS)}


# --------------------------------------------------------------------------- inputs


def target_datamodels(store: RunStore) -> tuple[np.ndarray, np.ndarray]:
    """(weight (N, T), bias (T,)) of the run's fitted datamodels, test targets only.

    Raises StoreError naming the command to run when the fit stage has not run yet.
    """
    from datamodels.fit import load_datamodels

    weight, bias, _ = load_datamodels(store)
    t = int(store.group["test_margins"].shape[1])
    if weight.shape[0] != store.group["masks"].shape[1] or weight.shape[1] < t:
        raise StoreError(f"{store.path}/datamodels: weight has shape {weight.shape}, expected "
                         f"(N={store.group['masks'].shape[1]}, at least T={t}); re-run `datamodels fit {store.path}`")
    return weight[:, :t].astype(np.float32), bias[:t].astype(np.float32)


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


def rank_examples(weight_t: np.ndarray) -> np.ndarray:
    """Training indices (N,) by datamodel weight, most supportive (largest) first.

    Ties keep index order (a stable sort), so the ranked set of size k is reproducible.
    """
    return np.argsort(-np.asarray(weight_t, dtype=np.float64), kind="stable")


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


def _pixels(x: torch.Tensor) -> np.ndarray:
    return x.reshape(x.shape[0], -1).numpy().astype(np.float32) / 255.0


def baseline_ranking(method: str, target: int, *, train_y: np.ndarray, target_label: int, seed: int,
                     train_repr: np.ndarray | None = None, target_repr: np.ndarray | None = None) -> np.ndarray:
    """Training indices of the target's class, ordered by a baseline heuristic.

    "representation"/"pixel": Euclidean distance of ``train_repr`` (N, D) to ``target_repr``
    (D,) -- penultimate features of the full-set models, or raw pixels -- closest first.
    "random": a permutation seeded by (run seed, BASELINE_DOMAIN, target).
    Only examples labelled like the target are candidates: their removal is what can lower the
    target's margin (removing a near neighbour of another class would raise it).
    """
    same = np.flatnonzero(np.asarray(train_y) == target_label)
    if method == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, BASELINE_DOMAIN, int(target)]))
        return same[rng.permutation(len(same))]
    if method in ("representation", "pixel"):
        d = np.linalg.norm(np.asarray(train_repr[same], dtype=np.float64)
                           - np.asarray(target_repr, dtype=np.float64)[None], axis=1)
        return same[np.argsort(d, kind="stable")]
    raise ConfigError(f"method: expected one of {list(METHODS[1:])} for a baseline, got {method!r}")


# --------------------------------------------------------------------------- full-set models


@torch.no_grad()
def _logits_features(model, x, *, mean, std, tta_flip, precision, batch_size=1024):
    """Logits (B, K) (averaged over the width flip with ``tta_flip``) and penultimate features
    (B, D) of the unflipped images."""
    body, head = model.net[:-1], model.net[-1]
    logits, feats = [], []
    for a in range(0, x.shape[0], batch_size):
        xb = _normalise(x[a : a + batch_size], mean, std)
        with _autocast(xb.device, precision):
            f = body(xb).float()
            lg = (head(f) * model.scale_out).float()
            if tta_flip:
                lg = 0.5 * (lg + model(xb.flip(-1)).float())
        logits.append(lg)
        feats.append(f)
    return torch.cat(logits), torch.cat(feats)


def train_full_model(dataset: Dataset, cfg: RunConfig, f: int, data: Dataset | None = None) -> dict:
    """Work function: train full-set model ``f`` (all N examples, alpha = 1).

    Its seed derives from (run seed, FULL_DOMAIN, f). ``data`` replaces the actor's dataset
    (tests with hand-made data). Returns test margins (T,), test logits (T, K) and penultimate
    features of the test (T, D) and training (N, D) images.
    """
    dataset = data if data is not None else dataset
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = train_on(dataset, torch.arange(dataset.num_train), cfg,
                     training_seed(cfg.seed, f, domain=(FULL_DOMAIN,)), device=device)
    kw = eval_options(dataset, cfg, device)
    logits, test_f = _logits_features(model, dataset.test_x.to(device), **kw)
    _, train_f = _logits_features(model, dataset.train_x.to(device), **kw)
    m = margin_from_logits(logits, dataset.test_y.to(device))
    return {"f": f, "test_margins": m.cpu().numpy().astype(np.float32),
            "test_logits": logits.cpu().numpy().astype(np.float32),
            "test_features": test_f.cpu().numpy().astype(np.float16),
            "train_features": train_f.cpu().numpy().astype(np.float16),
            "seconds": time.perf_counter() - t0}


def _full_group(store: RunStore, f: int, t: int, k: int, n: int, d: int) -> zarr.Group:
    g = store.group.require_group("brittleness").require_group("full")
    shapes = {"test_margins": ((f, t), "float32", np.nan), "test_logits": ((f, t, k), "float32", np.nan),
              "test_features": ((f, t, d), "float16", 0), "train_features": ((f, n, d), "float16", 0),
              "seconds": ((f,), "float32", np.nan), "complete": ((f,), "bool", False)}
    for name, (shape, dtype, fill) in shapes.items():
        if name not in g:
            g.create_array(name, shape=shape, chunks=(1,) + shape[1:], dtype=dtype, fill_value=fill)
        elif g[name].shape[0] < f:
            g[name].resize((f,) + g[name].shape[1:])
    g.attrs.update({"domain": FULL_DOMAIN})
    return g


def train_full_models(store: RunStore, cfg: RunConfig, dataset: Dataset, *, data: Dataset | None = None,
                      address: str | None = None, progress: bool = True) -> list[int]:
    """Train the full-set models ``brittleness/full`` is missing (F = cfg.brittleness.full_models).

    Resumable: a model counts once its ``complete`` flag is written (after its arrays).
    Returns the indices trained by this call.
    """
    from datamodels import cluster  # Ray stays out of the science

    f_total = cfg.brittleness.full_models
    d = int(cfg.model.widths[3])
    g = _full_group(store, f_total, dataset.num_test, dataset.num_classes, dataset.num_train, d)
    done = np.asarray(g["complete"][:], dtype=bool)
    missing = [i for i in range(f_total) if not done[i]]
    if not missing:
        return []
    log.info("%s: training %d of %d full-set models", store.path, len(missing), f_total)

    def write(key, res):
        i = res["f"]
        for name in ("test_margins", "test_logits", "test_features", "train_features"):
            g[name][i] = res[name]
        g["seconds"][i] = np.float32(res["seconds"])
        g["complete"][i] = True

    tasks = [(("full", i), train_full_model, (cfg, i, data), 1) for i in missing]
    cluster.run_tasks(tasks, data_cfg=cfg.data, train_cfg=cfg.train, resources=cfg.resources,
                      address=address, progress=progress, unit="models", desc="full-set models",
                      on_result=write)
    return missing


@dataclass(frozen=True)
class FullModels:
    """What the full-set models measured (F complete models)."""

    test_margins: np.ndarray  # (F, T)
    test_logits: np.ndarray  # (F, T, K)
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
        done = np.flatnonzero(np.asarray(self.group["complete"][:]))
        parts = [np.asarray(arr[int(f)][rows], dtype=np.float32) for f in done]
        return np.concatenate(parts, axis=-1)


def full_models(store: RunStore) -> FullModels:
    """The complete full-set models of ``brittleness/full``; StoreError when there are none."""
    try:
        g = store.group["brittleness"]["full"]
    except KeyError:
        g = None
    done = np.flatnonzero(np.asarray(g["complete"][:])) if g is not None else np.array([], int)
    if len(done) == 0:
        raise StoreError(f"{store.path} has no full-set models yet; run `datamodels brittleness {store.path}` first")
    return FullModels(np.asarray(g["test_margins"].get_orthogonal_selection((done,))),
                      np.asarray(g["test_logits"].get_orthogonal_selection((done,))), g)


# --------------------------------------------------------------------------- the stage


@dataclass
class Analysis:
    """Everything the brittleness and verify stages need about a run, loaded once."""

    store: RunStore
    cfg: RunConfig
    weight: np.ndarray  # (N, T)
    bias: np.ndarray  # (T,)
    train_y: np.ndarray  # (N,)
    test_y: np.ndarray  # (T,)
    num_classes: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run: str | Path | RunStore, cfg: RunConfig | None = None, *, mode: str = "r") -> "Analysis":
        store = run if isinstance(run, RunStore) else RunStore.open(run, mode=mode)
        cfg = cfg or store.config
        weight, bias = target_datamodels(store)
        ds = store.group.attrs["dataset"]
        return cls(store, cfg, weight, bias, store.read("train_labels"), store.read("test_labels"),
                   len(ds["classes"]))

    @property
    def num_targets(self) -> int:
        return int(self.weight.shape[1])

    def datamodel_ranking(self, target: int) -> np.ndarray:
        return rank_examples(self.weight[:, target])

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

    def ranking(self, target: int, method: str, full: FullModels | None = None,
                dataset: Dataset | None = None) -> np.ndarray:
        """Ranked training indices for ``method`` (see :func:`baseline_ranking`)."""
        if method == "datamodel":
            return self.datamodel_ranking(target)
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
                dataset = dataset if dataset is not None else load_dataset(self.cfg.data)
                self._cache["pixel"] = (_pixels(dataset.train_x), _pixels(dataset.test_x))
            train_p, test_p = self._cache["pixel"]
            return baseline_ranking(method, target, train_repr=train_p, target_repr=test_p[target], **kw)
        return baseline_ranking(method, target, **kw)


def _check_dataset(store: RunStore, dataset: Dataset) -> None:
    fp = store.group.attrs["dataset"]["fingerprint"]
    if fp != dataset.fingerprint():
        raise StoreError(f"{store.path} was trained on other data (dataset fingerprint {fp[:12]}..., "
                         f"the data given has {dataset.fingerprint()[:12]}...)")


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
            g.create_array(name, shape=shape, dtype=dtype, fill_value=fill)
    g.attrs.update(attrs)
    return g


def brittleness(run: str | Path, *, targets: str | Sequence[int] | None = None, cfg: RunConfig | None = None,
                dataset: Dataset | None = None, cdf_path: str | Path | None = None,
                address: str | None = None, progress: bool = True) -> dict:
    """Estimate removal and flip set sizes for ``targets`` (default: all T) and store them.

    Trains the missing full-set models first (Ray), then writes ``brittleness/`` and the CDF
    over targets as CSV and PNG (``cdf_path`` without suffix; default next to the store,
    ``<run>_brittleness_cdf.{csv,png}``). ``cfg`` defaults to the store's config (its
    brittleness/resources sections may differ; training settings must not). ``dataset``
    replaces the configured data (it must be what the run was trained on).

    Returns a dict: targets, thresholds, status (names), baseline, k_remove, k_flip (arrays over
    ``targets``), full_models_trained, cdf (paths) and summary (see :func:`summarize`).
    """
    store = RunStore.open(run, mode="r+")
    cfg = cfg or store.config
    an = Analysis.open(store, cfg)
    idx = parse_targets(targets, an.num_targets)
    given = dataset
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    _check_dataset(store, dataset)
    bc = cfg.brittleness
    if bc.flip_label == "fixed" and bc.flip_class >= an.num_classes:
        raise ConfigError(f"brittleness.flip_class: expected a class in [0, {an.num_classes}), got {bc.flip_class}")
    with store.lock():
        trained = train_full_models(store, cfg, dataset, data=given, address=address, progress=progress)
        full = full_models(store)
        baseline = full.baseline
        thresholds = [float(c) for c in bc.thresholds]
        w = an.weight if len(idx) == an.num_targets else an.weight[:, idx]  # idx is sorted and unique
        k_rm = estimate_k(w, baseline[idx], thresholds, max_k=bc.max_k)
        k_fl = estimate_k(w, baseline[idx], thresholds, effect=bc.flip_effect, max_k=bc.max_k)
        status = np.where(baseline[idx] <= 0, _CODE["misclassified"],
                          np.where(k_rm[:, 0] < 0, _CODE["unreachable"], _CODE["estimated"])).astype(np.int8)
        mis = status == _CODE["misclassified"]
        k_rm[mis] = -1
        k_fl[mis] = -1
        dm_attrs = dict(store.group["datamodels"].attrs)
        g = _result_group(store, an.num_targets, len(thresholds), {
            "thresholds": thresholds, "flip_effect": bc.flip_effect, "flip_label": bc.flip_label,
            "flip_class": bc.flip_class, "max_k": bc.max_k if bc.max_k is not None else int(an.weight.shape[0]),
            "status_codes": list(STATUS), "full_models": int(full.test_margins.shape[0]),
            "datamodels": dm_attrs.get("created"), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        g["baseline"][:] = baseline.astype(np.float32)
        sel = (idx,)
        g["status"].set_orthogonal_selection(sel, status)
        g["k_remove"].set_orthogonal_selection(sel + (slice(None),), k_rm)
        g["k_flip"].set_orthogonal_selection(sel + (slice(None),), k_fl)
    result = {"targets": idx, "thresholds": thresholds, "status": [STATUS[s] for s in status],
              "baseline": baseline[idx], "k_remove": k_rm, "k_flip": k_fl, "full_models_trained": trained}
    result["summary"] = summarize(k_rm, k_fl, status, thresholds)
    result["cdf"] = write_cdf(k_rm, k_fl, status, thresholds, _cdf_base(store.path, cdf_path))
    return result


def _cdf_base(run: Path, cdf_path) -> Path:
    if cdf_path is None:
        return run.parent / f"{run.name}_brittleness_cdf"
    p = Path(cdf_path)
    return p.with_suffix("") if p.suffix in (".csv", ".png") else p


def read_brittleness(store: RunStore) -> dict:
    """The stored estimates over all T targets: status (names), baseline, k_remove, k_flip,
    thresholds. Raises StoreError when the brittleness stage has not run."""
    if "brittleness" not in store.group or "k_remove" not in store.group["brittleness"]:
        raise StoreError(f"{store.path} has no brittleness estimates yet; "
                         f"run `datamodels brittleness {store.path}` first")
    g = store.group["brittleness"]
    codes = list(g.attrs["status_codes"])
    return {"status": [codes[s] for s in np.asarray(g["status"][:])], "baseline": np.asarray(g["baseline"][:]),
            "k_remove": np.asarray(g["k_remove"][:]), "k_flip": np.asarray(g["k_flip"][:]),
            "thresholds": list(g.attrs["thresholds"]), "attrs": dict(g.attrs)}


# --------------------------------------------------------------------------- CDF


def cdf_table(k: np.ndarray, status: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of targets brittle to at most k, for k = 1..max found: (ks (L,), frac (L, C)).

    The denominator is every target the full-set models classify correctly on average
    (status estimated or unreachable); unreachable targets never count as brittle.
    """
    status = np.asarray(status)
    keep = (status == _CODE["estimated"]) | (status == _CODE["unreachable"])
    kk = np.asarray(k)[keep]
    denom = max(1, int(keep.sum()))
    found = kk[kk > 0]
    top = int(found.max()) if found.size else 1
    ks = np.arange(1, top + 1)
    frac = np.stack([((kk[:, c][None] > 0) & (kk[:, c][None] <= ks[:, None])).sum(axis=1) / denom
                     for c in range(len(thresholds))], axis=1)
    return ks, frac


def summarize(k_remove: np.ndarray, k_flip: np.ndarray, status: np.ndarray, thresholds: Sequence[float]) -> dict:
    """Counts and CDF quantiles: for each mode and threshold, the k below which 10/25/50% of the
    correctly classified targets are brittle (None where fewer targets are brittle at all), and
    the fraction brittle to at most 1, 10, 100 examples."""
    status = np.asarray(status)
    out = {"targets": int(len(status)), **{s: int((status == _CODE[s]).sum()) for s in STATUS[1:]}}
    keep = (status == _CODE["estimated"]) | (status == _CODE["unreachable"])
    for mode, k in (("remove", k_remove), ("flip", k_flip)):
        rows = {}
        for c, thr in enumerate(thresholds):
            kk = np.asarray(k)[keep, c].astype(np.float64)
            kk[kk < 0] = np.inf
            q = {f"q{int(p * 100)}": (None if not kk.size or not np.isfinite(np.quantile(kk, p, method="higher"))
                                      else int(np.quantile(kk, p, method="higher"))) for p in (0.1, 0.25, 0.5)}
            frac = {f"frac_le_{m}": (float((kk <= m).mean()) if kk.size else None) for m in (1, 10, 100)}
            rows[f"{thr:g}"] = {**q, **frac}
        out[mode] = rows
    return out


def write_cdf(k_remove: np.ndarray, k_flip: np.ndarray, status: np.ndarray, thresholds: Sequence[float],
              base: str | Path) -> dict:
    """Write ``base.csv`` (k, then remove/flip columns per threshold) and ``base.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    ks_r, fr_r = cdf_table(k_remove, status, thresholds)
    ks_f, fr_f = cdf_table(k_flip, status, thresholds)
    top = max(int(ks_r[-1]), int(ks_f[-1]))
    ks = np.arange(1, top + 1)

    def pad(ks_m, fr):
        full = np.empty((top, fr.shape[1]))
        full[: len(ks_m)] = fr
        full[len(ks_m):] = fr[-1]
        return full

    table = np.hstack([ks[:, None], pad(ks_r, fr_r), pad(ks_f, fr_f)])
    header = ",".join(["k"] + [f"remove_C={t:g}" for t in thresholds] + [f"flip_C={t:g}" for t in thresholds])
    csv = base.with_suffix(".csv")
    np.savetxt(csv, table, delimiter=",", header=header, comments="", fmt=["%d"] + ["%.6f"] * (table.shape[1] - 1))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, fr, title in ((axes[0], pad(ks_r, fr_r), "removal"), (axes[1], pad(ks_f, fr_f), "label flip")):
        for c, thr in enumerate(thresholds):
            ax.step(ks, fr[:, c], where="post", label=f"C = {thr:g}")
        ax.set_xscale("log")
        ax.set_xlabel(f"k (training examples {'removed' if title == 'removal' else 'flipped'})")
        ax.set_title(f"brittleness to {title} (estimated)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of targets brittle to <= k")
    axes[1].legend()
    fig.tight_layout()
    png = base.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"csv": str(csv), "png": str(png)}
