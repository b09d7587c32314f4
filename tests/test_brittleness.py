"""Brittleness estimates: ranking and k against brute force, flip labels, baselines, the stage."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from datamodels.baselines import baseline_ranking, rank_examples
from datamodels.brittleness import (
    STATUS,
    brittleness,
    class_ranking,
    estimate_k,
    flip_labels,
    target_datamodels,
    parse_targets,
    read_brittleness,
)
from datamodels.errors import ConfigError, StoreError
from datamodels.fit import save_datamodels
from datamodels.fullset import full_models
from datamodels.store import RunStore


# --------------------------------------------------------------------------- helpers (shared)


def write_datamodels(store: RunStore, weight: np.ndarray, bias: np.ndarray, targets: str = "test") -> None:
    """Stand-in for the fit stage: (N, T) weights and (T,) bias as the run's current fit."""
    with store.writing():
        save_datamodels(store, weight, bias, attrs={"targets": targets, "created": "test"},
                        arrays={"nnz": (np.asarray(weight) != 0).sum(axis=0).astype(np.int64)})


def fit_least_squares(store: RunStore, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of test margins on masks over complete rows (a tiny stand-in fit)."""
    rows = np.flatnonzero(store.complete_mask())
    x = store.read("masks", rows).astype(np.float64)
    y = store.read("test_margins", rows).astype(np.float64)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    b = ym - xm @ w
    write_datamodels(store, w, b)
    return w, b


def brute_force_k(w: np.ndarray, base: float, thr: float, effect: float, max_k: int) -> int:
    order = rank_examples(w)
    for k in range(1, max_k + 1):
        if base - effect * w[order[:k]].sum() <= thr:
            return k
    return -1


# --------------------------------------------------------------------------- pure functions


def test_rank_examples_is_descending_with_stable_ties():
    w = np.array([0.5, -1.0, 2.0, 0.5, 0.0, 2.0])
    assert rank_examples(w).tolist() == [2, 5, 0, 3, 4, 1]


@pytest.mark.parametrize("effect", [1.0, 2.0])
@pytest.mark.parametrize("max_k", [None, 7])
def test_estimate_k_matches_brute_force(effect, max_k):
    rng = np.random.default_rng(3)
    n, t = 40, 60
    w = rng.normal(0, 0.3, (n, t)) * (rng.random((n, t)) < 0.5)  # sparse, both signs
    base = rng.uniform(-0.5, 4.0, t)
    thresholds = (0.0, -0.5, -2.0)
    got = estimate_k(w, base, thresholds, effect=effect, max_k=max_k, block=7)
    mk = n if max_k is None else max_k
    want = np.array([[brute_force_k(w[:, j], base[j], c, effect, mk) for c in thresholds] for j in range(t)])
    assert np.array_equal(got, want)
    assert (got > 0).any() and (got == -1).any()  # both outcomes exercised
    # Lower thresholds never need fewer examples; a flip (effect 2) never needs more than a removal.
    ok = got > 0
    assert np.all(np.diff(np.where(ok, got, 10**6), axis=1) >= 0)


def test_flip_k_never_exceeds_removal_k():
    rng = np.random.default_rng(0)
    w, base = rng.normal(0, 0.5, (30, 20)), rng.uniform(0.1, 3, 20)
    rm = estimate_k(w, base, (0.0, -1.0))
    fl = estimate_k(w, base, (0.0, -1.0), effect=2.0)
    assert np.all((fl <= rm) | (rm == -1)) and np.all(fl[rm > 0] > 0)


def test_flip_labels_never_equal_the_original():
    rng = np.random.default_rng(11)
    for trial in range(400):
        k = int(rng.integers(2, 11))
        original = rng.integers(0, k, size=int(rng.integers(1, 30)))
        target_label = int(rng.integers(0, k))
        ranking = class_ranking(rng.normal(size=k), target_label)
        assert sorted(ranking.tolist()) == list(range(k)) and ranking[-1] == target_label
        for rule in ("runner-up", "random", "fixed"):
            new = flip_labels(original, rule=rule, num_classes=k, ranking=ranking,
                              flip_class=int(rng.integers(0, k)), rng=np.random.default_rng(trial))
            assert new.shape == original.shape
            assert np.all(new != original), (rule, k, original, new)
            assert np.all((0 <= new) & (new < k))
    # The rules' own choices where the original label does not collide:
    ranking = np.array([3, 1, 0, 2])  # runner-up 3, then 1; target label 2 last
    assert flip_labels(np.array([0, 3, 2]), rule="runner-up", num_classes=4, ranking=ranking).tolist() == [3, 1, 3]
    assert flip_labels(np.array([0, 1, 3]), rule="fixed", num_classes=4, flip_class=3).tolist() == [3, 3, 0]
    with pytest.raises(ConfigError, match="flip_class"):
        flip_labels(np.array([0]), rule="fixed", num_classes=4, flip_class=4)
    with pytest.raises(ConfigError, match="flip_label"):
        flip_labels(np.array([0]), rule="sideways", num_classes=4)


def test_random_flip_labels_are_uniform_over_the_other_classes():
    new = flip_labels(np.full(20000, 2), rule="random", num_classes=4, rng=np.random.default_rng(0))
    counts = np.bincount(new, minlength=4) / 20000
    assert counts[2] == 0 and np.allclose(counts[[0, 1, 3]], 1 / 3, atol=0.02)


def test_baseline_rankings_are_same_class_and_ordered():
    rng = np.random.default_rng(1)
    train_y = rng.integers(0, 3, 50)
    reps = rng.normal(size=(50, 4))
    target_rep = reps[7] + 0.01
    label = int(train_y[7])
    same = set(np.flatnonzero(train_y == label).tolist())
    for method in ("representation", "pixel"):
        order = baseline_ranking(method, 5, train_y=train_y, target_label=label, seed=0,
                                 train_repr=reps, target_repr=target_rep)
        assert set(order.tolist()) == same and order[0] == 7
        d = np.linalg.norm(reps[order] - target_rep, axis=1)
        assert np.all(np.diff(d) >= 0)
    r1 = baseline_ranking("random", 5, train_y=train_y, target_label=label, seed=0)
    r2 = baseline_ranking("random", 5, train_y=train_y, target_label=label, seed=0)
    r3 = baseline_ranking("random", 6, train_y=train_y, target_label=label, seed=0)
    assert set(r1.tolist()) == same and np.array_equal(r1, r2) and not np.array_equal(r1, r3)


def test_parse_targets():
    assert parse_targets(None, 5).tolist() == [0, 1, 2, 3, 4]
    assert parse_targets("all", 3).tolist() == [0, 1, 2]
    assert parse_targets("4,0-2, 2", 10).tolist() == [0, 1, 2, 4]
    assert parse_targets([3, 1], 10).tolist() == [1, 3]
    for bad, msg in (("12", r"\[0, 10\)"), ([-1], r"\[0, 10\)"), ("a", "ranges"), ("5-2", "empty"), ([], "at least")):
        with pytest.raises(ConfigError, match=msg):
            parse_targets(bad, 10)


# --------------------------------------------------------------------------- the stage (Ray)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    from datamodels.collect import collect

    out = tmp_path_factory.mktemp("b") / "run"
    collect(tiny_config(), out, progress=False)
    return out


def test_stage_needs_a_fit_first(run):
    store = RunStore.open(run)
    if "datamodels" in store.group:
        pytest.skip("module store already fitted")
    with pytest.raises(StoreError, match=f"datamodels fit {run}"):
        target_datamodels(store)
    with pytest.raises(StoreError, match="datamodels fit"):
        brittleness(run, progress=False)


def test_brittleness_stage_stores_estimates_and_cdf(run, tmp_path):
    store = RunStore.open(run, mode="r+")
    w, b = fit_least_squares(store)
    cfg = tiny_config("brittleness.full_models=2", "brittleness.thresholds=[0, -0.5, -1]", "brittleness.max_k=60")
    res = brittleness(run, cfg=cfg, cdf_path=tmp_path / "cdf", progress=False)
    assert res["full_models_trained"] == [0, 1]
    t = store.dims["T"]
    stored = read_brittleness(RunStore.open(run))
    assert stored["k_remove"].shape == (t, 3) and stored["k_flip"].shape == (t, 3)
    assert stored["thresholds"] == [0.0, -0.5, -1.0]
    full = full_models(RunStore.open(run))
    assert full.test_margins.shape == (2, t) and full.test_logits.shape == (2, t, 10)
    assert full.features("train").shape == (120, 2 * 8) and full.group["complete"][:].all()
    base = full.test_margins.mean(0)
    assert np.allclose(stored["baseline"], base, atol=1e-6)
    status = np.array(stored["status"])
    assert set(status) <= set(STATUS[1:]) and (status == "misclassified").sum() == (base <= 0).sum()
    want = estimate_k(w, base, [0.0, -0.5, -1.0], max_k=60)
    ok = status != "misclassified"
    assert np.array_equal(stored["k_remove"][ok], want[ok])
    assert np.all(stored["k_remove"][~ok] == -1) and np.all(stored["k_flip"][~ok] == -1)
    assert np.all((status == "unreachable") == (ok & (want[:, 0] == -1)))
    # CDF: fraction over correctly classified targets, non-decreasing in k, in [0, 1].
    lines = (tmp_path / "cdf.csv").read_text().splitlines()
    assert lines[0] == "k,remove_C=0,remove_C=-0.5,remove_C=-1,flip_C=0,flip_C=-0.5,flip_C=-1"
    table = np.loadtxt(tmp_path / "cdf.csv", delimiter=",", skiprows=1, ndmin=2)
    assert np.all(np.diff(table[:, 1:], axis=0) >= 0) and table[:, 1:].max() <= 1
    k1 = want[ok, 0]
    assert table[-1, 1] == pytest.approx(((k1 > 0) & (k1 <= table[-1, 0])).sum() / ok.sum())
    assert (tmp_path / "cdf.png").stat().st_size > 1000
    s = res["summary"]
    assert s["targets"] == t and s["estimated"] + s["unreachable"] + s["misclassified"] == t
    # Re-running trains no full-set model and gives the same estimates.
    again = brittleness(run, cfg=cfg, targets="0-9", cdf_path=tmp_path / "cdf2", progress=False)
    assert again["full_models_trained"] == []
    assert np.array_equal(again["k_remove"], stored["k_remove"][:10])


def test_brittleness_validates_targets_and_flip_class(run):
    store = RunStore.open(run, mode="r+")
    if "datamodels" not in store.group:
        fit_least_squares(store)
    t = store.dims["T"]
    with pytest.raises(ConfigError, match=rf"\[0, {t}\)"):
        brittleness(run, targets=[t], progress=False)
    with pytest.raises(ConfigError, match="flip_class"):
        brittleness(run, cfg=tiny_config("brittleness.flip_label=fixed", "brittleness.flip_class=10"),
                    progress=False)
