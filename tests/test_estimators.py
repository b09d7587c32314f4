"""Fit estimators other than the lasso: ridge (GCV), TRAK, ridge shrunk towards TRAK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from datamodels.estimators import calibrate, fit_ridge, fit_trak, mask_stats
from datamodels.trak import projected_grads, trak_scores

ROOT = Path(__file__).resolve().parents[1]


def planted(m=300, n=40, t=6, seed=0, noise=0.3):
    """Masks (M, N) of exactly N/2 ones, a sparse true datamodel, margins with noise."""
    rng = np.random.default_rng(seed)
    X = np.zeros((m, n), dtype=bool)
    for i in range(m):
        X[i, rng.choice(n, n // 2, replace=False)] = True
    W = np.zeros((n, t))
    W[rng.choice(n, 5, replace=False)] = rng.normal(0, 1, (5, t))
    b = rng.normal(0, 1, t)
    Y = b + X @ W + noise * rng.normal(size=(m, t))
    return X, Y.astype(np.float32), W, b


def test_mask_stats_stream_in_blocks_equals_whole():
    X, Y, _, _ = planted(m=57)
    a = mask_stats([(X, Y)], block_rows=8)
    b = mask_stats([(X[:20], Y[:20]), (X[20:], Y[20:])], block_rows=1000)
    assert a.n == b.n == 57
    np.testing.assert_allclose(a.xtx, X.T.astype(float) @ X)
    np.testing.assert_allclose(a.xty, b.xty, rtol=1e-10)
    np.testing.assert_allclose(a.yy, (Y.astype(float) ** 2).sum(0), rtol=1e-6)


def test_ridge_matches_sklearn_at_the_chosen_mu_and_gcv_picks_the_brute_force_minimum():
    from sklearn.linear_model import Ridge

    X, Y, W, _ = planted()
    fit = fit_ridge(mask_stats([(X, Y)]), grid=15)
    m = len(X)
    for t in range(Y.shape[1]):
        mu = fit.arrays["mu"][t]
        ref = Ridge(alpha=mu * m, fit_intercept=True, solver="svd").fit(X.astype(float), Y[:, t].astype(float))
        np.testing.assert_allclose(fit.weight[:, t], ref.coef_, atol=2e-5)
        np.testing.assert_allclose(fit.bias[t], ref.intercept_, atol=2e-4)
        # brute-force GCV with the explicit hat matrix over the same grid
        Xc = X - X.mean(0)
        yc = Y[:, t] - Y[:, t].mean()
        scale = np.linalg.eigvalsh(Xc.T @ Xc / m).clip(0).mean()
        scores = []
        for mu_j in scale * np.geomspace(1e-3, 1e3, 15):
            H = Xc @ np.linalg.solve(Xc.T @ Xc / m + mu_j * np.eye(X.shape[1]), Xc.T) / m
            df = np.trace(H) + 1
            scores.append(((yc - H @ yc) ** 2).mean() / (1 - df / m) ** 2)
        assert np.isclose(mu, scale * np.geomspace(1e-3, 1e3, 15)[int(np.argmin(scores))])
    # and it recovers the planted datamodel far better than predicting nothing
    assert np.linalg.norm(fit.weight - W) < 0.3 * np.linalg.norm(W)


def test_calibration_recovers_the_scale_of_a_true_datamodel():
    X, Y, W, _ = planted(noise=0.01)
    c = calibrate(mask_stats([(X, Y)]), W / 4.0)
    np.testing.assert_allclose(c, 4.0, rtol=0.02)
    # with a single model the scale is undetermined: 1, never 0 (TRAK's own units)
    assert (calibrate(mask_stats([(X[:1], Y[:1])]), W) == 1.0).all()


def test_trak_ridge_keeps_a_good_prior_and_beats_plain_ridge_with_few_models():
    X, Y, W, _ = planted(m=400, n=60, noise=0.5, seed=3)
    few = slice(0, 30)  # M=30 < N=60: the masks alone are underdetermined
    stats = mask_stats([(X[few], Y[few])])
    noisy_prior = W + 0.05 * np.random.default_rng(1).normal(size=W.shape)
    both = fit_trak(stats, noisy_prior, combine=True)
    ridge = fit_ridge(stats)
    err = lambda w: np.linalg.norm(w - W)  # noqa: E731
    assert err(both.weight) < 0.5 * err(ridge.weight)
    # a useless prior (pure noise) is not forced on the masks: mu stays finite for most targets
    junk = np.random.default_rng(2).normal(size=W.shape)
    shrunk = fit_trak(mask_stats([(X, Y)]), junk, combine=True)
    assert np.isfinite(shrunk.arrays["mu"]).mean() >= 0.5
    assert err(shrunk.weight) < err(junk * shrunk.arrays["trak_scale"])


def test_count_sketch_of_per_example_gradients_matches_autograd():
    from datamodels.model import ResNet9

    torch.manual_seed(0)
    model = ResNet9(1, 10, (4, 8, 8, 8)).eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 3, 9, 1, 3])
    mean, std = torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1)
    got = projected_grads(model, x, y, dim=16, seed=11, mean=mean, std=std, batch_size=2)
    gen = torch.Generator().manual_seed(11)
    sketch = [(torch.randint(0, 16, (p.numel(),), generator=gen),
               torch.randint(0, 2, (p.numel(),), generator=gen).float() * 2 - 1) for p in model.parameters()]
    for i in range(5):
        model.zero_grad()
        logits = model(((x[i : i + 1].float() / 255) - mean) / std)[0]
        other = logits.clone()
        other[y[i]] = -float("inf")
        (logits[y[i]] - other.max()).backward()
        want = torch.zeros(16)
        for p, (h, s) in zip(model.parameters(), sketch):
            want.index_add_(0, h, p.grad.reshape(-1) * s)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)


def test_trak_kernel_is_well_posed_when_the_projection_exceeds_n():
    rng = np.random.default_rng(0)
    phi, psi = rng.normal(size=(10, 32)), rng.normal(size=(4, 32))  # P=32 > N=10: Phi^T Phi singular
    tau = trak_scores([phi], [psi], ridge=1e-3)
    assert np.isfinite(tau).all()
    lam = 1e-3 * np.trace(phi.T @ phi) / 32
    np.testing.assert_allclose(tau, phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(32), psi.T), rtol=1e-8)


def test_fit_run_trains_trak_models_once_and_every_estimator_coexists(tmp_path):
    from datamodels.collect import collect
    from datamodels.fit import fit_names, fit_run, load_datamodels, trak_table
    from datamodels.store import RunStore

    cfg = tiny_config("resources.executor=local", "collect.models=24", "fit.trak_models=2", "fit.trak_dim=16")
    run = tmp_path / "r"
    collect(cfg, run, progress=False)
    for est in ("lasso", "ridge", "trak-ridge", "trak"):
        s = fit_run(run, tiny_config(f"fit.estimator={est}", "fit.trak_models=2", "fit.trak_dim=16", "fit.n_lambdas=5").fit,
                    resources=cfg.resources)
        assert s["name"] == est
    store = RunStore.open(run)
    assert fit_names(store) == ["trak", "lasso", "ridge", "trak-ridge"]  # current (last) first
    table = trak_table(store, 16)
    assert table.complete_mask().sum() == 2 and table.group["train_grads"].shape == (2, 120, 16)
    for est in ("lasso", "ridge", "trak", "trak-ridge"):
        w, b, attrs = load_datamodels(store, est)
        assert w.shape == (120, store.dims["T"]) and b.shape == (store.dims["T"],) and np.isfinite(w).all()
        assert attrs["estimator"] == est
    seconds = table.group["seconds"][:].copy()
    fit_run(run, tiny_config("fit.estimator=trak", "fit.trak_models=2", "fit.trak_dim=16").fit, resources=cfg.resources)
    np.testing.assert_array_equal(table.group["seconds"][:], seconds)  # resumed: nothing retrained


def test_cli_fit_estimator_json_and_keep_current(tmp_path):
    from datamodels.collect import collect

    cfg = tiny_config("resources.executor=local", "collect.models=20")
    run = tmp_path / "r"
    collect(cfg, run, progress=False)
    cmd = [sys.executable, "-m", "datamodels.cli", "fit", str(run), "--no-progress"]
    r = subprocess.run(cmd + ["--estimator", "ridge", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "ridge"
    r = subprocess.run(cmd + ["--estimator", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "lasso" in r.stderr and "trak-ridge" in r.stderr
    from datamodels.fit import fit_names
    from datamodels.store import RunStore

    assert fit_names(RunStore.open(run)) == ["ridge"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_projected_grads_on_cuda_match_cpu():
    from datamodels.model import ResNet9

    torch.manual_seed(0)
    model = ResNet9(1, 10, (4, 8, 8, 8)).eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 3, 9, 1, 3, 2])
    mean, std = torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1)
    cpu = projected_grads(model, x, y, dim=16, seed=5, mean=mean, std=std)
    dev = torch.device("cuda")
    gpu = projected_grads(model.to(dev), x.to(dev), y.to(dev), dim=16, seed=5, mean=mean.to(dev), std=std.to(dev))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)


def test_trak_estimators_refuse_training_targets_before_training_anything(tmp_path):
    from datamodels.collect import collect
    from datamodels.errors import ConfigError
    from datamodels.fit import fit_run
    from datamodels.store import RunStore

    cfg = tiny_config("resources.executor=local", "collect.models=4")
    collect(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="test targets only"):
        fit_run(tmp_path / "r", tiny_config("fit.estimator=trak", "fit.targets=test+train").fit, resources=cfg.resources)
    assert "trak" not in RunStore.open(tmp_path / "r").group
