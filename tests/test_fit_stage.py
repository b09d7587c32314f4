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


# --------------------------------------------------------------------------- weights by target blocks


def test_weight_chunks_hold_all_rows_of_a_few_targets():
    from datamodels.fit import weight_chunks

    assert weight_chunks(60000, 10000) == (60000, 69)  # 16.6 MB a chunk: one target decodes that, not 2.4 GB
    assert weight_chunks(1000, 797) == (1000, 797) and weight_chunks(120, 6) == (120, 6)


def test_a_fit_in_target_blocks_is_written_block_by_block_and_read_back_by_targets(tmp_path, monkeypatch):
    import datamodels.fit as fit_mod
    import datamodels.solver as solver_mod
    from datamodels.evaluate import predict
    from datamodels.fit import fit_weights
    from datamodels.store import RunStore

    store, _, _ = planted_store(tmp_path, m=160)
    fit_run(store.loc, FAST)
    whole, bias, _ = load_datamodels(store.loc)
    n, t = whole.shape
    # chunks of 2 targets, reads of 4, the solver in blocks of 1 target (rounded up to a chunk)
    monkeypatch.setattr(fit_mod, "_WEIGHT_CHUNK_BYTES", 4 * n * 2)
    monkeypatch.setattr(fit_mod, "_READ_BYTES", 4 * n * 4)
    monkeypatch.setattr(solver_mod, "_BLOCK_BYTES", 1)
    calls = []
    fit_run(store.loc, FAST, progress=lambda a, b: calls.append((a, b)))
    assert calls[-1] == (3 * (FAST.n_lambdas + 1),) * 2  # 3 target blocks of 2
    g = fit_group(store.loc)
    assert g["weight"].chunks == (n, 2)
    w = fit_weights(store.loc)
    np.testing.assert_allclose(np.asarray(w), whole, atol=1e-6)  # the same fit as in one block
    got = np.asarray(w)
    assert np.array_equal(w[:, 3], got[:, 3]) and np.array_equal(w[:, [5, 0, 2]], got[:, [5, 0, 2]])
    assert np.array_equal(w[:, 1:4], got[:, 1:4])
    blocks = list(w.blocks([0, 2, 3, 4, 5]))
    assert [c.tolist() for c, _ in blocks] == [[0, 2, 3, 4], [5]]
    assert np.array_equal(np.hstack([b for _, b in blocks]), got[:, [0, 2, 3, 4, 5]])
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        w[:, [6]]
    # evaluate's predictions from the blocks equal the whole product
    masks = store.read("masks")[:20]
    bias = np.asarray(g["bias"][:])
    np.testing.assert_allclose(predict(RunStore.open(store.loc), masks), bias + masks.astype(np.float32) @ got,
                               rtol=1e-6, atol=1e-6)
