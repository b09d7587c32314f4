"""Verify stage: retrain on the modified FULL training set and check the target really flips.

For target x, mode (remove | flip) and method (datamodel | representation | pixel | random),
the k schedule is the brittleness estimate's k for each threshold C (``k_remove`` or
``k_flip``, highest C first; baselines use the datamodel's schedule). The search is coarse:
check the first k; when the check fails (x is still classified correctly on average) move to
the next threshold's k; stop at the first success or after ``verify.rounds`` checks.

A check trains K fresh models on S minus the set (remove) or on S with the set's labels
flipped (flip), each seeded by (run seed, VERIFY_DOMAIN, target, mode, method, k, j), and
succeeds when the mean margin of x over the K models is below 0.

Each model of a check is a spec (key (target, mode, method, k, j)): the full training set
without the set (remove) or with the set's labels replaced (flip). They live in one model
table, ``verify/models`` (datamodels.table), which records each model's exact training mask
and label overrides, so every check says which examples it removed or relabelled. A check is
done once its K rows are complete; the resume rule of the table makes re-running retrain
nothing that is done, and a check whose set changed (a re-fit moved it) is retrained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodels.baselines import METHODS
from datamodels.brittleness import Analysis, parse_targets, read_brittleness
from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.errors import ConfigError, StoreError
from datamodels.fullset import full_models
from datamodels.runner import run_specs
from datamodels.specs import ModelSpec, Subset
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.train import training_seed

__all__ = [
    "VERIFY_DOMAIN",
    "SAMPLE_DOMAIN",
    "MODES",
    "check_seed",
    "check_spec",
    "k_schedule",
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
TABLE = "verify/models"
KEYS = ["target", "mode", "method", "k", "j"]


def check_seed(seed: int, target: int, mode: str, method: str, k: int, j: int) -> int:
    """Training seed of model j of a check: (run seed, VERIFY_DOMAIN, target, mode, method, k, j)."""
    return training_seed(seed, j, domain=(VERIFY_DOMAIN, int(target), MODES.index(mode), METHODS.index(method), int(k)))


def check_spec(cfg: RunConfig, target: int, mode: str, method: str, indices: np.ndarray,
               new_labels: np.ndarray | None, j: int) -> ModelSpec:
    """Model j of the check of ``indices`` (k = len(indices)) for ``target``."""
    k = len(indices)
    key = (int(target), MODES.index(mode), METHODS.index(method), int(k), int(j))
    seed = check_seed(cfg.seed, target, mode, method, k, j)
    if mode == "remove":
        return ModelSpec(key=key, seed=seed, subset=Subset.all_but(indices), outputs=("test_margins",))
    return ModelSpec(key=key, seed=seed, subset=Subset.all_but(),
                     labels=(np.asarray(indices, dtype=np.int64), np.asarray(new_labels, dtype=np.int64)),
                     outputs=("test_margins",))


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


def _table(store: RunStore, models: int) -> ModelTable:
    return store.table(TABLE, key_names=KEYS, outputs=["test_margins"], rows_per_chunk=max(1, models), labels=True)


# --------------------------------------------------------------------------- records


def _checks_from_table(table: ModelTable, keys: np.ndarray, rows: np.ndarray) -> list[dict]:
    """Group table rows by (target, mode, method, k) into check records."""
    out = []
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, key in zip(rows, keys):
        groups.setdefault(tuple(int(v) for v in key[:4]), []).append((int(key[4]), int(r)))
    complete = table.complete_mask()
    for (t, md, me, k), jr in sorted(groups.items()):
        rs = [r for _, r in sorted(jr)]
        margins = table.read("test_margins", np.asarray(rs))[:, t].astype(np.float64)
        done_rows = complete[rs]
        m = margins[done_rows & np.isfinite(margins)]  # a diverged model is left out of the mean
        first = rs[0]
        mode = MODES[md]
        if mode == "remove":
            indices = np.flatnonzero(~table.read("masks", np.asarray([first]))[0])
            new = None
        else:
            lab = table.read("labels", np.asarray([first]))[0]
            indices = np.flatnonzero(lab >= 0)
            new = lab[indices].astype(np.int64).tolist()
        done = bool(done_rows.all())
        out.append({
            "target": t, "mode": mode, "method": METHODS[me], "k": k, "done": done, "models": len(rs),
            "success": bool(m.mean() < 0) if done and len(m) else None,
            "mean_margin": float(m.mean()) if done and len(m) else None,
            "frac_misclassified": float((m < 0).mean()) if done and len(m) else None,
            "indices": indices.tolist(), "new_labels": new,
            "margins": [float(v) if ok else None for v, ok in zip(margins, done_rows)],
        })
    return out


def read_checks(store: RunStore, *, target: int | None = None, mode: str | None = None,
                method: str | None = None) -> list[dict]:
    """Every recorded check (optionally filtered), as dicts, sorted by (target, mode, method, k)."""
    if "verify" not in store.group or "models" not in store.group["verify"]:
        return []
    table = ModelTable(store.group["verify"]["models"])
    keys = table.keys()
    sel = np.ones(len(keys), dtype=bool)
    if target is not None:
        sel &= keys[:, 0] == int(target)
    if mode is not None:
        sel &= keys[:, 1] == MODES.index(mode)
    if method is not None:
        sel &= keys[:, 2] == METHODS.index(method)
    rows = np.flatnonzero(sel)
    return _checks_from_table(table, keys[rows], rows)


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


def _validate(mode: str, method: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"--mode: expected one of {list(MODES)}, got {mode!r}")
    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {list(METHODS)}, got {method!r}")


def verify(run: str | Path | Location, targets: str | Sequence[int], mode: str = "remove",
           method: str | None = None, models: int | None = None, *, rounds: int | None = None,
           cfg: RunConfig | None = None, dataset: Dataset | None = None, address: str | None = None,
           progress: bool = True, takeover: bool = False) -> dict:
    """Verify the estimated sets of ``targets`` by retraining; record every model in ``verify/``.

    ``method``/``models``/``rounds`` default to cfg.verify's. Resumable and idempotent per
    (target, mode, method, k). Returns {"results": [per target: target, mode, method, status
    (verified | not verified | misclassified | unreachable | pending), verified_k, checks],
    "trained": keys of the models trained by this call, "summary": :func:`success_rate`}.
    """
    store = RunStore.open(run)
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
                         f"`datamodels brittleness {store.loc} --targets {','.join(map(str, pending[:20]))}` first")
    dataset = store.dataset(dataset)
    full = full_models(store) if (mode == "flip" or method == "representation") else None
    kcol = est["k_remove"] if mode == "remove" else est["k_flip"]

    # Per target: its checks in order (indices, new labels), position, outcome.
    plans: dict[int, list] = {}
    results: dict[int, dict] = {}
    for t in idx:
        t = int(t)
        results[t] = {"target": t, "mode": mode, "method": method, "status": status[t], "verified_k": None,
                      "checks": []}
        if status[t] != "estimated":
            continue
        ranking = an.ranking(t, method, full=full, dataset=dataset)
        sched, seen = [], set()
        for k, _ in k_schedule(kcol[t], est["thresholds"], rounds * 4):
            kk = min(k, len(ranking))  # a baseline may have fewer candidates than k
            if kk in seen or kk == 0:
                continue
            seen.add(kk)
            ind = ranking[:kk]
            sched.append((ind, an.new_labels(t, ind, full) if mode == "flip" else None))
        plans[t] = sched[:rounds]
        results[t]["status"] = "pending"

    trained: list[tuple] = []
    position = {t: 0 for t in plans}
    with store.writing(takeover=takeover):
        store.check_writable("verify")
        table = _table(store, models)
        while True:
            # One round: the current check of every target still pending, trained together.
            current = {}
            for t, sched in plans.items():
                if results[t]["status"] != "pending":
                    continue
                if position[t] >= len(sched):
                    results[t]["status"] = "not verified"
                    continue
                current[t] = sched[position[t]]
            if not current:
                break
            specs = {t: [check_spec(cfg, t, mode, method, ind, new, j) for j in range(models)]
                     for t, (ind, new) in current.items()}
            run = run_specs(store, table, [s for ss in specs.values() for s in ss], cfg=cfg, dataset=dataset,
                            address=address, progress=progress, desc=f"verify {mode}")
            trained += run.trained
            for t, ss in specs.items():
                keys = np.asarray([s.key for s in ss])
                check = _checks_from_table(table, keys, table.rows_of([s.key for s in ss]))[0]
                results[t]["checks"].append(check)
                position[t] += 1
                if check["success"]:
                    results[t]["status"], results[t]["verified_k"] = "verified", check["k"]
    out = [results[int(t)] for t in idx]
    return {"results": out, "trained": trained, "summary": success_rate(out)}
