"""Verify stage: retrain on the modified FULL training set to find, for each target, the
smallest k along a ranking whose removal (or label flip) makes the target's mean margin negative.

A *check* of (target x, mode, ranking, k) trains K fresh models on S minus the ranking's first
k examples (remove) or on S with their labels flipped (flip), each seeded by (run seed,
VERIFY_DOMAIN, target, mode, method id, k, j), and succeeds when x's mean margin over the K
models is below 0.

A *search* of (target, mode, ranking) finds the smallest such k by checks (grow then bisect):

- start at k0: the ranking's own estimate when it is a fit (its datamodel's k at C = 0, with the
  full-set baseline margin), else ``verify.start_k``;
- grow: while the last check failed, double k (at most the limit: ``verify.max_k``, by default
  N // 2, and never more than the ranking holds); the limit failing ends the search unverified;
- bisect between the largest failed k (0 to begin with: the full-set models classify the
  target correctly) and the smallest successful k, until they are adjacent (or within
  ``verify.tolerance`` of the successful k);
- at most ``verify.rounds`` checks; a search out of checks before any success is "unfinished"
  (a later call with more rounds continues it).

The successful k is a *verified upper bound*: removing (flipping) those k examples made K fresh
models misclassify x on average. Bisection assumes the outcome is monotone in k along the
ranking; where noise breaks that, the bound is still verified, only perhaps not the smallest.

Each model of a check is a spec (key (target, mode, method id, k, j)) in one model table,
``verify/models``, which records its exact training mask and label overrides. The search is a
function of the check outcomes, so re-running replays it from the stored checks and trains only
what is missing: nothing, once a search has finished. Searches of many targets, modes and
rankings advance together, one round of checks at a time, so the pool stays busy.

Method ids (the key's third value, and part of the seed) come from a table stored with
``verify/models`` (attrs["methods"]): the baselines keep ids 0-3 of
:data:`datamodels.baselines.METHODS` ("datamodel", id 0, names checks recorded before fits had
names); a fit's ranking is registered as "fit:<name>" with the next free id when first used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodels.baselines import METHODS
from datamodels.brittleness import Analysis, estimate_k, parse_targets
from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.domains import SAMPLE_DOMAIN, VERIFY_DOMAIN
from datamodels.errors import ConfigError
from datamodels.fullset import FullModels, full_models
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
    "BASELINES",
    "Ranking",
    "SearchRule",
    "search_bounds",
    "next_k",
    "resolve_rankings",
    "fit_order",
    "method_ids",
    "check_seed",
    "check_spec",
    "search",
    "verify",
    "read_checks",
    "verified_k",
    "sample_targets",
    "success_rate",
    "summarize_searches",
]

log = logging.getLogger(__name__)

MODES = ("remove", "flip")
BASELINES = tuple(m for m in METHODS if m != "datamodel")  # representation, pixel, random
TABLE = "verify/models"
KEYS = ["target", "mode", "method", "k", "j"]
FIT_PREFIX = "fit:"


# --------------------------------------------------------------------------- the search rule (pure)


@dataclass(frozen=True)
class SearchRule:
    """How one search chooses its checks: first k ``start``, largest k ``limit``, at most
    ``max_checks`` checks, bisection until the gap is at most max(1, tolerance * k)."""

    start: int
    limit: int
    max_checks: int = 10
    tolerance: float = 0.0
    growth: float = 2.0


def search_bounds(history: Sequence[tuple[int, bool]]) -> tuple[int, int | None]:
    """(largest failed k below the smallest successful one (0 if none), smallest successful k
    or None) of a search's checks [(k, success)]."""
    ok = [k for k, s in history if s]
    hi = min(ok) if ok else None
    lo = max([k for k, s in history if not s and (hi is None or k < hi)], default=0)
    return lo, hi


def next_k(history: Sequence[tuple[int, bool]], rule: SearchRule) -> int | None:
    """The k of the next check of a search with checks ``history`` so far, or None when done.

    Grow (double k from ``rule.start`` while checks fail, up to ``rule.limit``), then bisect
    between the largest failed and the smallest successful k.
    """
    if len(history) >= rule.max_checks or rule.limit < 1:
        return None
    lo, hi = search_bounds(history)
    if hi is None:
        if not history:
            return max(1, min(int(rule.start), rule.limit))
        if lo >= rule.limit:
            return None
        return min(rule.limit, max(lo + 1, math.ceil(lo * rule.growth)))
    if hi - lo <= max(1, math.floor(rule.tolerance * hi)):
        return None
    return (lo + hi) // 2


def _search_status(history: Sequence[tuple[int, bool]], rule: SearchRule) -> str:
    lo, hi = search_bounds(history)
    if hi is not None:
        return "verified"
    if rule.limit < 1 or (history and lo >= rule.limit):
        return "not verified"
    return "unfinished"


# --------------------------------------------------------------------------- rankings and their ids


def fit_order(weight_t: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """A fit's ranking (N,) for one target under the baselines' class prior.

    ``fallback`` is the representation baseline: the target's class, nearest first. The order
    is the class's positively weighted examples, largest first; then the rest of the class
    along ``fallback``; then every other example by weight.

    Removing (relabelling) examples of the target's class is what lowers its margin: the
    baselines rank only that class, and a fit ranked over every class spends its removals on
    other classes' small positive weights, which are estimation noise at the size of the
    class's weakest supporters (measured on the digits default, docs/brittleness.md). A sparse
    fit (lasso) gives most examples weight exactly 0; the fallback orders those instead of
    the index.
    """
    weight_t = np.asarray(weight_t, dtype=np.float64)
    fallback = np.asarray(fallback, dtype=np.int64)
    in_class = np.zeros(len(weight_t), dtype=bool)
    in_class[fallback] = True
    by_w = np.argsort(-weight_t, kind="stable")
    first = by_w[in_class[by_w] & (weight_t[by_w] > 0)]
    taken = np.zeros(len(weight_t), dtype=bool)
    taken[first] = True
    second = fallback[~taken[fallback]]
    taken[second] = True
    return np.concatenate([first, second, by_w[~taken[by_w]]])


@dataclass(frozen=True)
class Ranking:
    """A way to order training examples for a target: a baseline, or a stored fit's weights.

    ``key`` names it in the method-id table ("pixel", "fit:lasso"); ``name`` is what reports
    show (the baseline's or the fit's name).
    """

    name: str
    fit: str | None = None

    @property
    def key(self) -> str:
        return FIT_PREFIX + self.fit if self.fit is not None else self.name


def resolve_rankings(store: RunStore, methods: str | Sequence[str]) -> list[Ranking]:
    """Rankings from names: a baseline (representation, pixel, random), a fit's name (or
    "fit:NAME"), "datamodel" (the run's current fit) or "fits" (every stored fit, current first).

    Raises ConfigError naming what is available for a name that is none of these.
    """
    from datamodels.fit import fit_names

    if isinstance(methods, str):
        methods = [m for m in methods.replace(" ", "").split(",") if m]
    fits = fit_names(store)
    out: list[Ranking] = []

    def fit(name: str) -> Ranking:
        return Ranking(FIT_PREFIX + name if name in BASELINES else name, name)

    for m in methods:
        if m == "fits":
            out += [fit(n) for n in fits]
        elif m == "datamodel" and fits:
            out.append(fit(fits[0]))
        elif m.startswith(FIT_PREFIX) and m[len(FIT_PREFIX):] in fits:
            out.append(fit(m[len(FIT_PREFIX):]))
        elif m in BASELINES:
            out.append(Ranking(m))
        elif m in fits:
            out.append(fit(m))
        else:
            have = f"the run's fits {fits}" if fits else "no fit yet (run `datamodels fit RUN`)"
            raise ConfigError(f"method {m!r}: expected a baseline {list(BASELINES)}, a fit name, 'datamodel' "
                              f"(the current fit) or 'fits' (every fit); {store.loc} has {have}")
    if not out:
        raise ConfigError(f"methods: expected at least one ranking, got {list(methods)}")
    return list(dict.fromkeys(out))  # unique, in order


def method_ids(table: ModelTable) -> dict[str, int]:
    """{method key: id} of a verification table (ids 0-3: :data:`baselines.METHODS`)."""
    stored = table.group.attrs.get("methods")
    return dict(stored) if stored else {m: i for i, m in enumerate(METHODS)}


def _register(table: ModelTable, keys: Sequence[str]) -> dict[str, int]:
    """Give every key an id (new ones after the largest); written under the driver's claim."""
    ids = method_ids(table)
    new = [k for k in keys if k not in ids]
    for k in new:
        ids[k] = max(ids.values()) + 1
    if new or "methods" not in table.group.attrs:
        table.group.attrs["methods"] = ids
    return ids


def _method_name(key: str) -> str:
    return key[len(FIT_PREFIX):] if key.startswith(FIT_PREFIX) and key[len(FIT_PREFIX):] not in BASELINES else key


# --------------------------------------------------------------------------- checks


def check_seed(seed: int, target: int, mode: str, method_id: int, k: int, j: int) -> int:
    """Training seed of model j of a check: (run seed, VERIFY_DOMAIN, target, mode, method id, k, j)."""
    return training_seed(seed, j, domain=(VERIFY_DOMAIN, int(target), MODES.index(mode), int(method_id), int(k)))


def check_spec(cfg: RunConfig, target: int, mode: str, method_id: int, indices: np.ndarray,
               new_labels: np.ndarray | None, j: int) -> ModelSpec:
    """Model j of the check of ``indices`` (k = len(indices)) for ``target``."""
    k = len(indices)
    key = (int(target), MODES.index(mode), int(method_id), int(k), int(j))
    seed = check_seed(cfg.seed, target, mode, method_id, k, j)
    if mode == "remove":
        return ModelSpec(key=key, seed=seed, subset=Subset.all_but(indices), outputs=("test_margins",))
    return ModelSpec(key=key, seed=seed, subset=Subset.all_but(),
                     labels=(np.asarray(indices, dtype=np.int64), np.asarray(new_labels, dtype=np.int64)),
                     outputs=("test_margins",))


def _table(store: RunStore, models: int) -> ModelTable:
    return store.table(TABLE, key_names=KEYS, outputs=["test_margins"], rows_per_chunk=max(1, models), labels=True)


def _checks_from_table(table: ModelTable, keys: np.ndarray, rows: np.ndarray, *,
                       complete: np.ndarray | None = None) -> list[dict]:
    """Group table rows by (target, mode, method, k) into check records.

    ``complete``: the table's complete mask when the caller holds it (a resumed search reads
    one check at a time; reading the mask, one chunk per K rows, for each made a resume of
    1,400 finished checks take over 10 minutes)."""
    out = []
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, key in zip(rows, keys):
        groups.setdefault(tuple(int(v) for v in key[:4]), []).append((int(key[4]), int(r)))
    complete = table.complete_mask() if complete is None else complete
    names = {i: _method_name(m) for m, i in method_ids(table).items()}
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
            "target": t, "mode": mode, "method": names.get(me, str(me)), "k": k, "done": done, "models": len(rs),
            "success": bool(m.mean() < 0) if done and len(m) else None,
            "mean_margin": float(m.mean()) if done and len(m) else None,
            "frac_misclassified": float((m < 0).mean()) if done and len(m) else None,
            "indices": indices.tolist(), "new_labels": new,
            "margins": [float(v) if ok else None for v, ok in zip(margins, done_rows)],
        })
    return out


def read_checks(store: RunStore, *, target: int | None = None, mode: str | None = None,
                method: str | None = None) -> list[dict]:
    """Every recorded check (optionally filtered; ``method`` by the name reports show), as
    dicts, sorted by (target, mode, method id, k)."""
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
        ids = [i for m, i in method_ids(table).items() if method in (m, _method_name(m))]
        sel &= np.isin(keys[:, 2], ids)
    rows = np.flatnonzero(sel)
    return _checks_from_table(table, keys[rows], rows)


def verified_k(checks: list[dict]) -> int | None:
    """Smallest k among done, successful checks (one target, mode and method), else None."""
    ks = [c["k"] for c in checks if c.get("done") and c.get("success")]
    return min(ks) if ks else None


# --------------------------------------------------------------------------- targets and summaries


def sample_targets(store: RunStore, n: int, *, seed: int | None = None) -> list[int]:
    """``n`` targets drawn (seeded by (run seed, SAMPLE_DOMAIN)) among those the full-set models
    classify correctly (mean margin > 0) -- whether or not the estimate reaches them."""
    base = full_models(store).baseline
    ok = np.flatnonzero(base > 0)
    seed = store.config.seed if seed is None else seed
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLE_DOMAIN]))
    return sorted(int(t) for t in rng.choice(ok, size=min(n, len(ok)), replace=False)) if len(ok) else []


def success_rate(results: list[dict]) -> dict:
    """Over search results: targets searched, verified, and the verified fraction."""
    checked = [r for r in results if r["status"] in ("verified", "not verified", "unfinished")]
    ok = sum(r["status"] == "verified" for r in checked)
    return {"checked": len(checked), "verified": ok, "rate": ok / len(checked) if checked else None,
            "skipped": len(results) - len(checked)}


def _median_k(ks: Sequence[float]) -> float | None:
    """Median over targets with unverified ones counted as infinitely large; None if > half."""
    if not len(ks):
        return None
    m = float(np.median(np.asarray(ks, dtype=np.float64)))
    return m if np.isfinite(m) else None


def summarize_searches(results: list[dict]) -> dict:
    """Per mode and method: targets searched, verified (count, rate), median verified k (over
    the searched targets, unverified ones counted as not brittle: None when fewer than half are
    verified), median estimated k (fits only, same convention), checks and models used."""
    out: dict[str, dict[str, dict]] = {}
    for r in results:
        out.setdefault(r["mode"], {}).setdefault(r["method"], []).append(r)
    summary: dict[str, dict[str, dict]] = {}
    for mode, by_method in out.items():
        for method, rs in by_method.items():
            s = success_rate(rs)
            searched = [r for r in rs if r["status"] in ("verified", "not verified", "unfinished")]
            vk = [r["verified_k"] if r["verified_k"] is not None else np.inf for r in searched]
            ek = [r["estimated_k"] if r["estimated_k"] is not None else np.inf for r in searched]
            is_fit = any(r.get("fit") for r in rs)
            summary.setdefault(mode, {})[method] = {
                **s, "median_k": _median_k(vk), "median_estimated_k": _median_k(ek) if is_fit else None,
                "fit": is_fit, "checks": sum(len(r["checks"]) for r in rs),
                "models": sum(r["models"] for r in rs)}
    return summary


# --------------------------------------------------------------------------- the stage


@dataclass
class _Search:
    target: int
    mode: str
    ranking: Ranking
    method_id: int
    order: np.ndarray  # the ranking's training indices, best first
    rule: SearchRule
    estimated_k: int | None
    history: list[tuple[int, bool]] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    done: bool = False


def _validate_modes(modes: Sequence[str]) -> tuple[str, ...]:
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--mode: expected one or more of {list(MODES)}, got {list(modes)}")
    return tuple(dict.fromkeys(modes))


class _Flips:
    """New labels of a ranking's prefix for a target (prefix-consistent, see Analysis.new_labels)."""

    def __init__(self, an: Analysis, full: FullModels):
        self.an, self.full = an, full

    def __call__(self, target: int, indices: np.ndarray) -> np.ndarray:
        return self.an.new_labels(target, indices, self.full)


def search(run: str | Path | Location, targets: str | Sequence[int], *, modes: Sequence[str] | None = None,
           methods: str | Sequence[str] | None = None, models: int | None = None, rounds: int | None = None,
           cfg: RunConfig | None = None, dataset: Dataset | None = None, address: str | None = None,
           progress: bool = True, takeover: bool = False) -> dict:
    """Find a verified k for every (target, mode, ranking) by grow-then-bisect searches.

    ``modes`` (default cfg.verify.modes), ``methods`` (rankings, see :func:`resolve_rankings`;
    default cfg.verify.methods), ``models`` K per check (cfg.verify.models), ``rounds`` checks
    per search at most (cfg.verify.rounds). Needs the full-set models (`datamodels brittleness`)
    and a fit. Resumable: every check is a model-table row; re-running trains nothing finished.

    Returns {"results": [per target, mode and method: target, mode, method, fit (the fit's
    name or None), status (verified | not verified | unfinished | misclassified), verified_k,
    lower (largest failed k below it; 0: the full set), exact (lower == verified_k - 1),
    estimated_k (fits: the estimate at C = 0, else None), start, limit, checks (in search
    order), models (checks x K)], "trained": keys trained by this call, "models": K,
    "summary": :func:`summarize_searches`}.
    """
    store = RunStore.open(run)
    cfg = cfg or store.config
    vc, bc = cfg.verify, cfg.brittleness
    modes = _validate_modes(modes if modes is not None else vc.modes)
    models = int(models if models is not None else vc.models)
    rounds = int(rounds if rounds is not None else vc.rounds)
    if models < 1 or rounds < 1:
        raise ConfigError(f"--models and --rounds: expected >= 1, got {models} and {rounds}")
    rankings = resolve_rankings(store, methods if methods is not None else vc.methods)
    an = Analysis.open(store, cfg)
    idx = parse_targets(targets, an.num_targets)
    full = full_models(store)  # StoreError naming `datamodels brittleness` when missing
    baseline = full.baseline
    dataset = store.dataset(dataset)
    n = int(an.weight.shape[0])
    max_k = min(n, int(vc.max_k)) if vc.max_k is not None else max(1, n // 2)
    flips = _Flips(an, full)
    correct = [int(t) for t in idx if baseline[t] > 0]

    results: list[dict] = []
    with store.writing(takeover=takeover):
        store.check_writable("verify")
        table = _table(store, models)
        ids = _register(table, [r.key for r in rankings])
        searches: list[_Search] = []
        for ranking in rankings:
            if ranking.fit is not None:  # read by blocks of targets: estimates and each target's ranking
                est = {mode: {} for mode in modes}
                fit_rank: dict[int, np.ndarray] = {}
                for cols, w in an.fit_weights(ranking.fit).blocks(correct):
                    for mode in modes:
                        k = estimate_k(w, baseline[cols], [0.0], max_k=bc.max_k,
                                       effect=1.0 if mode == "remove" else bc.flip_effect)[:, 0]
                        est[mode].update(zip(cols.tolist(), k.tolist()))
                    for j, t in enumerate(cols.tolist()):
                        fit_rank[t] = fit_order(w[:, j], an.ranking(t, "representation", full=full, dataset=dataset))
            for t in idx:
                t = int(t)
                for mode in modes:
                    if t not in correct:
                        results.append({"target": t, "mode": mode, "method": ranking.name, "fit": ranking.fit,
                                        "status": "misclassified", "verified_k": None, "lower": None,
                                        "exact": False, "estimated_k": None, "start": None, "limit": None,
                                        "checks": [], "models": 0})
                        continue
                    if ranking.fit is not None:
                        order = fit_rank[t]
                        k_est = int(est[mode][t])
                        k_est = k_est if k_est > 0 else None
                    else:
                        order = an.ranking(t, ranking.name, full=full, dataset=dataset)
                        k_est = None
                    limit = min(max_k, len(order))
                    start = k_est if k_est is not None and k_est <= limit else vc.start_k
                    rule = SearchRule(start=start, limit=limit, max_checks=rounds, tolerance=vc.tolerance)
                    searches.append(_Search(t, mode, ranking, ids[ranking.key], order, rule, k_est))

        trained: list[tuple] = []
        round_no = 0
        while True:
            todo: list[tuple[_Search, list[ModelSpec]]] = []
            complete, index = table.complete_mask(), table.index()
            digests = table.read("digests")
            for s in searches:
                while not s.done:
                    k = next_k(s.history, s.rule)
                    if k is None:
                        s.done = True
                        break
                    specs = _check_specs(cfg, s, k, models, flips)
                    rows = [index.get(tuple(sp.key)) for sp in specs]
                    if any(r is None or not complete[r] or digests[r] != sp.digest() for r, sp in zip(rows, specs)):
                        todo.append((s, specs))
                        break
                    check = _checks_from_table(table, np.asarray([sp.key for sp in specs]), np.asarray(rows),
                                               complete=complete)[0]
                    s.history.append((k, bool(check["success"])))
                    s.checks.append(check)
            if not todo:
                break
            round_no += 1
            log.info("verify round %d: %d checks of %d models", round_no, len(todo), models)
            run_ = run_specs(store, table, [sp for _, ss in todo for sp in ss], cfg=cfg, dataset=dataset,
                             address=address, progress=progress, desc=f"verify round {round_no}")
            trained += run_.trained

    for s in searches:
        lo, hi = search_bounds(s.history)
        status = _search_status(s.history, s.rule)
        results.append({"target": s.target, "mode": s.mode, "method": s.ranking.name, "fit": s.ranking.fit,
                        "status": status, "verified_k": hi, "lower": lo if s.history else None,
                        "exact": hi is not None and hi - lo == 1, "estimated_k": s.estimated_k,
                        "start": s.rule.start, "limit": s.rule.limit, "checks": s.checks,
                        "models": len(s.checks) * models})
    order = {(r.name, m): i for i, (r, m) in enumerate((r, m) for r in rankings for m in modes)}
    results.sort(key=lambda r: (order[(r["method"], r["mode"])], r["target"]))
    return {"results": results, "trained": trained, "models": models, "summary": summarize_searches(results)}


def _check_specs(cfg: RunConfig, s: _Search, k: int, models: int, flips: _Flips) -> list[ModelSpec]:
    ind = s.order[:k]
    new = flips(s.target, ind) if s.mode == "flip" else None
    return [check_spec(cfg, s.target, s.mode, s.method_id, ind, new, j) for j in range(models)]


def verify(run: str | Path | Location, targets: str | Sequence[int], mode: str = "remove",
           method: str | None = None, models: int | None = None, *, rounds: int | None = None,
           cfg: RunConfig | None = None, dataset: Dataset | None = None, address: str | None = None,
           progress: bool = True, takeover: bool = False) -> dict:
    """Search a verified k for ``targets`` along one ranking (``method``, default
    cfg.verify.method) in one ``mode``; every check recorded in ``verify/models``.

    Returns {"results": [per target: see :func:`search`], "trained": keys of the models trained
    by this call, "summary": :func:`success_rate`}.
    """
    cfg = cfg or RunStore.open(run).config
    if mode not in MODES:
        raise ConfigError(f"--mode: expected one of {list(MODES)}, got {mode!r}")
    out = search(run, targets, modes=[mode], methods=[method or cfg.verify.method], models=models, rounds=rounds,
                 cfg=cfg, dataset=dataset, address=address, progress=progress, takeover=takeover)
    return {"results": out["results"], "trained": out["trained"], "summary": success_rate(out["results"])}
