"""Verify stage: retrain on the modified FULL training set and check the target really flips.

For target x, mode (remove | flip) and method (datamodel | representation | pixel | random),
the k schedule is the brittleness estimate's k for each threshold C (``k_remove`` or
``k_flip``, highest C first; baselines use the datamodel's schedule). The search is coarse:
check the first k; when the check fails (x is still classified correctly on average) move to
the next threshold's k; stop at the first success or after ``verify.rounds`` checks.

A check trains K fresh models on S minus the set (remove) or on S with the set's labels
flipped (flip), each seeded by (run seed, VERIFY_DOMAIN, target, mode, method, k, j), and
succeeds when the mean margin of x over the K models is below 0.

Layout (one subgroup per check, keyed by (target, mode, method, k))::

    verify/<mode>/<method>/t<target>/k<k>/
        attrs: target, mode, method, k, thresholds (the C values whose estimate gave k),
               created, done, success, mean_margin, frac_misclassified, models
        indices     (k,) int64   the exact training examples removed or flipped
        new_labels  (k,) int64   flip mode only
        margins     (K,) float32 the target's margin under each model (NaN until trained)
        seconds     (K,) float32

The driver creates a check's group before training and writes each model's margin as its task
returns (``run_tasks(on_result=...)``): one writer, and an interrupted run keeps every model
that finished. A check is done once all K margins are written; done checks are never
retrained, unfinished ones train only their missing models. Asking for more models (K) than a
check has extends it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import zarr

from datamodels.brittleness import (
    METHODS,
    Analysis,
    _check_dataset,
    full_models,
    parse_targets,
    read_brittleness,
)
from datamodels.config import RunConfig
from datamodels.data import Dataset, load_dataset
from datamodels.errors import ConfigError, StoreError
from datamodels.store import RunStore
from datamodels.train import eval_options, margins, resolve_device, train_on, training_seed

__all__ = [
    "VERIFY_DOMAIN",
    "SAMPLE_DOMAIN",
    "MODES",
    "check_path",
    "check_seed",
    "k_schedule",
    "train_check_model",
    "verify",
    "read_checks",
    "verified_k",
    "sample_targets",
    "success_rate",
]

log = logging.getLogger(__name__)

VERIFY_DOMAIN = 1_000_003
SAMPLE_DOMAIN = 1_000_006  # targets sampled by the main job
MODES = ("remove", "flip")


def check_path(target: int, mode: str, method: str, k: int) -> str:
    """Path of a check's group inside ``verify/``."""
    return f"{mode}/{method}/t{int(target)}/k{int(k)}"


def check_seed(seed: int, target: int, mode: str, method: str, k: int, j: int) -> int:
    """Training seed of model j of a check: (run seed, VERIFY_DOMAIN, target, mode, method, k, j)."""
    return training_seed(seed, j, domain=(VERIFY_DOMAIN, int(target), MODES.index(mode), METHODS.index(method), int(k)))


def k_schedule(k_row: Sequence[int], thresholds: Sequence[float], rounds: int) -> list[tuple[int, list[float]]]:
    """The distinct k of a target's estimates (highest threshold first), at most ``rounds``.

    Returns [(k, thresholds giving k)]; unreachable estimates (-1) are left out.
    """
    out: list[tuple[int, list[float]]] = []
    for k, c in zip(k_row, thresholds):
        k = int(k)
        if k <= 0:
            continue
        if out and out[-1][0] == k:
            out[-1][1].append(float(c))
        elif all(k != o[0] for o in out):
            out.append((k, [float(c)]))
    return out[:rounds]


def train_check_model(dataset: Dataset, cfg: RunConfig, target: int, mode: str, indices: np.ndarray,
                      new_labels: np.ndarray | None, seed: int, key: tuple, data: Dataset | None = None) -> dict:
    """Work function: train one model on the modified full training set; return the target's margin.

    remove: all N examples but ``indices``. flip: all N with ``new_labels`` at ``indices``.
    ``data`` replaces the actor's dataset (tests with hand-made data).
    """
    dataset = data if data is not None else dataset
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    n = dataset.num_train
    labels = None
    if mode == "remove":
        keep = np.ones(n, dtype=bool)
        keep[np.asarray(indices, dtype=np.int64)] = False
        train_idx = torch.from_numpy(np.flatnonzero(keep))
    else:
        train_idx = torch.arange(n)
        labels = dataset.train_y.clone()
        labels[torch.as_tensor(np.asarray(indices, dtype=np.int64))] = torch.as_tensor(
            np.asarray(new_labels, dtype=np.int64))
    model = train_on(dataset, train_idx, cfg, seed, labels=labels, device=device)
    m = margins(model, dataset.test_x[target : target + 1].to(device), dataset.test_y[target : target + 1].to(device),
                **eval_options(dataset, cfg, device))
    return {"key": key, "margin": float(m[0]), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- records


def _finalize(g: zarr.Group) -> dict:
    m = np.asarray(g["margins"][:], dtype=np.float64)
    attrs = {"done": True, "models": int(len(m)), "mean_margin": float(m.mean()),
             "frac_misclassified": float((m < 0).mean()), "success": bool(m.mean() < 0),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    g.attrs.update(attrs)
    return attrs


def _record(g: zarr.Group) -> dict:
    a = dict(g.attrs)
    rec = {k: a.get(k) for k in ("target", "mode", "method", "k", "thresholds", "created", "done", "success",
                                  "mean_margin", "frac_misclassified", "models")}
    rec["indices"] = np.asarray(g["indices"][:]).tolist()
    rec["new_labels"] = np.asarray(g["new_labels"][:]).tolist() if "new_labels" in g else None
    rec["margins"] = [None if not np.isfinite(v) else float(v) for v in np.asarray(g["margins"][:])]
    return rec


def read_checks(store: RunStore, *, target: int | None = None, mode: str | None = None,
                method: str | None = None) -> list[dict]:
    """Every recorded check (optionally filtered), as dicts, sorted by (target, mode, method, k)."""
    if "verify" not in store.group:
        return []
    out = []
    root = store.group["verify"]
    for md in [mode] if mode else MODES:
        for me in [method] if method else METHODS:
            path = f"{md}/{me}"
            if path not in root:
                continue
            mg = root[path]
            tnames = [f"t{target}"] if target is not None else [n for n, _ in mg.groups()]
            for tn in tnames:
                if tn not in mg:
                    continue
                for _, g in mg[tn].groups():
                    out.append(_record(g))
    return sorted(out, key=lambda r: (r["target"], MODES.index(r["mode"]), METHODS.index(r["method"]), r["k"]))


def verified_k(checks: list[dict]) -> int | None:
    """Smallest k among done, successful checks (one target, mode and method), else None."""
    ks = [c["k"] for c in checks if c.get("done") and c.get("success")]
    return min(ks) if ks else None


def success_rate(results: list[dict]) -> dict:
    """Over verify() results: targets checked, verified, and the verified fraction."""
    checked = [r for r in results if r["status"] in ("verified", "not verified")]
    ok = sum(r["status"] == "verified" for r in checked)
    return {"checked": len(checked), "verified": ok, "rate": ok / len(checked) if checked else None,
            "skipped": len(results) - len(checked)}


def sample_targets(store: RunStore, n: int, *, seed: int | None = None) -> list[int]:
    """``n`` targets drawn (seeded by (run seed, SAMPLE_DOMAIN)) among those with an estimate."""
    est = read_brittleness(store)
    ok = np.flatnonzero(np.asarray(est["status"]) == "estimated")
    seed = store.config.seed if seed is None else seed
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLE_DOMAIN]))
    return sorted(int(t) for t in rng.choice(ok, size=min(n, len(ok)), replace=False)) if len(ok) else []


# --------------------------------------------------------------------------- the stage


def _open_check(root: zarr.Group, target: int, mode: str, method: str, k: int, thresholds: list[float],
                indices: np.ndarray, new_labels: np.ndarray | None, models: int) -> zarr.Group:
    """The check's group, created (or extended to ``models``) as needed. A stale record (another
    index set, e.g. after a re-fit) is replaced."""
    path = check_path(target, mode, method, k)
    if path in root:
        g = root[path]
        same = np.array_equal(np.asarray(g["indices"][:]), indices) and (
            new_labels is None or ("new_labels" in g and np.array_equal(np.asarray(g["new_labels"][:]), new_labels)))
        if same:
            if g["margins"].shape[0] < models:
                for name in ("margins", "seconds"):
                    g[name].resize((models,))
                g.attrs.update({"done": False})
            return g
        log.warning("verify/%s: recorded set differs from the current estimate (datamodels re-fitted?); "
                    "replacing the record", path)
        del root[path]
    g = root.require_group(path)
    g.create_array("indices", data=np.asarray(indices, dtype=np.int64))
    if new_labels is not None:
        g.create_array("new_labels", data=np.asarray(new_labels, dtype=np.int64))
    g.create_array("margins", shape=(models,), dtype="float32", fill_value=np.nan)
    g.create_array("seconds", shape=(models,), dtype="float32", fill_value=np.nan)
    g.attrs.update({"target": int(target), "mode": mode, "method": method, "k": int(k), "thresholds": thresholds,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(), "done": False})
    return g


def _validate(mode: str, method: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"--mode: expected one of {list(MODES)}, got {mode!r}")
    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {list(METHODS)}, got {method!r}")


def verify(run: str | Path, targets: str | Sequence[int], mode: str = "remove", method: str | None = None,
           models: int | None = None, *, rounds: int | None = None, cfg: RunConfig | None = None,
           dataset: Dataset | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Verify the estimated sets of ``targets`` by retraining; record every check in ``verify/``.

    ``method``/``models``/``rounds`` default to cfg.verify's. Resumable and idempotent per
    (target, mode, method, k). Returns {"results": [per target: target, mode, method, status
    (verified | not verified | misclassified | unreachable | pending), verified_k, checks],
    "trained": models trained by this call, "summary": :func:`success_rate`}.
    """
    from datamodels import cluster  # Ray stays out of the science

    store = RunStore.open(run, mode="r+")
    cfg = cfg or store.config
    vc = cfg.verify
    method = method or vc.method
    models = models or vc.models
    rounds = rounds or vc.rounds
    _validate(mode, method)
    if models < 1 or rounds < 1:
        raise ConfigError(f"--models and --rounds: expected >= 1, got {models} and {rounds}")
    an = Analysis.open(store, cfg)
    idx = parse_targets(targets, an.num_targets)
    est = read_brittleness(store)
    status = np.asarray(est["status"])
    pending = [int(t) for t in idx if status[t] == "pending"]
    if pending:
        raise StoreError(f"targets {pending[:5]} have no brittleness estimate yet; run "
                         f"`datamodels brittleness {store.path} --targets {','.join(map(str, pending[:20]))}` first")
    given = dataset
    if dataset is not None:
        _check_dataset(store, dataset)
    full = full_models(store) if (mode == "flip" or method == "representation") else None
    kcol = est["k_remove"] if mode == "remove" else est["k_flip"]
    thresholds = est["thresholds"]
    pixel_data = dataset if dataset is not None else (load_dataset(cfg.data) if method == "pixel" else None)

    # Per target: its check list (k, thresholds, indices, new labels), position, outcome.
    plans: dict[int, list] = {}
    results: dict[int, dict] = {}
    for t in idx:
        t = int(t)
        results[t] = {"target": t, "mode": mode, "method": method, "status": status[t], "verified_k": None,
                      "checks": []}
        if status[t] != "estimated":
            continue
        ranking = an.ranking(t, method, full=full, dataset=pixel_data)
        sched, seen = [], set()
        for k, cs in k_schedule(kcol[t], thresholds, rounds * 4):
            kk = min(k, len(ranking))  # a baseline may have fewer candidates than k
            if kk in seen or kk == 0:
                continue
            seen.add(kk)
            ind = ranking[:kk]
            new = an.new_labels(t, ind, full) if mode == "flip" else None
            sched.append((kk, cs, ind, new))
        plans[t] = sched[:rounds]
        results[t]["status"] = "pending"

    root = store.group.require_group("verify")
    trained: list[tuple] = []
    position = {t: 0 for t in plans}
    with store.lock():
        while True:
            # Advance each target past done checks; collect the checks that need models.
            work: dict[int, zarr.Group] = {}
            for t, sched in plans.items():
                while results[t]["status"] == "pending":
                    if position[t] >= len(sched):
                        results[t]["status"] = "not verified"
                        break
                    k, cs, ind, new = sched[position[t]]
                    g = _open_check(root, t, mode, method, k, cs, ind, new, models)
                    m = np.asarray(g["margins"][:])
                    if np.isfinite(m).all():
                        attrs = _finalize(g) if not g.attrs.get("done") else dict(g.attrs)
                        results[t]["checks"].append(_record(g))
                        if attrs["success"]:
                            results[t]["status"], results[t]["verified_k"] = "verified", k
                        position[t] += 1
                        continue
                    work[t] = g
                    break
            if not work:
                break
            tasks = []
            for t, g in work.items():
                a = g.attrs
                ind = np.asarray(g["indices"][:])
                new = np.asarray(g["new_labels"][:]) if "new_labels" in g else None
                for j in np.flatnonzero(~np.isfinite(np.asarray(g["margins"][:]))):
                    key = (t, mode, method, int(a["k"]), int(j))
                    seed = check_seed(cfg.seed, t, mode, method, int(a["k"]), int(j))
                    tasks.append((key, train_check_model, (cfg, t, mode, ind, new, seed, key, given), 1))

            def write(key, res, work=work):
                t, _, _, _, j = key
                work[t]["margins"][j] = np.float32(res["margin"])
                work[t]["seconds"][j] = np.float32(res["seconds"])
                trained.append(key)

            log.info("verify %s/%s: %d checks, %d models", mode, method, len(work), len(tasks))
            cluster.run_tasks(tasks, data_cfg=cfg.data, train_cfg=cfg.train, resources=cfg.resources,
                              address=address, progress=progress, unit="models", desc=f"verify {mode}",
                              on_result=write)
    out = [results[int(t)] for t in idx]
    return {"results": out, "trained": trained, "summary": success_rate(out)}
