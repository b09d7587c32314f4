"""Verification by retraining: a planted known answer, flips, baselines, resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import new_store, tiny_config
from datamodels.baselines import METHODS
from datamodels.brittleness import brittleness, class_ranking
from datamodels.fullset import full_models
from datamodels.data import Dataset, _make
from datamodels.errors import ConfigError, StoreError
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.fit import fit_names, load_datamodels, save_datamodels
from datamodels.reports import verified_cdf_table, write_verified_cdf
from datamodels.verify import (MODES, SearchRule, _search_status, fit_order, method_ids, next_k, read_checks, search,
                               search_bounds, summarize_searches, verified_k, verify)
from test_brittleness import write_datamodels

pytestmark = pytest.mark.usefixtures("ray_local")

COPIES = 3


def planted_dataset(seed: int = 0) -> Dataset:
    """8x8 images, K=3. Target 0 is image X: pattern P1 (class 1) with an inverted corner,
    labelled 0. Training: COPIES exact copies of X labelled 0 (indices 0..COPIES-1), 10 noisy
    copies of an unrelated pattern Q0 (class 0), and 30 noisy copies each of P1 (class 1) and
    P2 (class 2). Models classify X as 0 only because of the planted copies: without them X
    looks like class 1."""
    rng = np.random.default_rng(seed)
    p1, p2, q0 = (rng.integers(0, 256, (8, 8)) for _ in range(3))
    x = p1.copy()
    x[:4, :4] = 255 - x[:4, :4]

    def noisy(p, n):
        return np.clip(p[None] + rng.normal(0, 12, (n, 8, 8)), 0, 255)

    train = np.concatenate([np.repeat(x[None], COPIES, 0), noisy(q0, 10), noisy(p1, 30), noisy(p2, 30)])
    labels = [0] * (COPIES + 10) + [1] * 30 + [2] * 30
    test = np.stack([x, p1, p2, q0])
    return _make("planted", torch.from_numpy(train.astype(np.uint8)[:, None]), torch.tensor(labels),
                 torch.from_numpy(test.astype(np.uint8)[:, None]), torch.tensor([0, 1, 2, 0]),
                 ["a", "b", "c"], flippable=False, split={"source": "test"})


def planted_config(*more):
    return tiny_config("train.epochs=10", "train.batch_size=16", "model.widths=[8, 16, 16, 16]",
                       "train.lr=0.2", "train.translate=0", "brittleness.full_models=3",
                       "brittleness.thresholds=[0, -1]", "verify.models=3", "verify.rounds=4", "verify.tolerance=0",
                       "verify.start_k=2", *more)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store for the planted data whose datamodel for target 0 says: the planted copies
    hold it up, two of them are (wrongly) estimated to be enough at C=0, three at C=-1."""
    cfg, ds = planted_config(), planted_dataset()
    path = tmp_path_factory.mktemp("v") / "run"
    store = new_store(path, cfg, ds)
    n, t = ds.num_train, ds.num_test
    rng = np.random.default_rng(0)
    weight = -np.abs(rng.normal(0, 0.01, (n, t)))  # everything else mildly opposes
    write_datamodels(store, weight, np.zeros(t))
    first = brittleness(path, cfg=cfg, dataset=ds, targets=[0], cdf_path=path.parent / "cdf", progress=False)
    base = float(first["baseline"][0])
    assert base > 1.0, base  # the full-set models learn the planted copies
    # Plant: w0 = w1 = (B + 0.5) / 2 -> k=2 reaches margin -0.5 (C=0); w2 = 1 -> k=3 reaches -1.5 (C=-1).
    weight[[0, 1], 0] = (base + 0.5) / 2
    weight[2, 0] = 1.0
    write_datamodels(store, weight, np.zeros(t))
    est = brittleness(path, cfg=cfg, dataset=ds, cdf_path=path.parent / "cdf", progress=False)
    assert est["full_models_trained"] == []
    assert est["k_remove"][0].tolist() == [2, 3]
    return path, cfg, ds


def simulate(k_star: int, rule: SearchRule) -> list[tuple[int, bool]]:
    """Run a search against an oracle: removing the first k flips the target iff k >= k_star."""
    history: list[tuple[int, bool]] = []
    while (k := next_k(history, rule)) is not None:
        history.append((k, k >= k_star))
    return history


@pytest.mark.parametrize("start", [1, 5, 8, 64, 100])
@pytest.mark.parametrize("k_star", [1, 2, 3, 7, 8, 9, 33, 64, 99, 100])
def test_search_grows_then_bisects_to_the_smallest_k(k_star, start):
    h = simulate(k_star, SearchRule(start=start, limit=100, max_checks=30))
    assert search_bounds(h) == (k_star - 1, k_star)  # exact: k_star works, k_star - 1 does not
    assert _search_status(h, SearchRule(start=start, limit=100, max_checks=30)) == "verified"
    assert h[0][0] == start and all(1 <= k <= 100 for k, _ in h)
    assert len({k for k, _ in h}) == len(h)  # no k checked twice
    assert len(h) <= 2 * math.ceil(math.log2(100)) + 1  # grow and bisect: logarithmic each


def test_a_fits_ranking_takes_the_targets_class_first_then_the_fallback_then_the_rest():
    w = np.array([0.0, 0.5, -0.2, 0.0, 0.9, 0.0, -0.1, 0.7])
    # class {0, 1, 4, 5} (the fallback: the target's class, nearest first); 7 is another class
    order = fit_order(w, fallback=np.array([5, 4, 0, 1]))
    # the class's positives by weight, the rest of the class by the fallback, then others by weight
    assert order.tolist() == [4, 1, 5, 0, 7, 3, 6, 2]
    assert sorted(order.tolist()) == list(range(8))  # a permutation: every example once
    assert fit_order(np.array([0.3, 0.1]), np.array([], dtype=np.int64)).tolist() == [0, 1]


def test_search_limits_rounds_and_tolerance():
    # Beyond the limit: the limit itself is checked, fails, and the search ends unverified.
    rule = SearchRule(start=8, limit=50, max_checks=30)
    h = simulate(60, rule)
    assert [k for k, _ in h] == [8, 16, 32, 50] and _search_status(h, rule) == "not verified"
    # Out of checks before any success: unfinished (more rounds continue it).
    rule = SearchRule(start=8, limit=100, max_checks=2)
    h = simulate(60, rule)
    assert [k for k, _ in h] == [8, 16] and _search_status(h, rule) == "unfinished"
    # Out of checks after a success: a verified (not necessarily smallest) bound.
    rule = SearchRule(start=8, limit=100, max_checks=3)
    h = simulate(20, rule)
    assert [k for k, _ in h] == [8, 16, 32] and search_bounds(h) == (16, 32)
    assert _search_status(h, rule) == "verified"
    # Tolerance: stop once the gap is within 25% of the bound.
    for k_star in (5, 20, 37, 90):
        h = simulate(k_star, SearchRule(start=8, limit=100, max_checks=30, tolerance=0.25))
        lo, hi = search_bounds(h)
        assert lo < k_star <= hi and hi - lo <= max(1, math.floor(0.25 * hi))
        assert len(h) <= len(simulate(k_star, SearchRule(start=8, limit=100, max_checks=30)))


def test_removing_exactly_the_planted_copies_flips_the_target(planted):
    path, cfg, ds = planted
    out = verify(path, [0], "remove", "datamodel", cfg=cfg, dataset=ds, progress=False)
    (r,) = out["results"]
    assert r["method"] == "lasso" and r["fit"] == "lasso" and r["estimated_k"] == 2
    assert r["status"] == "verified" and r["verified_k"] == COPIES and r["lower"] == 2 and r["exact"]
    # Start at the estimate (2: fails), grow to 4 (succeeds), bisect to 3 (succeeds).
    assert [(c["k"], c["success"]) for c in r["checks"]] == [(2, False), (4, True), (3, True)]
    first, _, last = r["checks"]
    assert sorted(first["indices"]) == [0, 1] and first["mean_margin"] > 0  # one planted copy holds it up
    assert sorted(last["indices"]) == [0, 1, 2]
    assert last["frac_misclassified"] == 1.0 and all(m < 0 for m in last["margins"])
    assert len(out["trained"]) == 3 * 3 and r["models"] == 9
    assert out["summary"] == {"checked": 1, "verified": 1, "rate": 1.0, "skipped": 0}
    assert verified_k(read_checks(RunStore.open(path), target=0, mode="remove", method="lasso")) == 3


def test_flipping_the_planted_copies_flips_the_target(planted):
    path, cfg, ds = planted
    out = verify(path, [0], "flip", "datamodel", models=2, cfg=cfg, dataset=ds, progress=False)
    (r,) = out["results"]
    checks = read_checks(RunStore.open(path), target=0, mode="flip")
    assert r["status"] == "verified" and 1 <= r["verified_k"] <= COPIES and r["exact"]
    runner_up = int(class_ranking(full_models(RunStore.open(path)).mean_logits()[0], 0)[0])
    assert runner_up in (1, 2)
    for c in checks:
        original = ds.train_y.numpy()[c["indices"]]
        assert len(c["new_labels"]) == c["k"] and np.all(np.array(c["new_labels"]) != original)
    for c in r["checks"]:
        if c["k"] <= COPIES:
            assert set(c["new_labels"]) == {runner_up}  # all planted copies are labelled 0


def key(k, j, mode="remove", method="pixel"):
    return (0, MODES.index(mode), METHODS.index(method), k, j)


def test_pixel_baseline_verifies_and_resuming_does_not_retrain_finished_checks(planted, monkeypatch):
    path, cfg, ds = planted
    # Stop after the first check: rounds=1 records k=2 (verify.start_k) only.
    one = verify(path, [0], "remove", "pixel", models=2, rounds=1, cfg=cfg, dataset=ds, progress=False)
    (r,) = one["results"]
    assert sorted(one["trained"]) == [key(2, 0), key(2, 1)] and r["status"] == "unfinished"
    assert r["checks"][0]["indices"] == [0, 1]  # the nearest in pixels: exact copies (ties by index)
    table = ModelTable(RunStore.open(path).group["verify"]["models"])
    rows_k2 = table.rows_of([key(2, 0), key(2, 1)])
    margins = table.read("test_margins", rows_k2).copy()
    # Resume with more rounds: the search replays k=2 from the store and trains only k=4, then 3.
    two = verify(path, [0], "remove", "pixel", models=2, rounds=3, cfg=cfg, dataset=ds, progress=False)
    assert sorted(two["trained"]) == [key(3, 0), key(3, 1), key(4, 0), key(4, 1)]
    (r,) = two["results"]
    assert r["status"] == "verified" and r["verified_k"] == 3 and sorted(r["checks"][-1]["indices"]) == [0, 1, 2]
    assert np.array_equal(table.read("test_margins", rows_k2), margins)
    # A half-finished check (one model not complete, as after a crash) trains only that model.
    with RunStore.open(path).writing() as store:
        table = ModelTable(store.group["verify"]["models"])
        (row,) = table.rows_of([key(3, 1)])
        lost = float(table.read("test_margins", [row])[0, 0])
        table.group["complete"][row] = False
    three = verify(path, [0], "remove", "pixel", models=2, rounds=3, cfg=cfg, dataset=ds, progress=False)
    assert three["trained"] == [key(3, 1)]
    assert float(table.read("test_margins", [row])[0, 0]) == pytest.approx(lost, abs=1e-5)  # seeded by its key
    # Nothing left: nothing trains; the same answer comes back. The three stored checks are
    # replayed with one read of the check table's complete mask, not one per check (a read is
    # one chunk per K rows: per check, a resumed benchmark of 1,400 checks took minutes).
    reads = []
    mask = ModelTable.complete_mask

    def counted(self):
        reads.append(self.group.path)
        return mask(self)

    monkeypatch.setattr(ModelTable, "complete_mask", counted)
    again = verify(path, [0], "remove", "pixel", models=2, rounds=3, cfg=cfg, dataset=ds, progress=False)
    assert again["trained"] == [] and again["results"][0]["verified_k"] == 3
    assert len(again["results"][0]["checks"]) == 3
    assert reads.count("verify/models") == 1, reads


def test_any_stored_fit_ranks_the_search_under_a_stable_method_id(planted):
    """A second fit ("ridge", not current) puts example 5 first, then the planted copies: its
    search must follow that ranking, under its own method id, kept across calls."""
    path, cfg, ds = planted
    store = RunStore.open(path)
    weight, bias, _ = load_datamodels(store, "lasso")
    w = weight.copy()
    base = float(full_models(store).baseline[0])
    w[:, 0] = -0.01
    w[5, 0], w[[0, 1, 2], 0] = base + 0.5, [0.3, 0.2, 0.1]  # estimated k = 1: removing example 5 alone
    with store.writing():
        save_datamodels(store, w, bias, attrs={"targets": "test", "created": "test"}, name="ridge",
                        make_current=False)
    assert fit_names(RunStore.open(path)) == ["lasso", "ridge"]
    out = search(path, [0], modes=["remove"], methods="ridge", models=2, rounds=4, cfg=cfg, dataset=ds,
                 progress=False)
    (r,) = out["results"]
    assert r["method"] == "ridge" and r["estimated_k"] == 1
    assert [(c["k"], c["success"]) for c in r["checks"]] == [(1, False), (2, False), (4, True), (3, False)]
    assert sorted(r["checks"][2]["indices"]) == [0, 1, 2, 5] and r["verified_k"] == 4 and r["exact"]
    table = ModelTable(RunStore.open(path).group["verify"]["models"])
    ids = method_ids(table)
    assert {m: ids[m] for m in METHODS} == {m: i for i, m in enumerate(METHODS)}  # baselines keep 0-3
    assert ids["fit:ridge"] >= len(METHODS)
    assert {k[2] for k in out["trained"]} == {ids["fit:ridge"]}
    # Every fit and a baseline in one call: nothing finished retrains, the ids stay.
    again = search(path, [0], modes=["remove"], methods="fits,pixel", models=2, rounds=4, cfg=cfg, dataset=ds,
                   progress=False)
    assert [r["method"] for r in again["results"]] == ["lasso", "ridge", "pixel"]
    assert not [k for k in again["trained"] if k[2] == ids["fit:ridge"]]
    after = method_ids(ModelTable(RunStore.open(path).group["verify"]["models"]))
    assert {m: after[m] for m in ids} == ids  # nothing renumbered
    assert after["fit:lasso"] >= len(METHODS) and after["fit:lasso"] != after["fit:ridge"]
    s = again["summary"]["remove"]
    assert s["ridge"]["median_k"] == 4 and s["pixel"]["median_k"] == 3 and s["ridge"]["fit"]
    with pytest.raises(ConfigError, match="'oracle'.*ridge"):
        search(path, [0], methods="oracle", cfg=cfg, dataset=ds, progress=False)


def test_verify_validates_its_input(planted, tmp_path):
    path, cfg, ds = planted
    with pytest.raises(ConfigError, match="--mode"):
        verify(path, [0], "erase", cfg=cfg, dataset=ds, progress=False)
    with pytest.raises(ConfigError, match="method 'oracle'"):
        verify(path, [0], "remove", "oracle", cfg=cfg, dataset=ds, progress=False)
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        verify(path, [4], "remove", cfg=cfg, dataset=ds, progress=False)
    # No full-set models yet: the error names the command that trains them.
    bare = new_store(tmp_path / "bare", cfg, ds)
    write_datamodels(bare, np.zeros((ds.num_train, ds.num_test)), np.zeros(ds.num_test))
    with pytest.raises(StoreError, match="datamodels brittleness"):
        verify(tmp_path / "bare", [0], "remove", cfg=cfg, dataset=ds, progress=False)


def test_verified_cdf_counts_unverified_targets_as_not_brittle(tmp_path):
    def res(t, method, status, vk, ek=None, fit=None):
        return {"target": t, "mode": "remove", "method": method, "fit": fit, "status": status, "verified_k": vk,
                "estimated_k": ek, "lower": None, "checks": [{}] * 2, "models": 4}

    results = [res(0, "lasso", "verified", 2, 1, "lasso"), res(1, "lasso", "verified", 4, None, "lasso"),
               res(2, "lasso", "not verified", None, 3, "lasso"), res(3, "lasso", "misclassified", None),
               res(0, "random", "verified", 4), res(1, "random", "unfinished", None),
               res(2, "random", "not verified", None)]
    ks, curves = verified_cdf_table(results)
    assert ks.tolist() == [1, 2, 3, 4, 5, 6, 7]  # past the largest k, 4, so its step shows
    assert np.allclose(curves[("remove", "lasso", "verified")], [0, 1 / 3, 1 / 3] + [2 / 3] * 4)
    assert np.allclose(curves[("remove", "lasso", "estimated")], [1 / 3, 1 / 3] + [2 / 3] * 5)
    assert np.allclose(curves[("remove", "random", "verified")], [0, 0, 0] + [1 / 3] * 4)
    assert ("remove", "random", "estimated") not in curves
    s = summarize_searches(results)["remove"]
    assert s["lasso"]["median_k"] == 4 and s["lasso"]["checked"] == 3 and s["lasso"]["skipped"] == 1
    assert s["random"]["median_k"] is None  # fewer than half verified
    fig = write_verified_cdf(results, str(tmp_path / "v"), models=2, trained=6)
    lines = (tmp_path / "v.csv").read_text().splitlines()
    assert lines[0] == "k,remove/lasso/verified,remove/lasso/estimated,remove/random/verified"
    assert lines[4].split(",")[0] == "4" and float(lines[4].split(",")[1]) == pytest.approx(2 / 3)
    rows = (tmp_path / "v_targets.csv").read_text().splitlines()
    assert len(rows) == 1 + len(results) and rows[1].startswith("0,remove,lasso,verified,1,2")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG" and fig["png"].endswith("v.png")


def test_representation_and_random_baselines_rank_the_targets_class(planted):
    from datamodels.brittleness import Analysis

    path, cfg, ds = planted
    an = Analysis.open(path, cfg)
    rep = an.ranking(0, "representation")
    assert sorted(rep[:COPIES].tolist()) == [0, 1, 2]  # identical images, identical features
    assert set(rep.tolist()) == set(range(COPIES + 10))  # class 0 only
    rnd = an.ranking(0, "random")
    assert sorted(rnd.tolist()) == list(range(COPIES + 10)) and np.array_equal(rnd, an.ranking(0, "random"))
