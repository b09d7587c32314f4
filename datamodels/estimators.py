"""Estimators of the fit stage other than the lasso path: each gives weight (N, T') in raw-mask
units and bias (T',), so ``prediction = bias + mask @ weight`` and every later stage works
unchanged (docs/estimators.md).

- ``ridge``: per target ``min (1/2M)||y - b - Xw||^2 + (mu/2)||w||^2`` on the masks, mu chosen
  per target (or one for all, ``shared``) by generalised cross-validation (GCV) on a geometric grid. One eigendecomposition
  of the centred mask Gram serves every mu and every target, and GCV needs no held-out models,
  which matters most when M is small.
- ``trak``: TRAK scores tau (N, T') from :mod:`datamodels.trak`, calibrated per target to the
  margins on masks: ``w_t = c_t tau_t`` with ``c_t`` the least-squares scale.
- ``trak-ridge`` (both signals): ridge on the masks shrunk towards the calibrated TRAK scores
  instead of towards 0, ``min (1/2M)||y - b - Xw||^2 + (mu/2)||w - c tau||^2``, one mu for all
  targets by GCV with mu = infinity (pure TRAK) on the grid: the masks move TRAK only as far as
  they support.

Statistics are streamed from the masks in row blocks (float32 products of 0/1 masks are exact,
accumulated in float64): memory O(N^2 + N T'), independent of M. The N x N Gram in float64 and
its eigendecomposition set the limit: N <= GRAM_LIMIT (8,192: 0.5 GB and minutes); beyond it
(N = 60,000: 28.8 GB, and an eigendecomposition of hours on a CPU) these estimators are refused
before anything is computed, naming the lasso, whose statistics are one float32 N x N array
(docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["MaskStats", "mask_stats", "EstimatorFit", "fit_ridge", "fit_trak", "ESTIMATORS", "GRAM_LIMIT", "check_size"]

ESTIMATORS = ("lasso", "ridge", "trak", "trak-ridge")
GRAM_LIMIT = 8192  # largest N whose float64 N x N Gram these estimators form (and ridge decomposes)


def check_size(estimator: str, n: int) -> None:
    """Refuse ``estimator`` (ridge, trak, trak-ridge) at N > GRAM_LIMIT: one line naming the limit
    and the alternative (ConfigError: exit 2)."""
    if estimator != "lasso" and n > GRAM_LIMIT:
        from datamodels.errors import ConfigError

        raise ConfigError(
            f"fit.estimator={estimator}: N={n} training examples; the {estimator} estimator forms the N x N "
            f"mask Gram in float64 ({8 * n * n / 1e9:.1f} GB here) and ridge decomposes it (hours on a CPU), so "
            f"it is limited to N <= {GRAM_LIMIT}; use fit.estimator=lasso (one float32 N x N array)")


@dataclass
class MaskStats:
    """Sufficient statistics of masks X (M, N) and margins Y (M, T') over M models."""

    n: int
    sx: np.ndarray  # (N,)
    sy: np.ndarray  # (T',)
    xtx: np.ndarray  # (N, N)
    xty: np.ndarray  # (N, T')
    yy: np.ndarray  # (T',)

    def centred(self):
        """xbar (N,), ybar (T',), Q = cov(X) (N, N), q = cov(X, Y) (N, T'), var(Y) (T',)."""
        n = float(self.n)
        xbar, ybar = self.sx / n, self.sy / n
        q_mat = self.xtx / n - np.outer(xbar, xbar)
        q_vec = self.xty / n - np.outer(xbar, ybar)
        return xbar, ybar, q_mat, q_vec, self.yy / n - ybar**2


def mask_stats(sources, *, block_rows: int = 4096) -> MaskStats:
    """Stream ``sources`` = [(X (M_s, N), Y (M_s, T')), ...] (numpy, zarr or fit.RowView) in row
    blocks and sum their statistics (all sources are models of the same kind: random subsets)."""
    n, sx, sy, xtx, xty, yy = 0, None, None, None, None, None
    for X, Y in sources:
        if int(X.shape[1]) > GRAM_LIMIT:
            raise ValueError(f"mask_stats: N={X.shape[1]} training examples; the float64 N x N Gram is limited to "
                             f"N <= {GRAM_LIMIT} ({8 * int(X.shape[1]) ** 2 / 1e9:.1f} GB here); fit with the lasso")
        for a in range(0, X.shape[0], block_rows):
            xb = np.asarray(X[a : a + block_rows], dtype=np.float32)
            yb = np.asarray(Y[a : a + block_rows], dtype=np.float64)
            if sx is None:
                sx, sy = np.zeros(xb.shape[1]), np.zeros(yb.shape[1])
                xtx, xty, yy = np.zeros((xb.shape[1],) * 2), np.zeros((xb.shape[1], yb.shape[1])), np.zeros(yb.shape[1])
            n += xb.shape[0]
            sx += xb.sum(0)
            sy += yb.sum(0)
            xtx += xb.T @ xb  # counts: exact in float32 below 2^24 rows per block
            xty += xb.T.astype(np.float64) @ yb
            yy += (yb * yb).sum(0)
    if n == 0:
        raise ValueError("mask_stats: no models")
    return MaskStats(n, sx, sy, xtx, xty, yy)


@dataclass
class EstimatorFit:
    """weight (N, T') raw-mask units, bias (T',), per-target arrays to store beside them."""

    weight: np.ndarray
    bias: np.ndarray
    n_train: int
    n_val: int = 0
    arrays: dict = field(default_factory=dict)

    @property
    def nnz(self) -> np.ndarray:
        return (self.weight != 0).sum(0)


def _eigh(q_mat: np.ndarray, device: str):
    s, v = torch.linalg.eigh(torch.as_tensor(q_mat, dtype=torch.float64, device=device))
    return s.clamp_min(0).cpu().numpy(), v.cpu().numpy()


def fit_ridge(stats: MaskStats, *, prior: np.ndarray | None = None, grid: int = 25, device: str = "cpu",
              allow_prior_only: bool = True, shared: bool = False) -> EstimatorFit:
    """Ridge per target towards ``prior`` (N, T') (zeros: plain ridge), mu by GCV.

    GCV(mu) = RSS(mu) / (1 - df(mu)/M)^2 with df = sum s/(s + mu) + 1 (bias) [+ 1 for the
    prior's scale], from the eigenvalues s of the centred Gram; with a prior, mu = inf (the
    prior itself, df = 2) is on the grid.
    """
    xbar, ybar, q_mat, q_vec, yvar = stats.centred()
    n = stats.n
    s, v = _eigh(q_mat, device)
    scale = max(float(s.mean()), 1e-12)
    mus = scale * np.geomspace(1e-3, 1e3, grid)
    extra = 1.0
    if prior is not None:
        w0 = np.asarray(prior, dtype=np.float64)
        qw0 = q_mat @ w0
        yvar = yvar - 2 * (w0 * q_vec).sum(0) + (w0 * qw0).sum(0)
        q_vec = q_vec - qw0
        extra = 2.0
    r2 = (v.T @ q_vec) ** 2  # (N, T')
    best = np.full(q_vec.shape[1], np.inf)
    choice = np.full(q_vec.shape[1], -1)
    if prior is not None and allow_prior_only:
        best = np.maximum(yvar, 0) / max(1 - extra / n, 1e-12) ** 2
    norm = np.maximum(stats.centred()[4], 1e-30)  # each target's margin variance: equal say in a shared mu
    for j, mu in enumerate(mus):
        df = (s / (s + mu)).sum() + extra
        if df >= n:
            continue
        rss = np.maximum(yvar - ((s + 2 * mu) / (s + mu) ** 2) @ r2, 0)
        gcv = rss / (1 - df / n) ** 2
        better = gcv < best
        if shared:  # one mu for all targets, by the summed relative GCV
            better[:] = (gcv / norm).sum() < (best / norm).sum()
        best[better], choice[better] = gcv[better], j
    if (choice < 0).all() and prior is None:  # every mu interpolates (tiny M): take the largest
        choice[:] = len(mus) - 1
    rot = v.T @ q_vec
    weight = np.zeros_like(q_vec) if prior is None else w0.copy()
    for j in np.unique(choice[choice >= 0]):
        cols = choice == j
        weight[:, cols] += v @ (rot[:, cols] / (s + mus[j])[:, None])
    mu_used = np.where(choice >= 0, mus[np.clip(choice, 0, None)], np.inf)
    bias = ybar - xbar @ weight
    return EstimatorFit(weight.astype(np.float32), bias.astype(np.float32), n_train=n,
                        arrays={"mu": mu_used, "gcv": best})


def calibrate(stats: MaskStats, tau: np.ndarray, *, min_models: int = 20, per_target: bool = True) -> np.ndarray:
    """(T',) scale c_t > 0 so that margins ~ b + c_t mask @ tau_t.

    The pooled scale (one least-squares slope for all targets; 1 when undetermined, e.g. a
    single model) everywhere, or with ``per_target`` and at least ``min_models`` models each
    target's own least-squares slope where it is positive. TRAK's sign is kept: a negative
    per-target slope is noise far more often than a reversed attribution (on digits 3% of the
    targets at M = 108 and the LDS drops 0.272 -> 0.259 when they are used).
    """
    _, _, q_mat, q_vec, _ = stats.centred()
    num = (tau * q_vec).sum(0)
    den = (tau * (q_mat @ tau)).sum(0)
    pooled = float(num.sum() / den.sum()) if den.sum() > 1e-300 else 0.0
    pooled = pooled if pooled > 0 else 1.0
    c = np.full(tau.shape[1], pooled)
    if per_target and stats.n >= min_models:
        own = num / np.where(den > 1e-300, den, 1)
        c = np.where((den > 1e-300) & (own > 0), own, pooled)
    return c


def fit_trak(stats: MaskStats, tau: np.ndarray, *, combine: bool, grid: int = 25, device: str = "cpu") -> EstimatorFit:
    """``trak`` (combine=False): weight = c tau, c per target; ``trak-ridge`` (combine=True):
    ridge on the masks towards c tau with the pooled c, one mu for all targets by GCV (mu = inf
    keeps c tau). The pooled prior and the shared mu were measured better than per-target ones
    (docs/estimators.md): per-target choices from noisy slopes pulled targets away from TRAK."""
    c = calibrate(stats, tau, per_target=not combine)
    prior = tau * c[None, :]
    if combine:
        fit = fit_ridge(stats, prior=prior, grid=grid, device=device, shared=True)
    else:
        xbar, ybar, *_ = stats.centred()
        fit = EstimatorFit(prior.astype(np.float32), (ybar - xbar @ prior).astype(np.float32), n_train=stats.n)
    fit.arrays["trak_scale"] = c
    return fit
