"""Verification by retraining: a planted known answer, flips, baselines, resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import new_store, tiny_config
from datamodels.baselines import METHODS
from datamodels.brittleness import brittleness, class_ranking, read_brittleness
from datamodels.fullset import full_models
from datamodels.data import Dataset, _make
from datamodels.errors import ConfigError, StoreError
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.verify import MODES, k_schedule, read_checks, verified_k, verify
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
                       "brittleness.thresholds=[0, -1]", "verify.models=3", "verify.rounds=2", *more)


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


def test_k_schedule_dedupes_and_caps():
    assert k_schedule([2, 3], [0, -1], 3) == [(2, [0.0]), (3, [-1.0])]
    assert k_schedule([2, 2, 5, -1], [0, -0.5, -1, -2], 3) == [(2, [0.0, -0.5]), (5, [-1.0])]
    assert k_schedule([1, 2, 3, 4], [0, -1, -2, -3], 2) == [(1, [0.0]), (2, [-1.0])]
    assert k_schedule([-1, -1], [0, -1], 3) == []


def test_removing_exactly_the_planted_copies_flips_the_target(planted):
    path, cfg, ds = planted
    out = verify(path, [0], "remove", "datamodel", cfg=cfg, dataset=ds, progress=False)
    (r,) = out["results"]
    assert r["status"] == "verified" and r["verified_k"] == COPIES
    first, second = r["checks"]
    assert first["k"] == 2 and sorted(first["indices"]) == [0, 1] and not first["success"]
    assert first["mean_margin"] > 0  # one planted copy left is enough to hold the prediction
    assert second["k"] == 3 and sorted(second["indices"]) == [0, 1, 2] and second["success"]
    assert second["frac_misclassified"] == 1.0 and all(m < 0 for m in second["margins"])
    assert len(out["trained"]) == 2 * 3 and out["summary"] == {"checked": 1, "verified": 1, "rate": 1.0,
                                                                 "skipped": 0}
    assert verified_k(read_checks(RunStore.open(path), target=0, mode="remove", method="datamodel")) == 3


def test_flipping_the_planted_copies_flips_the_target(planted):
    path, cfg, ds = planted
    out = verify(path, [0], "flip", "datamodel", models=2, cfg=cfg, dataset=ds, progress=False)
    (r,) = out["results"]
    checks = read_checks(RunStore.open(path), target=0, mode="flip")
    assert r["status"] == "verified"
    k_flip = read_brittleness(RunStore.open(path))["k_flip"][0]
    runner_up = int(class_ranking(full_models(RunStore.open(path)).mean_logits()[0], 0)[0])
    assert runner_up in (1, 2)
    assert r["verified_k"] in k_flip.tolist()
    for c in checks:
        original = ds.train_y.numpy()[c["indices"]]
        assert len(c["new_labels"]) == c["k"] and np.all(np.array(c["new_labels"]) != original)
        assert set(c["new_labels"]) == {runner_up}  # all planted copies are labelled 0


def key(k, j, mode="remove", method="pixel"):
    return (0, MODES.index(mode), METHODS.index(method), k, j)


def test_pixel_baseline_verifies_and_resuming_does_not_retrain_finished_checks(planted):
    path, cfg, ds = planted
    # Stop after the first check: rounds=1 records k=2 only (the datamodel's k schedule).
    one = verify(path, [0], "remove", "pixel", models=2, rounds=1, cfg=cfg, dataset=ds, progress=False)
    (r,) = one["results"]
    assert len(one["trained"]) == 2 and [c["k"] for c in r["checks"]] == [2] and r["status"] == "not verified"
    assert r["checks"][0]["indices"] == [0, 1]  # the nearest in pixels: exact copies (ties by index)
    table = ModelTable(RunStore.open(path).group["verify"]["models"])
    rows_k2 = table.rows_of([key(2, 0), key(2, 1)])
    margins = table.read("test_margins", rows_k2).copy()
    # Resume with more rounds: only the next check trains, and it finds the planted answer.
    two = verify(path, [0], "remove", "pixel", models=2, rounds=2, cfg=cfg, dataset=ds, progress=False)
    assert sorted(two["trained"]) == [key(3, 0), key(3, 1)]
    (r,) = two["results"]
    assert r["status"] == "verified" and r["verified_k"] == 3 and sorted(r["checks"][1]["indices"]) == [0, 1, 2]
    assert np.array_equal(table.read("test_margins", rows_k2), margins)
    # A half-finished check (one model not complete, as after a crash) trains only that model.
    with RunStore.open(path).writing() as store:
        table = ModelTable(store.group["verify"]["models"])
        (row,) = table.rows_of([key(3, 1)])
        lost = float(table.read("test_margins", [row])[0, 0])
        table.group["complete"][row] = False
    three = verify(path, [0], "remove", "pixel", models=2, rounds=2, cfg=cfg, dataset=ds, progress=False)
    assert three["trained"] == [key(3, 1)]
    assert float(table.read("test_margins", [row])[0, 0]) == pytest.approx(lost, abs=1e-5)  # seeded by its key
    # Nothing left: nothing trains; the same answer comes back.
    again = verify(path, [0], "remove", "pixel", models=2, rounds=2, cfg=cfg, dataset=ds, progress=False)
    assert again["trained"] == [] and again["results"][0]["verified_k"] == 3


def test_verify_validates_its_input(planted, tmp_path):
    path, cfg, ds = planted
    with pytest.raises(ConfigError, match="--mode"):
        verify(path, [0], "erase", cfg=cfg, dataset=ds, progress=False)
    with pytest.raises(ConfigError, match="--method"):
        verify(path, [0], "remove", "oracle", cfg=cfg, dataset=ds, progress=False)
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        verify(path, [4], "remove", cfg=cfg, dataset=ds, progress=False)
    # Targets the full-set models misclassify, or never reach C, are skipped with their status.
    bare = new_store(tmp_path / "bare", cfg, ds)
    write_datamodels(bare, np.zeros((ds.num_train, ds.num_test)), np.zeros(ds.num_test))
    with pytest.raises(StoreError, match="datamodels brittleness"):
        verify(tmp_path / "bare", [0], "remove", cfg=cfg, dataset=ds, progress=False)


def test_representation_and_random_baselines_rank_the_targets_class(planted):
    from datamodels.brittleness import Analysis

    path, cfg, ds = planted
    an = Analysis.open(path, cfg)
    rep = an.ranking(0, "representation")
    assert sorted(rep[:COPIES].tolist()) == [0, 1, 2]  # identical images, identical features
    assert set(rep.tolist()) == set(range(COPIES + 10))  # class 0 only
    rnd = an.ranking(0, "random")
    assert sorted(rnd.tolist()) == list(range(COPIES + 10)) and np.array_equal(rnd, an.ranking(0, "random"))
