"""Per-target lasso for datamodels, solved for all T targets at once.

For every target t independently::

    min_{w, b}  (1 / (2 M)) * ||y_t - b - X w||^2 + lam_t * ||w||_1      (b unpenalised)

X is the (M, N) 0/1 mask matrix (M models, N training examples), Y the (M, T) margins
(T targets). This is the fitting step of datamodels (Ilyas et al., 2022, eq. 2).

The torch backend never holds X in memory: it streams row blocks of X and Y (numpy or zarr
arrays) once and accumulates sufficient statistics (X^T X, X^T Y, column sums, Y sums and
squares) for the fitting share and the validation share separately. Everything after that
works on (N, N) and (N, T) matrices, so the cost of a solve does not grow with M.

The solver is FISTA on the Gram matrix, vectorised over targets, with adaptive (gradient)
restarts, a per-target duality-gap stopping rule, and compaction of converged targets (they
drop out of the matmuls). See ``docs/solver.md`` for the measurements behind that choice.

Public functions:

* :func:`fit_lasso` -- lambda path on standardised features, lambda chosen per target on
  held-out models, refit on all models, weights returned in raw mask units.
* :func:`solve_lasso` -- one fixed lambda per target on RAW (unstandardised) features; the
  same problem as ``sklearn.linear_model.Lasso(alpha=lam, fit_intercept=True)``.
* :func:`lasso_objective` -- the objective above in float64, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["LassoFit", "fit_lasso", "solve_lasso", "lasso_objective"]

logger = logging.getLogger(__name__)

_BACKENDS = ("torch", "sklearn")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Check the duality gap (one extra matmul) every this many FISTA iterations.
_CHECK_EVERY = 10
# Stop a target whose gap has not improved by 1% in this many checks (dtype precision floor).
_STALL_CHECKS = 10
# Default iteration cap per lambda (FISTA iterations, or sklearn coordinate-descent epochs).
_DEFAULT_MAX_ITER = 10_000


@dataclass(frozen=True)
class LassoFit:
    """Result of :func:`fit_lasso`.

    Attributes:
        weight: (N, T) float32, raw mask units: ``prediction = bias + mask @ weight``.
        bias: (T,) float64.
        lam: (T,) float64, the chosen lambda per target, in the units of the objective
            ``(1/(2M))||y - b - Z w||^2 + lam ||w||_1`` where Z are the STANDARDISED features
            (each column centred and divided by its population standard deviation over the
            models being fitted). The path and the selection use the fitting share; the
            refit on all M models uses the same ``lam`` with the features standardised over
            all M models.
        val_mse: (T,) float64, validation MSE at the chosen lambda (fit on the fitting share).
        nnz: (T,) int64, non-zeros of ``weight``.
        lambdas: (L, T) float64, the path per target (decreasing).
        val_mse_path: (L, T) float64, validation MSE along the path.
        n_train: number of models in the fitting share.
        n_val: number of models in the validation share.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    val_mse: np.ndarray
    nnz: np.ndarray
    lambdas: np.ndarray
    val_mse_path: np.ndarray
    n_train: int
    n_val: int

    def predict(self, masks: Any) -> np.ndarray:
        """Predicted margins (E, T) for masks (E, N)."""
        masks = np.asarray(masks, dtype=np.float32)
        return self.bias[None, :] + masks @ self.weight


# --------------------------------------------------------------------------------------
# validation


def _check_xy(X: Any, Y: Any) -> tuple[int, int, int]:
    for name, arr in (("X", X), ("Y", Y)):
        if not hasattr(arr, "shape") or not hasattr(arr, "__getitem__"):
            raise ValueError(
                f"{name} must be an array supporting .shape and row slicing "
                f"(numpy or zarr); got {type(arr).__name__}"
            )
    if len(X.shape) != 2:
        raise ValueError(f"X must be 2-D (M, N); got shape {tuple(X.shape)}")
    if len(Y.shape) != 2:
        raise ValueError(f"Y must be 2-D (M, T); got shape {tuple(Y.shape)}")
    M, N = (int(s) for s in X.shape)
    if int(Y.shape[0]) != M:
        raise ValueError(
            f"X and Y must have the same number of rows (models): X has {M}, Y has {Y.shape[0]}"
        )
    T = int(Y.shape[1])
    if N < 1 or T < 1:
        raise ValueError(f"need N >= 1 and T >= 1; got X shape {tuple(X.shape)}, Y shape {tuple(Y.shape)}")
    xdt = np.dtype(X.dtype)
    if not (xdt == np.bool_ or np.issubdtype(xdt, np.integer) or np.issubdtype(xdt, np.floating)):
        raise ValueError(f"X must hold 0/1 masks (bool or uint8); got dtype {xdt}")
    ydt = np.dtype(Y.dtype)
    if not np.issubdtype(ydt, np.floating):
        raise ValueError(f"Y must be floating point (margins); got dtype {ydt}")
    return M, N, T


def _check_options(backend: str, dtype: str, block_rows: int, tol: float, max_iter: int) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}; got {dtype!r}")
    if not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1; got {block_rows!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0; got {tol!r}")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1; got {max_iter!r}")


def _split(M: int, val_fraction: float, seed: int) -> np.ndarray:
    """(M,) bool, True for the validation share, drawn with numpy's Generator(seed)."""
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    n_val = int(round(val_fraction * M))
    if n_val < 2 or M - n_val < 2:
        raise ValueError(
            f"need at least 2 models in each of the fitting and validation shares; "
            f"M={M} with val_fraction={val_fraction} gives {M - n_val} fitting and {n_val} validation"
        )
    perm = np.random.default_rng(seed).permutation(M)
    is_val = np.zeros(M, dtype=bool)
    is_val[perm[:n_val]] = True
    return is_val


# --------------------------------------------------------------------------------------
# sufficient statistics (streamed)


@dataclass
class _Stats:
    """Sufficient statistics of n rows, float64 on the target device.

    n: rows; sx (N,) column sums; G (N, N) X^T X; sy (T,); syy (T,) sum of squares;
    xty (N, T) X^T Y.
    """

    n: int
    sx: torch.Tensor
    G: torch.Tensor
    sy: torch.Tensor
    syy: torch.Tensor
    xty: torch.Tensor

    def __add__(self, other: "_Stats") -> "_Stats":
        return _Stats(
            self.n + other.n,
            self.sx + other.sx,
            self.G + other.G,
            self.sy + other.sy,
            self.syy + other.syy,
            self.xty + other.xty,
        )


def _empty_stats(N: int, T: int, device: torch.device) -> _Stats:
    f = dict(dtype=torch.float64, device=device)
    return _Stats(
        0,
        torch.zeros(N, **f),
        torch.zeros(N, N, **f),
        torch.zeros(T, **f),
        torch.zeros(T, **f),
        torch.zeros(N, T, **f),
    )


def _accumulate(
    X: Any,
    Y: Any,
    groups: np.ndarray,
    n_groups: int,
    *,
    block_rows: int,
    device: torch.device,
) -> list[_Stats]:
    """Stream X, Y in row blocks; accumulate one :class:`_Stats` per group label.

    groups: (M,) int labels in [0, n_groups). Only ``block_rows`` rows are in memory at once.
    """
    M, N = X.shape
    T = Y.shape[1]
    out = [_empty_stats(N, T, device) for _ in range(n_groups)]
    # 0/1 products are exact integers in float32 up to 2**24 rows per block; use the faster
    # float32 matmul for X^T X there and accumulate in float64.
    gram_dtype = torch.float32 if block_rows < 2**24 else torch.float64
    for a in range(0, M, block_rows):
        b = min(M, a + block_rows)
        xb = np.asarray(X[a:b])
        yb = np.asarray(Y[a:b], dtype=np.float64)
        if xb.dtype != np.bool_:
            bad = (xb != 0) & (xb != 1)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise ValueError(
                    f"X must hold 0/1 masks; got X[{a + r}, {c}] = {xb[r, c].item()!r}"
                )
        if not np.isfinite(yb).all():
            r = int(np.argwhere(~np.isfinite(yb))[0][0])
            raise ValueError(
                f"Y must be finite (drop incomplete/NaN rows before fitting); got a non-finite "
                f"value in row {a + r}"
            )
        xt = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(device)
        yt = torch.from_numpy(yb).to(device)
        g = groups[a:b]
        for k in range(n_groups):
            sel = g == k
            cnt = int(sel.sum())
            if cnt == 0:
                continue
            if cnt == b - a:
                xs, ys = xt, yt
            else:
                idx = torch.from_numpy(np.flatnonzero(sel)).to(device)
                xs, ys = xt.index_select(0, idx), yt.index_select(0, idx)
            s = out[k]
            s.n += cnt
            xs64 = xs.double()
            s.sx += xs64.sum(0)
            xg = xs.to(gram_dtype)
            s.G += (xg.T @ xg).double()
            s.sy += ys.sum(0)
            s.syy += (ys * ys).sum(0)
            s.xty += xs64.T @ ys
    return out


def _centred(stats: _Stats, *, standardise: bool):
    """Centred (optionally standardised) normal equations, per row, float64.

    Returns Q (N, N) = Z^T Z / n, q (N, T) = Z^T (y - ybar) / n, yy (T,) = ||y - ybar||^2 / n,
    xbar (N,), scale (N,) (the std, or ones), keep (N,) bool (columns with non-zero variance),
    ybar (T,). Z = (X - xbar) / scale. Columns with zero variance get Q row/col 0 and q 0.
    """
    n = stats.n
    xbar = stats.sx / n
    ybar = stats.sy / n
    Q = stats.G / n - torch.outer(xbar, xbar)
    q = stats.xty / n - torch.outer(xbar, ybar)
    yy = (stats.syy / n - ybar * ybar).clamp_min(0.0)
    var = Q.diagonal().clone().clamp_min(0.0)
    # A 0/1 column with fewer than one differing row in ~1e12 is constant up to rounding.
    keep = var > 1e-12
    if standardise:
        scale = torch.where(keep, var.sqrt(), torch.ones_like(var))
        Q = Q / scale[:, None] / scale[None, :]
        q = q / scale[:, None]
    else:
        scale = torch.ones_like(var)
    kf = keep.to(Q.dtype)
    Q = Q * kf[:, None] * kf[None, :]
    q = q * kf[:, None]
    return Q, q, yy, xbar, scale, keep, ybar


# --------------------------------------------------------------------------------------
# the core solver: FISTA on the Gram matrix, all targets at once


def _soft(z: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - thr, min=0.0)


def _lipschitz(Q: torch.Tensor) -> float:
    """Largest eigenvalue of the PSD matrix Q (N, N)."""
    N = Q.shape[0]
    if N <= 4096:
        return float(torch.linalg.eigvalsh(Q.double()).max().clamp_min(0.0))
    # Power iteration for big N; inflate a little since it approaches from below.
    v = torch.randn(N, 1, dtype=Q.dtype, device=Q.device, generator=None)
    v /= v.norm()
    lam = 0.0
    for _ in range(200):
        w = Q @ v
        new = float(w.norm())
        if new == 0:
            return 0.0
        v = w / new
        if abs(new - lam) <= 1e-6 * new:
            lam = new
            break
        lam = new
    return 1.05 * lam


def _dual_gap(
    W: torch.Tensor, C: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, yy: torch.Tensor
) -> torch.Tensor:
    """Duality gap (T,) float64 of f(w) = yy/2 - q.w + w.Q w/2 + lam |w|_1.

    C = q - Q W (the correlation X^T r / n). Dual point theta = s r with
    s = min(1, lam / ||C||_inf) (sklearn's rescaling). Dot products in float64.
    """
    W64, C64, q64 = W.double(), C.double(), q.double()
    qw = (q64 * W64).sum(0)
    r2 = (yy - qw - (C64 * W64).sum(0)).clamp_min(0.0)  # ||r||^2 / n
    cmax = C64.abs().amax(0)
    lam64 = lam.double()
    s = torch.where(cmax > lam64, lam64 / cmax.clamp_min(1e-300), torch.ones_like(cmax))
    primal = 0.5 * r2 + lam64 * W64.abs().sum(0)
    dual = s * (yy - qw) - 0.5 * s * s * r2
    return primal - dual


def _fista(
    Q: torch.Tensor,
    q: torch.Tensor,
    lam: torch.Tensor,
    W0: torch.Tensor,
    yy: torch.Tensor,
    *,
    L: float,
    tol: float,
    max_iter: int,
    Q64: torch.Tensor | None = None,
    q64: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min_W sum_t yy_t/2 - q_t.w_t + w_t.Q w_t/2 + lam_t |w_t|_1 for all t.

    Q (N, N) PSD, q (N, T), lam (T,), W0 (N, T) warm start, yy (T,) float64.
    Stops target t once its duality gap <= tol * yy_t (sklearn's rule). Converged targets are
    dropped from the working set so they stop costing matmuls. Returns W (N, T) and the
    iteration count per target (T,) (negative where it hit max_iter).

    Q64, q64: float64 copies used for the gap. In float32, q - Q W carries an absolute error
    of ~1e-7 |q| which, at small lambda, swamps a gap of tol * yy; so the gap check (every
    _CHECK_EVERY iterations) recomputes the correlation in float64.
    """
    if Q64 is None:
        Q64, q64 = Q.double(), q.double()
    T = q.shape[1]
    W_out = W0.clone()
    iters = torch.zeros(T, dtype=torch.int64)
    if L <= 0:  # Q == 0: every weight is 0
        return torch.zeros_like(W0), iters
    step = 1.0 / L
    active = torch.arange(T, device=q.device)
    W, Z = W0.clone(), W0.clone()
    qa, lama, yya, q64a = q, lam, yy, q64
    thr = lama * step
    t = torch.ones(T, dtype=q.dtype, device=q.device)
    best_gap = torch.full((T,), math.inf, dtype=torch.float64, device=q.device)
    stall = torch.zeros(T, dtype=torch.int64, device=q.device)
    for it in range(max_iter + 1):
        if it % _CHECK_EVERY == 0 or it == max_iter:
            W64 = W.double()
            C = q64a - Q64 @ W64
            gap = _dual_gap(W64, C, q64a, lama, yya)
            # Precision floor: in float32 the iterate cannot always certify tol (the KKT
            # residual of a float32 fixed point is ~1e-7 |q|). Stop a target whose best gap
            # has not improved by 1% in _STALL_CHECKS checks; it is as converged as the dtype allows.
            improved = gap < 0.99 * best_gap
            best_gap = torch.where(improved, gap, best_gap)
            stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
            done = (gap <= tol * yya) | (stall >= _STALL_CHECKS)
            if it == max_iter:
                done = torch.ones_like(done)
            sparse = int((W != 0).any(1).sum()) < 0.25 * W.shape[0]
            if bool(done.any()):
                W_out[:, active[done]] = W[:, done]
                iters[active[done].cpu()] = it if it < max_iter else -it
                keep = ~done
                if not bool(keep.any()):
                    break
                if it < max_iter:
                    active, W, Z = active[keep], W[:, keep], Z[:, keep]
                    qa, lama, yya, t = qa[:, keep], lama[keep], yya[keep], t[keep]
                    q64a, best_gap, stall = q64a[:, keep], best_gap[keep], stall[keep]
                    thr = lama * step
            step_q = step * qa
        # Rows of Z that are zero for every active target do not contribute to Q @ Z; only
        # worth the gather while the solutions are sparse (decided at each gap check).
        if sparse:
            nzr = (Z != 0).any(1)
            idx = nzr.nonzero().squeeze(1)
            V = torch.addmm(Z + step_q, Q.index_select(1, idx), Z.index_select(0, idx), alpha=-step)
        else:
            V = torch.addmm(Z + step_q, Q, Z, alpha=-step)  # Z - step * (Q Z - q)
        W_new = V - V.clamp(-thr, thr)  # soft-thresholding
        D = W_new - W
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        # Gradient-based adaptive restart (O'Donoghue & Candes 2015), per target.
        restart = ((Z - W_new) * D).sum(0) > 0
        beta = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        Z = torch.addcmul(W_new, D, beta[None, :])
        W = W_new
    return W_out, iters


def _solve(Q, q, lam, W0, yy, *, L, tol, max_iter, Q64=None, q64=None) -> torch.Tensor:
    # FISTA's momentum drives differences geometrically towards 0 and through the subnormal
    # range, where x86 CPUs take a ~100x slower path: a 50-target path took 168 s instead of
    # 8 s. Flush subnormals to zero while solving (torch has no getter for this flag; the
    # default, off, is restored).
    flushed = Q.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        W, iters = _fista(Q, q, lam, W0, yy, L=L, tol=tol, max_iter=max_iter, Q64=Q64, q64=q64)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    n_bad = int((iters < 0).sum())
    if n_bad:
        logger.warning(
            "lasso did not reach tol=%g within max_iter=%d for %d of %d targets",
            tol, max_iter, n_bad, q.shape[1],
        )
    return W


# --------------------------------------------------------------------------------------
# helpers shared by the backends


def _val_mse(stats: _Stats, W: torch.Tensor, b: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """(T',) float64 mean squared error of bias b (T',) + X @ W (N, T') on the rows of stats,
    for targets ``cols`` (default: all T)."""
    W = W.double()
    syy, sy, xty = stats.syy, stats.sy, stats.xty
    if cols is not None:
        syy, sy, xty = syy[cols], sy[cols], xty[:, cols]
    sse = (
        syy
        - 2.0 * b * sy
        - 2.0 * (W * xty).sum(0)
        + stats.n * b * b
        + 2.0 * b * (stats.sx @ W)
        + (W * (stats.G @ W)).sum(0)
    )
    return sse.clamp_min(0.0) / stats.n


def _lambda_grid(lam_max: np.ndarray, n_lambdas: int, eps: float) -> np.ndarray:
    """(L, T) geometric grid from lam_max down to lam_max * eps."""
    ratios = np.geomspace(1.0, eps, n_lambdas) if n_lambdas > 1 else np.ones(1)
    return ratios[:, None] * lam_max[None, :]


def _lam_max(q: np.ndarray) -> np.ndarray:
    """(T,) smallest lambda giving w = 0: max_j |z_j^T (y - ybar)| / n. Floored so a constant
    target gets a positive (harmless) grid."""
    lm = np.abs(q).max(0)
    return np.where(lm > 0, lm, 1e-12)


def lasso_objective(X: Any, y: Any, w: Any, b: Any, lam: Any) -> float | np.ndarray:
    """The lasso objective in float64: (1/(2M)) ||y - b - X w||^2 + lam ||w||_1.

    X (M, N); y (M,) with w (N,), b and lam scalars -> float; or y (M, T) with w (N, T),
    b (T,), lam scalar or (T,) -> (T,) array.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    r = y - np.asarray(b, dtype=np.float64) - X @ w
    M = X.shape[0]
    out = 0.5 * (r * r).sum(0) / M + np.asarray(lam, dtype=np.float64) * np.abs(w).sum(0)
    return float(out) if np.ndim(out) == 0 else out


# --------------------------------------------------------------------------------------
# public API


def fit_lasso(
    X: Any,
    Y: Any,
    *,
    n_lambdas: int = 100,
    eps: float = 1e-3,
    val_fraction: float = 0.1,
    seed: int = 0,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    block_rows: int = 4096,
    tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER,
    patience: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LassoFit:
    """Fit one lasso datamodel per target with a per-target lambda chosen on held-out models.

    Args:
        X: (M, N) 0/1 masks (bool or uint8), numpy or zarr; read in row blocks.
        Y: (M, T) float margins, numpy or zarr; every value must be finite.
        n_lambdas: L, the length of the geometric path lam_max -> lam_max * eps per target,
            where lam_max = max_j |z_j^T (y - ybar)| / M_fit on the standardised features z.
        eps: ratio of the smallest to the largest lambda.
        val_fraction: share of the M models held out for choosing lambda, drawn with
            ``numpy.random.default_rng(seed).permutation(M)`` (the first round(fraction*M)).
        seed: seed of that draw.
        backend: "torch" (all targets at once, streamed) or "sklearn" (per-target reference
            loop over sklearn's coordinate descent; loads X into memory).
        device: torch device for the torch backend ("cpu", "cuda", ...).
        dtype: "float32" or "float64", the solver's precision (statistics are float64).
        block_rows: rows of X / Y read at once.
        tol: per-target stopping rule: duality gap <= tol * ||y - ybar||^2 / M (the same rule
            as scikit-learn's tol).
        max_iter: iteration cap per lambda (FISTA iterations, or sklearn epochs).
        patience: per-target early stop of the path (as in fast_l1): once a target's
            validation MSE has not improved for ``patience`` consecutive lambdas, its path
            ends there (smaller lambdas, which are denser and slower, would not be chosen
            unless the validation curve dips again). ``val_mse_path`` is NaN past the stop.
            None: every target runs the whole path. Both backends apply the same rule.
        progress: optional callable(done, total) called after every lambda and after the
            refit; total = n_lambdas + 1 (the last step is the refit on all models).

    Returns:
        :class:`LassoFit`; ``weight`` (N, T) is in raw mask units, so
        ``prediction = bias + mask @ weight``. Columns of X that are constant over the models
        used get weight 0.
    """
    M, N, T = _check_xy(X, Y)
    _check_options(backend, dtype, block_rows, tol, max_iter)
    if not isinstance(n_lambdas, (int, np.integer)) or n_lambdas < 1:
        raise ValueError(f"n_lambdas must be an integer >= 1; got {n_lambdas!r}")
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must be in (0, 1); got {eps!r}")
    if patience is not None and (not isinstance(patience, (int, np.integer)) or patience < 1):
        raise ValueError(f"patience must be None or an integer >= 1; got {patience!r}")
    is_val = _split(M, val_fraction, seed)
    if backend == "sklearn":
        return _fit_lasso_sklearn(
            X, Y, is_val, n_lambdas=n_lambdas, eps=eps, tol=tol, max_iter=max_iter,
            patience=patience, progress=progress,
        )
    dev = torch.device(device)
    tdt = _DTYPES[dtype]
    fit_s, val_s = _accumulate(
        X, Y, is_val.astype(np.int64), 2, block_rows=block_rows, device=dev
    )
    total = n_lambdas + 1

    Q64, q64, yy, xbar, scale, keep, ybar = _centred(fit_s, standardise=True)
    lambdas = _lambda_grid(_lam_max(q64.cpu().numpy()), n_lambdas, eps)
    Q, q = Q64.to(tdt), q64.to(tdt)
    L = _lipschitz(Q64)
    lam_t = torch.from_numpy(lambdas).to(dev, tdt)
    W = torch.zeros(N, T, dtype=tdt, device=dev)
    best_mse = torch.full((T,), math.inf, dtype=torch.float64, device=dev)
    best_W = torch.zeros_like(W)
    best_idx = torch.zeros(T, dtype=torch.int64, device=dev)
    mse_path = torch.full((n_lambdas, T), math.nan, dtype=torch.float64, device=dev)
    alive = torch.ones(T, dtype=torch.bool, device=dev)  # targets whose path goes on
    for li in range(n_lambdas):
        cols = alive.nonzero().squeeze(1)
        if len(cols):
            Wa = _solve(Q, q[:, cols], lam_t[li, cols], W[:, cols], yy[cols], L=L,
                        tol=tol, max_iter=max_iter, Q64=Q64, q64=q64[:, cols])
            W[:, cols] = Wa
            w_raw = Wa.double() / scale[:, None]
            mse = _val_mse(val_s, w_raw, ybar[cols] - xbar @ w_raw, cols)
            mse_path[li, cols] = mse
            better = mse < best_mse[cols]
            bc = cols[better]
            best_mse[bc] = mse[better]
            best_idx[bc] = li
            best_W[:, bc] = Wa[:, better]
            if patience is not None:
                alive[cols[(li - best_idx[cols]) >= patience]] = False
        if progress is not None:
            progress(li + 1, total)

    # Refit on all models at the chosen lambda, warm-started from the fitting-share solution.
    all_s = fit_s + val_s
    Q64, q64, yy, xbar_a, scale_a, keep_a, ybar_a = _centred(all_s, standardise=True)
    lam_best = lam_t.gather(0, best_idx[None, :])[0]
    W0 = (best_W.double() / scale[:, None] * scale_a[:, None] * keep_a[:, None]).to(tdt)
    W = _solve(
        Q64.to(tdt), q64.to(tdt), lam_best, W0, yy, L=_lipschitz(Q64), tol=tol,
        max_iter=max_iter, Q64=Q64, q64=q64,
    )
    w_raw = W.double() / scale_a[:, None]
    bias = ybar_a - xbar_a @ w_raw
    if progress is not None:
        progress(total, total)
    weight = w_raw.to(torch.float32)
    best_np = best_idx.cpu().numpy()
    return LassoFit(
        weight=weight.cpu().numpy(),
        bias=bias.cpu().numpy(),
        lam=lambdas[best_np, np.arange(T)],
        val_mse=best_mse.cpu().numpy(),
        nnz=(weight != 0).sum(0).cpu().numpy().astype(np.int64),
        lambdas=lambdas,
        val_mse_path=mse_path.cpu().numpy(),
        n_train=int(fit_s.n),
        n_val=int(val_s.n),
    )


def solve_lasso(
    X: Any,
    Y: Any,
    lam: float | np.ndarray,
    *,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    block_rows: int = 4096,
    tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray]:
    """Lasso at one fixed lambda per target on RAW features (no standardisation).

    Solves min_{w,b} (1/(2M)) ||y_t - b - X w||^2 + lam_t ||w||_1 over all M rows, the same
    problem as ``sklearn.linear_model.Lasso(alpha=lam_t, fit_intercept=True)``.

    Args:
        X: (M, N) 0/1 masks; Y: (M, T) float; lam: scalar or (T,) positive.
        Other options as in :func:`fit_lasso`.

    Returns:
        W (N, T) in the solver's dtype (float64 for backend="sklearn") and b (T,) float64.
    """
    M, N, T = _check_xy(X, Y)
    _check_options(backend, dtype, block_rows, tol, max_iter)
    if M < 2:
        raise ValueError(f"need at least 2 models (rows); got M={M}")
    lam_np = np.asarray(lam, dtype=np.float64)
    if lam_np.ndim == 0:
        lam_np = np.full(T, float(lam_np))
    if lam_np.shape != (T,):
        raise ValueError(f"lam must be a scalar or shape ({T},); got shape {lam_np.shape}")
    if not (np.isfinite(lam_np).all() and (lam_np > 0).all()):
        raise ValueError(f"lam must be finite and > 0; got min {lam_np.min()!r}")
    if backend == "sklearn":
        from sklearn.linear_model import Lasso

        Xn = np.asarray(X[:], dtype=np.float64)
        Yn = np.asarray(Y[:], dtype=np.float64)
        W = np.zeros((N, T))
        b = np.zeros(T)
        for t in range(T):
            m = Lasso(alpha=lam_np[t], fit_intercept=True, tol=tol, max_iter=max_iter)
            m.fit(Xn, Yn[:, t])
            W[:, t], b[t] = m.coef_, m.intercept_
        return W, b
    dev = torch.device(device)
    tdt = _DTYPES[dtype]
    (stats,) = _accumulate(
        X, Y, np.zeros(M, dtype=np.int64), 1, block_rows=block_rows, device=dev
    )
    Q64, q64, yy, xbar, _, _, ybar = _centred(stats, standardise=False)
    W = _solve(
        Q64.to(tdt), q64.to(tdt), torch.from_numpy(lam_np).to(dev, tdt),
        torch.zeros(N, T, dtype=tdt, device=dev), yy,
        L=_lipschitz(Q64), tol=tol, max_iter=max_iter, Q64=Q64, q64=q64,
    )
    b = ybar - xbar @ W.double()
    return W.cpu().numpy(), b.cpu().numpy()


def _fit_lasso_sklearn(
    X: Any,
    Y: Any,
    is_val: np.ndarray,
    *,
    n_lambdas: int,
    eps: float,
    tol: float,
    max_iter: int,
    patience: int | None,
    progress: Callable[[int, int], None] | None,
) -> LassoFit:
    """Per-target reference: the same path, split and refit, one sklearn solve per target.

    Uses sklearn's coordinate descent on a precomputed Gram matrix (shared by all targets)
    with warm starts along each target's own path. Never passes a 2-D y to lasso_path
    (that would solve the multi-task l2,1 problem instead).
    """
    from sklearn.linear_model import lasso_path

    Xn = np.asarray(X[:], dtype=np.float64)
    Yn = np.asarray(Y[:], dtype=np.float64)
    M, N = Xn.shape
    T = Yn.shape[1]
    if not np.isfinite(Yn).all():
        raise ValueError("Y must be finite (drop incomplete/NaN rows before fitting)")

    def standardise(rows):
        Xr = Xn[rows]
        xbar = Xr.mean(0)
        sd = Xr.std(0)
        keep = sd**2 > 1e-12
        sd = np.where(keep, sd, 1.0)
        Z = (Xr - xbar) / sd * keep
        ybar = Yn[rows].mean(0)
        return Z, Yn[rows] - ybar, xbar, sd, ybar

    fit_rows = ~is_val
    Z, Yc, xbar, sd, ybar = standardise(fit_rows)
    Mf = Z.shape[0]
    gram = Z.T @ Z
    Zy = Z.T @ Yc
    lambdas = _lambda_grid(_lam_max(Zy / Mf), n_lambdas, eps)
    Xv, Yv = Xn[is_val], Yn[is_val]
    mse_path = np.full((n_lambdas, T), np.nan)
    coefs_best = np.zeros((N, T))
    for t in range(T):
        if patience is None:
            # lasso_path wants decreasing alphas and returns them in that order.
            _, coefs, _ = lasso_path(
                Z, Yc[:, t], alphas=lambdas[:, t], precompute=gram, Xy=Zy[:, t],
                tol=tol, max_iter=max_iter,
            )
            w_raw = coefs / sd[:, None]  # (N, L)
            b = ybar[t] - xbar @ w_raw
            mse = ((Yv[:, t : t + 1] - b[None, :] - Xv @ w_raw) ** 2).mean(0)
            mse_path[:, t] = mse
            coefs_best[:, t] = coefs[:, int(np.argmin(mse))]
        else:  # one lambda at a time, warm-started, so the path can stop early
            w, best, best_li = np.zeros(N), np.inf, 0
            for li in range(n_lambdas):
                _, c, _ = lasso_path(Z, Yc[:, t], alphas=[lambdas[li, t]], precompute=gram, Xy=Zy[:, t],
                                     coef_init=w, tol=tol, max_iter=max_iter)
                w = c[:, 0]
                w_raw = w / sd
                mse = float(((Yv[:, t] - (ybar[t] - xbar @ w_raw) - Xv @ w_raw) ** 2).mean())
                mse_path[li, t] = mse
                if mse < best:
                    best, best_li, coefs_best[:, t] = mse, li, w
                if li - best_li >= patience:
                    break
        if progress is not None:
            progress(int(round((t + 1) / T * n_lambdas)), n_lambdas + 1)
    best = np.nanargmin(mse_path, axis=0)
    lam = lambdas[best, np.arange(T)]

    Z, Yc, xbar_a, sd_a, ybar_a = standardise(np.ones(M, dtype=bool))
    gram = Z.T @ Z
    Zy = Z.T @ Yc
    W = np.zeros((N, T))
    for t in range(T):
        w0 = coefs_best[:, t] / sd * sd_a
        _, coefs, _ = lasso_path(
            Z, Yc[:, t], alphas=[lam[t]], precompute=gram, Xy=Zy[:, t], coef_init=w0,
            tol=tol, max_iter=max_iter,
        )
        W[:, t] = coefs[:, 0] / sd_a
    bias = ybar_a - xbar_a @ W
    if progress is not None:
        progress(n_lambdas + 1, n_lambdas + 1)
    weight = W.astype(np.float32)
    return LassoFit(
        weight=weight,
        bias=bias,
        lam=lam,
        val_mse=mse_path[best, np.arange(T)],
        nnz=(weight != 0).sum(0).astype(np.int64),
        lambdas=lambdas,
        val_mse_path=mse_path,
        n_train=int(Mf),
        n_val=int(is_val.sum()),
    )
