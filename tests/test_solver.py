"""Tests for datamodels.solver: known answers (planted model, scikit-learn), invariants
(streaming block size, KKT conditions) and input validation. Tiny data, seconds each."""

import numpy as np
import pytest

from datamodels.solver import LassoFit, fit_lasso, lasso_objective, solve_lasso


def _masks(M, N, seed, alpha=0.5):
    """(M, N) bool, each row a random subset of exactly round(alpha*N) examples."""
    rng = np.random.default_rng(seed)
    X = np.zeros((M, N), dtype=bool)
    k = int(round(alpha * N))
    for i in range(M):
        X[i, rng.choice(N, k, replace=False)] = True
    return X


def _problem(M=300, N=40, T=4, seed=0, noise=0.5, iid=False):
    """Planted sparse problem. Fixed-size masks (the product's) make the centred X singular
    (every row sums to alpha*N, so the all-ones direction is free up to the l1 penalty);
    iid=True draws Bernoulli(0.5) masks instead, for tests that compare weights exactly."""
    rng = np.random.default_rng(seed + 1)
    X = _masks(M, N, seed) if not iid else rng.random((M, N)) < 0.5
    W = np.zeros((N, T))
    for t in range(T):
        W[rng.choice(N, 5, replace=False), t] = rng.normal(0, 1, 5)
    Y = 1.5 + X @ W + rng.normal(0, noise, (M, T))
    return X, Y.astype(np.float32)


def _kkt(X, y, w, b, lam, atol):
    """Lasso KKT on raw features: |x_j^T r|/M <= lam for w_j = 0, == lam sign(w_j) else."""
    X = X.astype(np.float64)
    r = y - b - X @ w
    c = X.T @ r / X.shape[0]
    zero = w == 0
    assert np.all(np.abs(c[zero]) <= lam + atol)
    np.testing.assert_allclose(c[~zero], lam * np.sign(w[~zero]), atol=atol)
    assert abs(r.mean()) <= atol  # the unpenalised bias


def test_planted_support_recovered():
    M, N = 2000, 100
    rng = np.random.default_rng(3)
    X = _masks(M, N, 3)
    support = np.array([3, 17, 42, 71, 90])
    w_star = np.zeros(N)
    w_star[support] = [1.0, -0.8, 0.6, -1.2, 0.9]
    y = 2.0 + X @ w_star + rng.normal(0, 0.1, M)
    fit = fit_lasso(X, y[:, None].astype(np.float32))
    assert isinstance(fit, LassoFit)
    w = fit.weight[:, 0]
    assert set(np.argsort(-np.abs(w))[:5]) == set(support)
    np.testing.assert_allclose(w[support], w_star[support], atol=0.05)
    off = np.delete(w, support)
    assert np.abs(off).max() < 0.05
    # prediction = bias + mask @ weight with no other state
    pred = fit.predict(X[:50])[:, 0]
    np.testing.assert_allclose(pred, 2.0 + X[:50] @ w_star, atol=0.15)
    assert fit.n_train + fit.n_val == M and fit.n_val == 200
    assert fit.lambdas.shape == (100, 1) and fit.val_mse_path.shape == (100, 1)


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-4), ("float64", 1e-7)])
def test_solve_matches_sklearn_objective_and_kkt(dtype, rel):
    from sklearn.linear_model import Lasso

    X, Y = _problem(M=400, N=60, T=5, seed=5)
    Y64 = Y.astype(np.float64)
    lam = np.array([0.003, 0.01, 0.03, 0.1, 0.3])
    W, b = solve_lasso(X, Y, lam, dtype=dtype, tol=1e-10)
    assert W.shape == (60, 5) and b.shape == (5,)
    for t in range(5):
        ref = Lasso(alpha=lam[t], fit_intercept=True, tol=1e-12, max_iter=1_000_000)
        ref.fit(X.astype(np.float64), Y64[:, t])
        f_ref = lasso_objective(X, Y64[:, t], ref.coef_, ref.intercept_, lam[t])
        f = lasso_objective(X, Y64[:, t], W[:, t], b[t], lam[t])
        assert (f - f_ref) / f_ref <= rel, (t, f, f_ref)
        atol = 1e-4 * lam[t] if dtype == "float64" else 2e-3 * lam[t]
        _kkt(X, Y64[:, t], W[:, t].astype(np.float64), b[t], lam[t], atol)


def test_solve_sklearn_backend_is_sklearn():
    X, Y = _problem(M=200, N=30, T=2, seed=2)
    Wt, bt = solve_lasso(X, Y, 0.05, dtype="float64", tol=1e-10)
    Ws, bs = solve_lasso(X, Y, 0.05, backend="sklearn", tol=1e-10, max_iter=100_000)
    np.testing.assert_allclose(Wt, Ws, atol=1e-6)
    np.testing.assert_allclose(bt, bs, atol=1e-6)


@pytest.mark.parametrize("fn", ["fit", "solve"])
def test_block_rows_do_not_change_the_answer(fn):
    X, Y = _problem(M=150, N=20, T=3, seed=7)
    if fn == "fit":
        a = fit_lasso(X, Y, dtype="float64", block_rows=7, n_lambdas=20)
        b = fit_lasso(X, Y, dtype="float64", block_rows=10_000, n_lambdas=20)
        np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)
        np.testing.assert_allclose(a.bias, b.bias, atol=1e-6)
        np.testing.assert_array_equal(a.lam, b.lam)
    else:
        Wa, ba = solve_lasso(X, Y, 0.05, dtype="float64", block_rows=7)
        Wb, bb = solve_lasso(X, Y, 0.05, dtype="float64", block_rows=10_000)
        np.testing.assert_allclose(Wa, Wb, atol=1e-9)
        np.testing.assert_allclose(ba, bb, atol=1e-9)


def test_zarr_input_streams(tmp_path):
    zarr = pytest.importorskip("zarr")
    X, Y = _problem(M=120, N=16, T=2, seed=11)
    zx = zarr.create_array(tmp_path / "x.zarr", shape=X.shape, chunks=(16, 16), dtype=bool)
    zx[:] = X
    zy = zarr.create_array(tmp_path / "y.zarr", shape=Y.shape, chunks=(16, 2), dtype="float32")
    zy[:] = Y
    a = fit_lasso(zx, zy, block_rows=13, n_lambdas=10, dtype="float64")
    b = fit_lasso(X, Y, n_lambdas=10, dtype="float64")
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)


def test_fit_torch_matches_sklearn_backend():
    X, Y = _problem(M=300, N=30, T=4, seed=13, noise=1.0, iid=True)
    calls = []
    a = fit_lasso(
        X, Y, n_lambdas=30, dtype="float64", tol=1e-9, progress=lambda d, n: calls.append((d, n))
    )
    b = fit_lasso(X, Y, n_lambdas=30, backend="sklearn", tol=1e-9, max_iter=1_000_000)
    np.testing.assert_allclose(a.lambdas, b.lambdas, rtol=1e-10)
    np.testing.assert_allclose(a.lam, b.lam, rtol=1e-10)  # the same grid point
    np.testing.assert_allclose(a.val_mse_path, b.val_mse_path, rtol=1e-6)
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-5)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-5)
    np.testing.assert_array_equal(a.nnz, b.nnz)
    assert calls[-1] == (31, 31) and len(calls) == 31
    # lam is the argmin of the validation path
    np.testing.assert_allclose(a.lam, a.lambdas[np.argmin(a.val_mse_path, 0), np.arange(4)])


def test_path_early_stop_is_the_same_rule_in_both_backends():
    X, Y = _problem(M=300, N=30, T=6, seed=3, noise=1.0, iid=True)
    full = fit_lasso(X, Y, n_lambdas=40, dtype="float64", tol=1e-9)
    a = fit_lasso(X, Y, n_lambdas=40, dtype="float64", tol=1e-9, patience=3)
    b = fit_lasso(X, Y, n_lambdas=40, backend="sklearn", tol=1e-9, max_iter=1_000_000, patience=3)
    best = np.argmin(full.val_mse_path, 0)
    solved = np.isfinite(a.val_mse_path)
    np.testing.assert_array_equal(solved, np.isfinite(b.val_mse_path))
    for t in range(6):
        # each target's path runs exactly until 3 lambdas pass without a better validation MSE
        first_best = np.nanargmin(a.val_mse_path[:, t])
        assert solved[:, t].sum() == min(40, first_best + 4)
        assert not solved[first_best + 4 :, t].any()
    np.testing.assert_allclose(a.lam, b.lam, rtol=1e-10)
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-5)
    # where the validation curve has a single minimum, early stopping picks the same lambda
    unimodal = [t for t in range(6) if best[t] == np.nanargmin(a.val_mse_path[:, t])]
    assert unimodal and np.allclose(a.lam[unimodal], full.lam[unimodal])
    with pytest.raises(ValueError, match="patience"):
        fit_lasso(X, Y, patience=0)


def test_lambda_path_starts_at_lam_max_on_standardised_features():
    X, Y = _problem(M=200, N=25, T=2, seed=17)
    fit = fit_lasso(X, Y, n_lambdas=5, eps=1e-2, val_fraction=0.25, seed=4)
    is_val = np.zeros(200, bool)
    is_val[np.random.default_rng(4).permutation(200)[:50]] = True
    Xf, Yf = X[~is_val].astype(np.float64), Y[~is_val].astype(np.float64)
    Z = (Xf - Xf.mean(0)) / Xf.std(0)
    lam_max = np.abs(Z.T @ (Yf - Yf.mean(0))).max(0) / len(Xf)
    np.testing.assert_allclose(fit.lambdas[0], lam_max, rtol=1e-6)
    np.testing.assert_allclose(fit.lambdas[-1], lam_max * 1e-2, rtol=1e-6)


def test_constant_column_gets_zero_weight():
    X, Y = _problem(M=200, N=12, T=2, seed=19)
    X[:, 3] = True
    fit = fit_lasso(X, Y, n_lambdas=10)
    assert np.all(fit.weight[3] == 0)
    assert np.all(np.isfinite(fit.weight))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(X=np.zeros((20, 3, 1), bool)), "X must be 2-D"),
        (dict(Y=np.zeros(20)), "Y must be 2-D"),
        (dict(Y=np.zeros((19, 2))), "X has 20, Y has 19"),
        (dict(Y=np.zeros((20, 2), dtype=np.int64)), "got dtype int64"),
        (dict(X=np.full((20, 3), 2, np.uint8)), r"0/1 masks; got X\[0, 0\] = 2"),
        (dict(Y=np.full((20, 2), np.nan)), "non-finite value in row 0"),
        (dict(val_fraction=0.05), "gives 19 fitting and 1 validation"),
        (dict(val_fraction=1.5), r"val_fraction must be in \(0, 1\); got 1.5"),
        (dict(backend="numpy"), "backend must be one of"),
        (dict(dtype="float16"), "got 'float16'"),
        (dict(block_rows=0), "block_rows must be an integer >= 1; got 0"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(X=_masks(20, 3, 0), Y=np.zeros((20, 2), np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_lasso(args.pop("X"), args.pop("Y"), **args)


def test_solve_bad_lam_raises():
    X, Y = _problem(M=20, N=5, T=3)
    with pytest.raises(ValueError, match=r"shape \(3,\); got shape \(2,\)"):
        solve_lasso(X, Y, np.ones(2))
    with pytest.raises(ValueError, match="lam must be finite and > 0"):
        solve_lasso(X, Y, 0.0)


# --------------------------------------------------------------------------- memory: exact float32
# statistics, one (N, N) array, target blocks


def _stats(X, Y, dtype, block_rows=64, is_val=None):
    import torch

    from datamodels.solver import _stream

    is_val = np.zeros(len(X), bool) if is_val is None else is_val
    return _stream(X, Y, is_val, 0, Y.shape[1], masks=None, block_rows=block_rows, device=torch.device("cpu"),
                   dtype=dtype)


def test_float32_mask_statistics_equal_float64_ones_exactly():
    import torch

    # 3000 rows: entries of U^T U reach 750 in steps of 1/4, beyond float32's exact integers
    # only if the statistics were not exact; alpha = 0.5 and 0.1 masks, and a constant column.
    for alpha in (0.5, 0.1):
        X = _masks(3000, 48, 1, alpha=alpha)
        X[:, 7] = True
        Y = np.random.default_rng(0).normal(size=(3000, 2)).astype(np.float32)
        m32, _ = _stats(X, Y, torch.float32, block_rows=257)
        m64, _ = _stats(X, Y, torch.float64, block_rows=3000)
        assert m32.H.dtype == torch.float32
        assert torch.equal(m32.H.double(), m64.H)  # bit for bit
        s = 2 * X.astype(np.int64) - 1  # 2u, integers: the exact answer
        assert np.array_equal((4 * m32.H.double()).numpy().astype(np.int64), s.T @ s)
        assert torch.equal(m32.su, m64.su)


def test_the_operator_is_the_centred_standardised_gram_of_both_shares():
    import torch

    from datamodels.solver import _Gram, _lanczos_max

    X, Y = _problem(M=120, N=30, T=3, seed=4)
    X[:, 5] = False  # constant: dropped
    is_val = np.zeros(120, bool)
    is_val[::5] = True
    masks, _ = _stats(X, Y, torch.float32, block_rows=17, is_val=is_val)
    Z = np.random.default_rng(1).normal(size=(30, 4))
    for extra, rows in ((False, ~is_val), (True, np.ones(120, bool))):
        op = _Gram(masks, extra=extra, standardise=True)
        x = X[rows].astype(np.float64)
        sd = x.std(0)
        keep = sd > 1e-6
        z = (x - x.mean(0)) / np.where(keep, sd, 1) * keep
        Q = z.T @ z / len(x)
        np.testing.assert_allclose(op.matmul64(torch.from_numpy(Z)).numpy(), Q @ Z, atol=1e-12)
        np.testing.assert_allclose(op.matmul(torch.from_numpy(Z).float()).numpy(), Q @ Z, atol=1e-5)
        some = torch.tensor([0, 3, 9])
        Zs = np.zeros_like(Z)
        Zs[[0, 3, 9]] = Z[[0, 3, 9]]
        np.testing.assert_allclose(op.matmul(torch.from_numpy(Zs).float(), some).numpy(), Q @ Zs, atol=1e-5)
        top = np.linalg.eigvalsh(Q).max()
        assert op.lipschitz() == pytest.approx(top, rel=1e-10)
        lz = _lanczos_max(lambda v: op.matmul64(v[:, None])[:, 0], 30, torch.device("cpu"))
        assert lz == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-9), ("float32", 1e-6)])
def test_a_fit_in_target_blocks_equals_one_in_a_single_block(dtype, atol):
    zarr = pytest.importorskip("zarr")
    X, Y = _problem(M=200, N=25, T=7, seed=21, iid=True)
    whole = fit_lasso(X, Y, n_lambdas=15, dtype=dtype, tol=1e-9, patience=3)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = zarr.create_array(f"{d}/w.zarr", shape=(25, 7), chunks=(25, 2), dtype="float32")
        calls = []
        parts = fit_lasso(X, Y, n_lambdas=15, dtype=dtype, tol=1e-9, patience=3, target_block=3, out=out,
                          progress=lambda a, b: calls.append((a, b)))
        assert parts.weight is out
        np.testing.assert_allclose(out[:], whole.weight, atol=atol)
    np.testing.assert_array_equal(parts.lam, whole.lam)
    np.testing.assert_allclose(parts.bias, whole.bias, atol=atol)
    np.testing.assert_allclose(parts.val_mse_path, whole.val_mse_path, rtol=1e-6)
    np.testing.assert_array_equal(parts.nnz, whole.nnz)
    assert parts.lambdas.shape == (15, 7) and (parts.n_train, parts.n_val) == (whole.n_train, whole.n_val)
    assert calls[-1] == (48, 48) and len(calls) == 48  # 3 blocks x (15 lambdas + refit)
    Wa, ba = solve_lasso(X, Y, 0.05, dtype=dtype, target_block=2)
    Wb, bb = solve_lasso(X, Y, 0.05, dtype=dtype)
    np.testing.assert_allclose(Wa, Wb, atol=atol)
    np.testing.assert_allclose(ba, bb, atol=atol)


class _Huge:
    """An (M, N) array that is too tall to fit exactly; reading it is a test failure."""

    def __init__(self, m, n, dtype):
        self.shape, self.dtype = (m, n), np.dtype(dtype)

    def __getitem__(self, key):
        raise AssertionError("read before the size was checked")


def test_more_than_2_24_models_are_refused_before_reading_in_float32():
    from datamodels.solver import EXACT_ROWS

    X, Y = _Huge(EXACT_ROWS + 1, 3, bool), _Huge(EXACT_ROWS + 1, 2, np.float32)
    for call in (lambda: fit_lasso(X, Y), lambda: solve_lasso(X, Y, 0.1)):
        with pytest.raises(ValueError, match=r"exact up to 2\^24 = 16777216 models.*dtype='float64'"):
            call()
    assert EXACT_ROWS == 2**24


def test_target_block_grows_with_memory_and_shrinks_with_n():
    from datamodels.solver import target_block

    assert target_block(1000, 797) == 797
    assert target_block(60000, 10000) < 10000
    assert 60000 * target_block(60000, 10000) * 4 * 24 <= 2 * 2**30
    assert target_block(60000, 10000, "cuda") > 5 * target_block(60000, 10000)
    with pytest.raises(ValueError, match="target_block"):
        fit_lasso(*_problem(M=40, N=5, T=2), target_block=0)
