"""The fit stage on stores with planted datamodels, and the LDS arithmetic."""

import numpy as np
import pytest

from conftest import new_store, put_rows, tiny_config
from datamodels.config import FitConfig
from datamodels.data import load_dataset
from datamodels.errors import StoreError
from datamodels.evaluate import lds_report
from datamodels.fit import RowView, fit_group, fit_run, load_datamodels
from datamodels.train import subset_mask

FAST = FitConfig(n_lambdas=12, eps=1e-2, min_models=20, device="cpu")


def planted_store(tmp_path, m=400, *, nan_rows=(), skip_rows=()):
    """A store whose margins are an exact sparse linear function of the masks plus noise."""
    cfg = tiny_config(f"collect.models={m}", "collect.block_size=16")
    ds = load_dataset(cfg.data)
    n, t = ds.num_train, 6
    ds = type(ds)(**{**ds.__dict__, "test_x": ds.test_x[:t], "test_y": ds.test_y[:t]})
    store = new_store(tmp_path / "run", cfg, ds)
    g = np.random.default_rng(0)
    w = np.zeros((n, t))
    for j in range(t):
        w[g.choice(n, 3, replace=False), j] = g.choice([-1, 1], 3) * g.uniform(0.5, 1.0, 3)
    b = g.normal(size=t)
    rows = {}
    for i in range(m):
        mask = subset_mask(cfg.seed, i, n, cfg.collect.alpha)
        y = (b + mask @ w + 0.05 * g.normal(size=t)).astype(np.float32)
        if i in nan_rows:
            y[0] = np.nan
        if i not in skip_rows:
            rows[i] = (y, np.zeros(n, np.float32))
    put_rows(store, cfg, rows)
    return store, w, b


def test_fit_recovers_planted_weights_in_raw_mask_units(tmp_path):
    store, w, b = planted_store(tmp_path)
    summary = fit_run(store.loc, FAST)
    weight, bias, attrs = load_datamodels(store.loc)
    assert weight.shape == w.shape and attrs["models_used"] == 400
    for j in range(w.shape[1]):
        top = set(np.argsort(-np.abs(weight[:, j]))[:3])
        assert top == set(np.flatnonzero(w[:, j]))
    assert np.abs(weight - w).max() < 0.15
    # prediction needs no other state: bias + mask @ weight reproduces the planted function
    masks = store.read("masks")
    assert np.abs((bias + masks @ weight) - (b + masks @ w)).mean() < 0.1
    assert summary["models_left_out"] == 0


def test_diverged_models_are_left_out_and_counted(tmp_path):
    store, w, _ = planted_store(tmp_path, m=120, nan_rows=(3, 50), skip_rows=(7,))
    s = fit_run(store.loc, FAST)
    assert s["models_used"] == 117 and s["models_left_out"] == 2
    _, _, attrs = load_datamodels(store.loc)
    rows = np.asarray(fit_group(store)["rows"][:])
    assert 3 not in rows and 50 not in rows and 7 not in rows


def test_too_few_models_says_how_many_exist_and_are_needed(tmp_path):
    store, _, _ = planted_store(tmp_path, m=30, skip_rows=tuple(range(20, 30)))
    with pytest.raises(StoreError, match=r"20 usable models .* at least 25"):
        fit_run(store.loc, FitConfig(min_models=25))


def test_a_failed_refit_keeps_the_previous_fit(tmp_path, monkeypatch):
    store, _, _ = planted_store(tmp_path, m=120)
    fit_run(store.loc, FAST)
    before = load_datamodels(store.loc)[0].copy()

    def boom(*a, **k):
        raise RuntimeError("solver crashed")

    monkeypatch.setattr("datamodels.fit.fit_lasso", boom)
    with pytest.raises(RuntimeError):
        fit_run(store.loc, FitConfig(n_lambdas=5, min_models=20, device="cpu"))
    assert np.array_equal(load_datamodels(store.loc)[0], before)


def test_row_view_streams_selected_rows_of_hstacked_arrays(tmp_path):
    store, _, _ = planted_store(tmp_path, m=40)
    rows = np.array([1, 5, 6, 30])
    g = store.models_table().group
    v = RowView([g["test_margins"], g["train_margins"]], rows)
    full = np.hstack([store.read("test_margins"), store.read("train_margins")])[rows]
    assert v.shape == full.shape and np.array_equal(v[1:3], full[1:3]) and np.array_equal(v[:], full)


def test_test_plus_train_targets_fits_n_more_columns(tmp_path):
    store, _, _ = planted_store(tmp_path, m=60)
    fit_run(store.loc, FitConfig(targets="test+train", n_lambdas=4, min_models=20, device="cpu"))
    weight, _, attrs = load_datamodels(store.loc)
    n = store.dims["N"]
    assert weight.shape == (n, 6 + n) and attrs["num_test_targets"] == 6


def test_lds_known_answers():
    g = np.random.default_rng(0)
    actual = g.normal(size=(30, 2, 5))
    avg = actual.mean(1)
    assert lds_report(avg, actual)["lds"] == pytest.approx(1.0)
    assert lds_report(-avg, actual)["lds"] == pytest.approx(-1.0)
    assert lds_report(np.exp(avg), actual)["lds"] == pytest.approx(1.0)  # rank-based
    same = np.repeat(avg[:, None], 2, axis=1)
    r = lds_report(avg, same)
    assert r["split_half_reliability"] == pytest.approx(1.0) and r["noise_ceiling"] == pytest.approx(1.0)
    # independent repeats: reliability near 0
    r = lds_report(avg, g.normal(size=(30, 2, 5)))
    assert r["noise_ceiling"] < 0.8
    const = avg.copy()
    const[:, 0] = 1.0
    r = lds_report(const, actual)
    assert r["targets_undefined"] == 1 and np.isnan(r["per_target_lds"][0])
    assert lds_report(avg, actual[:, :1])["noise_ceiling"] is None
    with pytest.raises(ValueError, match="expected pred"):
        lds_report(avg[:, :3], actual)


def test_a_run_keeps_one_fit_per_name_and_reads_the_current_one(tmp_path):
    from datamodels.fit import fit_names, save_datamodels

    store, _, _ = planted_store(tmp_path, m=40)
    n, t = store.dims["N"], 6
    with store.writing():
        save_datamodels(store, np.ones((n, t)), np.zeros(t), attrs={}, name="lasso")
        save_datamodels(store, 2 * np.ones((n, t)), np.zeros(t), attrs={}, name="ridge", make_current=False)
    assert fit_names(store) == ["lasso", "ridge"] and load_datamodels(store)[0][0, 0] == 1
    assert load_datamodels(store, "ridge")[0][0, 0] == 2 and load_datamodels(store, "ridge")[2]["name"] == "ridge"
    with store.writing():
        save_datamodels(store, 3 * np.ones((n, t)), np.zeros(t), attrs={}, name="ridge")  # replaces, current now
    assert fit_names(store) == ["ridge", "lasso"] and load_datamodels(store)[0][0, 0] == 3
    assert len(list(store.group["datamodels"].group_keys())) == 2  # the replaced group is gone
    with pytest.raises(StoreError, match="no fit named 'trak' \\(it has: lasso, ridge\\)"):
        fit_group(store, "trak")
