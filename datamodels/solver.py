"""Per-target lasso for datamodels, solved for all T targets at once.

For every target t independently::

    min_{w, b}  (1 / (2 M)) * ||y_t - b - X w||^2 + lam_t * ||w||_1      (b unpenalised)

X is the (M, N) 0/1 mask matrix (M models, N training examples), Y the (M, T) margins
(T targets). This is the fitting step of datamodels (Ilyas et al., 2022, eq. 2).

The torch backend never holds X in memory: it streams row blocks of X and Y (numpy or zarr
arrays) and accumulates sufficient statistics of the fitting share: U^T U with u = x - 1/2
(exact in float32 up to 2^24 models, one (N, N) array), column sums, and per target block
U^T Y, Y sums and squares. The validation share is kept as int8 rows (its predictions give
the validation MSE; its Gram enters the refit only through products). Targets are solved in
blocks of T' (all T when they fit), each block one more pass over X and Y, so memory is
O(N^2 + N T' + val_fraction M N) and the cost of a solve does not grow with M
(docs/memory.md).

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

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["LassoFit", "fit_lasso", "solve_lasso", "lasso_objective", "target_block", "EXACT_ROWS"]

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
        seconds: wall time of the passes over the data ("stats") and of the solves ("solve").
    """

    weight: Any
    bias: np.ndarray
    lam: np.ndarray
    val_mse: np.ndarray
    nnz: np.ndarray
    lambdas: np.ndarray
    val_mse_path: np.ndarray
    n_train: int
    n_val: int
    seconds: dict = field(default_factory=dict)

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

# Masks are centred at 1/2 before any product: u = x - 1/2 is +-1/2, so every entry of
# U^T U is a multiple of 1/4 of magnitude <= n/4, exact in float32 while n <= 2**24 (a 24-bit
# significand), whatever order the matmul sums in. Centring at 1/2 rather than at the column
# means (unknown until the pass ends) keeps U^T U / n within O(1/n) of the covariance for
# alpha = 1/2 masks, so the float32 products of the operator lose no digits to cancellation.
EXACT_ROWS = 2**24
# Bytes of one temporary of the streamed pass and of the operator's row gathers.
_CHUNK_BYTES = 2**28
# Bytes the (N, T') arrays of one target block may take together (on a CPU; on a GPU
# _GPU_BLOCK_BYTES), and how many float32-sized (N, T') arrays a block holds at its peak (path,
# refit and FISTA; a float64 array counts twice): 24, measured (docs/memory.md).
_BLOCK_BYTES = 2 * 2**30
_GPU_BLOCK_BYTES = 16 * 2**30
_BLOCK_ARRAYS = 24


def _chunk_rows(N: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // (itemsize * max(N, 1)))


def target_block(N: int, T: int, device: str | torch.device = "cpu") -> int:
    """T', the targets solved together: all T when their (N, T') working arrays fit in 2 GiB
    (16 GiB on a GPU), else as many as do (372 at N = 60,000 on a CPU). Each further block is
    one more pass over the data; the answer does not depend on T'."""
    budget = _GPU_BLOCK_BYTES if torch.device(device).type == "cuda" else _BLOCK_BYTES
    return int(max(1, min(T, budget // (4 * _BLOCK_ARRAYS * max(N, 1)))))


def _check_rows(M: int, dtype: str) -> None:
    if dtype == "float32" and M > EXACT_ROWS:
        raise ValueError(
            f"X has {M} rows (models); the float32 statistics of 0/1 masks are exact up to 2^24 = "
            f"{EXACT_ROWS} models: fit at most {EXACT_ROWS} of them, or use dtype='float64'"
        )


@dataclass
class _Masks:
    """What the solver keeps of the masks after one pass.

    H (N, N) U^T U over the fitting rows (u = x - 1/2), in the solver's dtype (exact);
    su (N,) float64, the sum of u over the fitting rows; n fitting rows;
    V (n_val, N) int8, 2u = +-1 for each validation row (the validation share is kept whole:
    its predictions give the validation MSE, its Gram joins H only through products).
    """

    H: torch.Tensor
    su: torch.Tensor
    n: int
    V: torch.Tensor


@dataclass
class _Targets:
    """Sums over the fitting rows for the targets of one block (float64): suy (N, T') U^T Y,
    sy (T',), syy (T',); and the validation rows' margins Yv (n_val, T')."""

    suy: torch.Tensor
    sy: torch.Tensor
    syy: torch.Tensor
    Yv: torch.Tensor


def _stream(
    X: Any,
    Y: Any,
    is_val: np.ndarray,
    t0: int,
    t1: int,
    *,
    masks: _Masks | None,
    block_rows: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[_Masks, _Targets]:
    """One pass over X, Y in row blocks: the sums of targets t0:t1, and (when ``masks`` is
    None, the first pass) the masks' statistics, checking that X is 0/1 and Y finite.

    Only ``block_rows`` rows are read at once and at most _CHUNK_BYTES of them converted.
    """
    M, N = (int(s) for s in X.shape)
    first = masks is None
    n_val = int(is_val.sum())
    f64 = dict(dtype=torch.float64, device=device)
    if first:
        masks = _Masks(torch.zeros(N, N, dtype=dtype, device=device), torch.zeros(N, **f64), 0,
                       torch.empty(n_val, N, dtype=torch.int8, device=device))
    tb = t1 - t0
    tg = _Targets(torch.zeros(N, tb, **f64), torch.zeros(tb, **f64), torch.zeros(tb, **f64),
                  torch.empty(n_val, tb, **f64))
    chunk = _chunk_rows(N, 8)
    vpos = 0
    for a in range(0, M, block_rows):
        b = min(M, a + block_rows)
        xb = np.asarray(X[a:b])
        yb = np.asarray(Y[a:b])
        if first:
            if xb.dtype != np.bool_:
                bad = (xb != 0) & (xb != 1)
                if bad.any():
                    r, c = np.argwhere(bad)[0]
                    raise ValueError(f"X must hold 0/1 masks; got X[{a + r}, {c}] = {xb[r, c].item()!r}")
            finite = np.isfinite(yb).all(1)
            if not finite.all():
                r = int(np.flatnonzero(~finite)[0])
                raise ValueError(
                    f"Y must be finite (drop incomplete/NaN rows before fitting); got a non-finite "
                    f"value in row {a + r}"
                )
        yb = np.asarray(yb[:, t0:t1], dtype=np.float64)
        v = is_val[a:b]
        if v.any():
            nv = int(v.sum())
            if first:
                masks.V[vpos:vpos + nv] = torch.from_numpy(np.asarray(xb[v], dtype=np.int8) * 2 - 1).to(device)
            tg.Yv[vpos:vpos + nv] = torch.from_numpy(yb[v]).to(device)
            vpos += nv
        xf, yf = (xb, yb) if not v.any() else (xb[~v], yb[~v])
        for c in range(0, len(xf), chunk):
            u = torch.from_numpy(np.asarray(xf[c:c + chunk], dtype=np.float32)).to(device).sub_(0.5)
            yc = torch.from_numpy(yf[c:c + chunk]).to(device)
            if first:
                ug = u.to(dtype)
                masks.H.addmm_(ug.T, ug)  # in place: no second (N, N) array
                masks.su += u.sum(0, dtype=torch.float64)
                masks.n += int(u.shape[0])
            u64 = u.double()
            tg.suy.addmm_(u64.T, yc)
            tg.sy += yc.sum(0)
            tg.syy += (yc * yc).sum(0)
    return masks, tg


class _Gram:
    """The centred, optionally standardised Gram matrix of one share of the rows, as an operator:

        Q = D (H / n - d d^T) D,   D = diag(keep / scale)   (N, N)

    H = U^T U over the share (plus V^T V / 4 for ``extra`` rows V = 2u), u = x - 1/2,
    d = mean(u), scale = the population std of each mask column (ones when not standardising),
    keep = columns with non-zero variance (var(x) = 1/4 - d^2: u^2 = 1/4). Q is never formed;
    a product with it is one matmul with H (only its rows where the right-hand side is
    non-zero) plus O(N T') work.
    """

    def __init__(self, masks: _Masks, *, extra: bool, standardise: bool):
        self.H = masks.H
        self.V = masks.V if extra and masks.V.shape[0] else None
        su = masks.su if self.V is None else masks.su + 0.5 * self.V.sum(0, dtype=torch.float64)
        self.n = masks.n + (0 if self.V is None else int(self.V.shape[0]))
        self.d = su / self.n
        var = (0.25 - self.d * self.d).clamp_min(0.0)
        # A 0/1 column with fewer than one differing row in ~1e12 is constant up to rounding.
        self.keep = var > 1e-12
        ones = torch.ones_like(var)
        self.scale = torch.where(self.keep, var.sqrt(), ones) if standardise else ones
        self.ks = self.keep.to(var.dtype) / self.scale  # float64: raw weight = W * ks
        self._w = {}  # ks and d in the working dtype
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # gathered rows of H, see _gathered

    @property
    def xbar(self) -> torch.Tensor:
        return self.d + 0.5

    def _vec(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dt not in self._w:
            self._w[dt] = (self.ks.to(dt), self.d.to(dt))
        return self._w[dt]

    def _gathered(self, rows: torch.Tensor) -> torch.Tensor | None:
        """H[rows] (len(rows), N), kept while the same rows come back (the support of a FISTA
        iterate changes rarely, and with few targets the gather costs more than the matmul);
        two sets at most, each at most _CHUNK_BYTES. None when ``rows`` are too many."""
        for i, (r, h) in enumerate(self._rows):
            if r.shape == rows.shape and torch.equal(r, rows):
                self._rows.append(self._rows.pop(i))
                return h
        if len(rows) * self.H.shape[0] * self.H.element_size() > _CHUNK_BYTES:
            return None
        h = self.H.index_select(0, rows)
        self._rows = self._rows[-1:] + [(rows.clone(), h)]
        return h

    def release(self) -> None:
        """Drop the gathered rows (another operator's solve comes next)."""
        self._rows = []

    def _products(self, Zs: torch.Tensor, rows: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
        """(H [+ V^T V / 4]) @ Zs in dtype dt, using only ``rows`` of Zs (its non-zero rows)."""
        N = self.H.shape[0]
        cr = _chunk_rows(N, torch.finfo(dt).bits // 8)
        hr = self._gathered(rows) if rows is not None and len(rows) < N else None
        if self.H.dtype == dt and (rows is None or len(rows) == N):
            P = self.H @ Zs
        elif hr is not None:
            P = hr.to(dt).T @ Zs.index_select(0, rows)
        else:
            rows = torch.arange(N, device=Zs.device) if rows is None else rows
            P = torch.zeros(N, Zs.shape[1], dtype=dt, device=Zs.device)
            for c in range(0, len(rows), cr):
                r = rows[c:c + cr]
                P.addmm_(self.H.index_select(0, r).to(dt).T, Zs.index_select(0, r))
        if self.V is not None:
            rows = torch.arange(N, device=Zs.device) if rows is None else rows
            cv = _chunk_rows(self.V.shape[0], torch.finfo(dt).bits // 8)
            A = torch.zeros(self.V.shape[0], Zs.shape[1], dtype=dt, device=Zs.device)
            for c in range(0, len(rows), cv):
                r = rows[c:c + cv]
                A.addmm_(self.V.index_select(1, r).to(dt), Zs.index_select(0, r))
            for c in range(0, N, cv):
                P[c:c + cv].addmm_(self.V[:, c:c + cv].to(dt).T, A, alpha=0.25)
        return P

    def matmul(self, Z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Q @ Z (N, T') in Z's dtype; ``rows``: the rows where Z may be non-zero (None: all)."""
        dt = Z.dtype
        ks, d = self._vec(dt)
        Zs = Z * ks[:, None]
        P = self._products(Zs, rows, dt)
        P.div_(self.n)
        P.addr_(d, d @ Zs, alpha=-1.0)
        return P.mul_(ks[:, None])

    def matmul64(self, W: torch.Tensor) -> torch.Tensor:
        """Q @ W in float64, from the exact H (in row chunks): the duality gap's correlation."""
        W = W.double()
        rows = (W != 0).any(1).nonzero().squeeze(1)
        return self.matmul(W, rows)

    def lipschitz(self) -> float:
        """Largest eigenvalue of Q: eigvalsh of Q formed in float64 up to N = 4096, else
        Lanczos on products with Q (float32 products, inflated by 5%: it approaches from below)."""
        N = self.H.shape[0]
        dev = self.H.device
        if N <= 4096:
            Q = self.matmul64(torch.eye(N, dtype=torch.float64, device=dev))
            return float(torch.linalg.eigvalsh(0.5 * (Q + Q.T)).max().clamp_min(0.0))
        dt = self.H.dtype
        return 1.05 * _lanczos_max(lambda v: self.matmul(v[:, None].to(dt))[:, 0].double(), N, dev)


def _lanczos_max(matvec: Callable[[torch.Tensor], torch.Tensor], N: int, device: torch.device,
                 steps: int = 64) -> float:
    """Largest eigenvalue of a symmetric PSD operator: Lanczos with full reorthogonalisation
    from a start vector seeded by 0, until the top Ritz value changes by < 1e-6 relative."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(N, generator=g, dtype=torch.float64).to(device)
    v /= v.norm()
    basis = [v]
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for _ in range(min(steps, N)):
        w = matvec(basis[-1])
        alphas.append(float(w @ basis[-1]))
        B = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan)
            w = w - B.T @ (B @ w)
        beta = float(w.norm())
        k = len(alphas)
        Tm = torch.zeros(k, k, dtype=torch.float64)
        Tm[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
        if k > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            Tm[range(1, k), range(k - 1)] = off
            Tm[range(k - 1), range(1, k)] = off
        new = float(torch.linalg.eigvalsh(Tm).max())
        if beta <= 1e-12 * max(abs(new), 1e-300) or abs(new - theta) <= 1e-6 * abs(new):
            return max(new, 0.0)
        theta = new
        betas.append(beta)
        basis.append(w / beta)
    return max(theta, 0.0)


def _centred_targets(op: _Gram, suy: torch.Tensor, sy: torch.Tensor, syy: torch.Tensor):
    """q (N, T') float64 = D cov(u, y), yy (T',) = var(y), ybar (T',) over the operator's share."""
    ybar = sy / op.n
    q = suy / op.n
    q.addr_(op.d, ybar, alpha=-1.0)
    q.mul_(op.ks[:, None])
    yy = (syy / op.n - ybar * ybar).clamp_min(0.0)
    return q, yy, ybar


def _join_validation(masks: _Masks, tg: _Targets) -> None:
    """Add the validation rows to the fitting rows' target sums, in place (for the refit)."""
    V, Yv = masks.V, tg.Yv
    if V.shape[0]:
        N = V.shape[1]
        cv = _chunk_rows(V.shape[0], 8)
        for c in range(0, N, cv):
            tg.suy[c:c + cv].addmm_(V[:, c:c + cv].double().T, Yv, alpha=0.5)
        tg.sy += Yv.sum(0)
        tg.syy += (Yv * Yv).sum(0)


def _val_mse(V: torch.Tensor, Yv: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T',) float64 mean squared error on the validation rows V (n_val, N) int8 (2u) with
    margins Yv (n_val, T') of the prediction b (T',) + x @ w, x = (V + 1) / 2, w (N, T') raw."""
    w = w.double()
    rows = (w != 0).any(1).nonzero().squeeze(1)
    pred = (b + 0.5 * w.sum(0)).expand(V.shape[0], -1).clone()
    cv = _chunk_rows(V.shape[0], 8)
    for c in range(0, len(rows), cv):
        r = rows[c:c + cv]
        pred.addmm_(V.index_select(1, r).double(), w.index_select(0, r), alpha=0.5)
    resid = Yv - pred
    return (resid * resid).mean(0)


# --------------------------------------------------------------------------------------
# the core solver: FISTA on the Gram matrix, all targets at once


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
    op: _Gram,
    q: torch.Tensor,
    q64: torch.Tensor,
    lam: torch.Tensor,
    W0: torch.Tensor,
    yy: torch.Tensor,
    *,
    L: float,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min_W sum_t yy_t/2 - q_t.w_t + w_t.Q w_t/2 + lam_t |w_t|_1 for all t.

    op: the operator Q (N, N) PSD; q (N, T) in the working dtype and q64 the same in float64;
    lam (T,), W0 (N, T) warm start, yy (T,) float64. Stops target t once its duality gap
    <= tol * yy_t (sklearn's rule). Converged targets are dropped from the working set so
    they stop costing matmuls. Returns W (N, T) and the iteration count per target (T,)
    (negative where it hit max_iter).

    In float32, q - Q W carries an absolute error of ~1e-7 |q| which, at small lambda, swamps
    a gap of tol * yy; so the gap check (every _CHECK_EVERY iterations) recomputes the
    correlation in float64 from the exact statistics (:meth:`_Gram.matmul64`).
    """
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
            C = q64a - op.matmul64(W)
            gap = _dual_gap(W, C, q64a, lama, yya)
            del C
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
        rows = (Z != 0).any(1).nonzero().squeeze(1) if sparse else None
        V = op.matmul(Z, rows).mul_(-step).add_(Z).add_(step_q)  # Z - step * (Q Z - q)
        W_new = V - V.clamp(-thr, thr)  # soft-thresholding
        del V
        D = W_new - W
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        # Gradient-based adaptive restart (O'Donoghue & Candes 2015), per target.
        restart = ((Z - W_new) * D).sum(0) > 0
        beta = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        Z = torch.addcmul(W_new, D, beta[None, :])
        del D
        W = W_new
    return W_out, iters


def _solve(op: _Gram, q, q64, lam, W0, yy, *, L, tol, max_iter) -> torch.Tensor:
    # FISTA's momentum drives differences geometrically towards 0 and through the subnormal
    # range, where x86 CPUs take a ~100x slower path: a 50-target path took 168 s instead of
    # 8 s. Flush subnormals to zero while solving (torch has no getter for this flag; the
    # default, off, is restored).
    flushed = q.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        W, iters = _fista(op, q, q64, lam, W0, yy, L=L, tol=tol, max_iter=max_iter)
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


def _fit_block(
    masks: _Masks,
    tg: _Targets,
    fit_op: _Gram,
    all_op: _Gram,
    L_fit: float,
    L_all: Callable[[], float],
    *,
    n_lambdas: int,
    eps: float,
    tol: float,
    max_iter: int,
    patience: int | None,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """The lambda path on the fitting share, lambda chosen on the validation rows, and the refit
    on all rows, for the targets of one block. Returns numpy arrays (weight float32 (N, T'))."""
    dev = tg.suy.device
    N, T = tg.suy.shape
    q64, yy, ybar = _centred_targets(fit_op, tg.suy, tg.sy, tg.syy)
    lambdas = _lambda_grid(_lam_max(q64.cpu().numpy()), n_lambdas, eps)
    q = q64.to(dtype)
    lam_t = torch.from_numpy(lambdas).to(dev, dtype)
    W = torch.zeros(N, T, dtype=dtype, device=dev)
    best_mse = torch.full((T,), math.inf, dtype=torch.float64, device=dev)
    best_W = torch.zeros_like(W)
    best_idx = torch.zeros(T, dtype=torch.int64, device=dev)
    mse_path = torch.full((n_lambdas, T), math.nan, dtype=torch.float64, device=dev)
    alive = torch.ones(T, dtype=torch.bool, device=dev)  # targets whose path goes on
    xbar = fit_op.xbar
    for li in range(n_lambdas):
        cols = alive.nonzero().squeeze(1)
        if len(cols):
            Wa = _solve(fit_op, q[:, cols], q64[:, cols], lam_t[li, cols], W[:, cols], yy[cols], L=L_fit,
                        tol=tol, max_iter=max_iter)
            W[:, cols] = Wa
            w_raw = Wa.double() * fit_op.ks[:, None]
            mse = _val_mse(masks.V, tg.Yv[:, cols], w_raw, ybar[cols] - xbar @ w_raw)
            del w_raw
            mse_path[li, cols] = mse
            better = mse < best_mse[cols]
            bc = cols[better]
            best_mse[bc] = mse[better]
            best_idx[bc] = li
            best_W[:, bc] = Wa[:, better]
            del Wa
            if patience is not None:
                alive[cols[(li - best_idx[cols]) >= patience]] = False
        if progress is not None:
            progress(li + 1)
    del W, q, q64

    # Refit on all models at the chosen lambda, warm-started from the fitting-share solution.
    fit_op.release()
    _join_validation(masks, tg)
    q64, yy, ybar = _centred_targets(all_op, tg.suy, tg.sy, tg.syy)
    lam_best = lam_t.gather(0, best_idx[None, :])[0]
    W0 = (best_W.double() * (fit_op.ks * all_op.scale * all_op.keep)[:, None]).to(dtype)
    del best_W
    W = _solve(all_op, q64.to(dtype), q64, lam_best, W0, yy, L=L_all(), tol=tol, max_iter=max_iter)
    all_op.release()
    w_raw = W.double() * all_op.ks[:, None]
    bias = ybar - all_op.xbar @ w_raw
    weight = w_raw.to(torch.float32)
    best_np = best_idx.cpu().numpy()
    return {
        "weight": weight.cpu().numpy(),
        "bias": bias.cpu().numpy(),
        "lam": lambdas[best_np, np.arange(T)],
        "val_mse": best_mse.cpu().numpy(),
        "nnz": (weight != 0).sum(0).cpu().numpy().astype(np.int64),
        "lambdas": lambdas,
        "val_mse_path": mse_path.cpu().numpy(),
    }


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
    target_block: int | None = None,
    out: Any = None,
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
        dtype: "float32" or "float64", the solver's precision and that of the (N, N) mask
            statistics (exact either way; float32 up to 2^24 models).
        block_rows: rows of X / Y read at once.
        tol: per-target stopping rule: duality gap <= tol * ||y - ybar||^2 / M (the same rule
            as scikit-learn's tol).
        max_iter: iteration cap per lambda (FISTA iterations, or sklearn epochs).
        patience: per-target early stop of the path (as in fast_l1): once a target's
            validation MSE has not improved for ``patience`` consecutive lambdas, its path
            ends there (smaller lambdas, which are denser and slower, would not be chosen
            unless the validation curve dips again). ``val_mse_path`` is NaN past the stop.
            None: every target runs the whole path. Both backends apply the same rule.
        target_block: T', targets solved together (default :func:`target_block`: all T while
            their (N, T') working arrays fit in 2 GiB, 16 GiB on a GPU). Each further block
            reads X and Y again; the answer does not depend on T'.
        out: optional (N, T) array (numpy or zarr, e.g. the store's) that receives the weights
            one target block at a time; ``LassoFit.weight`` is then ``out``. Default: a new
            numpy array.
        progress: optional callable(done, total) called after every lambda and after the
            refit of every target block; total = blocks * (n_lambdas + 1).

    Returns:
        :class:`LassoFit`; ``weight`` (N, T) is in raw mask units, so
        ``prediction = bias + mask @ weight``. Columns of X that are constant over the models
        used get weight 0.

    Memory (torch backend): the (N, N) statistics in ``dtype`` (4 N^2 bytes in float32), the
    validation rows as int8 (val_fraction * M * N bytes) and one target block's working arrays
    (about 96 N T' bytes); never an (N, T) array unless ``out`` is None. See docs/memory.md.
    """
    M, N, T = _check_xy(X, Y)
    _check_options(backend, dtype, block_rows, tol, max_iter)
    if not isinstance(n_lambdas, (int, np.integer)) or n_lambdas < 1:
        raise ValueError(f"n_lambdas must be an integer >= 1; got {n_lambdas!r}")
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must be in (0, 1); got {eps!r}")
    if patience is not None and (not isinstance(patience, (int, np.integer)) or patience < 1):
        raise ValueError(f"patience must be None or an integer >= 1; got {patience!r}")
    tb = _check_block(target_block, N, T, device)
    _check_out(out, N, T)
    if backend == "torch":
        _check_rows(M, dtype)
    is_val = _split(M, val_fraction, seed)
    if backend == "sklearn":
        fit = _fit_lasso_sklearn(
            X, Y, is_val, n_lambdas=n_lambdas, eps=eps, tol=tol, max_iter=max_iter,
            patience=patience, progress=progress,
        )
        if out is not None:
            out[:, :] = fit.weight
            fit = dataclasses.replace(fit, weight=out)
        return fit
    dev = torch.device(device)
    tdt = _DTYPES[dtype]
    weight = out if out is not None else np.zeros((N, T), dtype=np.float32)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("bias", "lam", "val_mse", "nnz", "lambdas", "val_mse_path")}
    blocks = list(range(0, T, tb))
    total = len(blocks) * (n_lambdas + 1)
    masks = fit_op = all_op = None
    L_fit = 0.0
    L_all: list[float] = []
    seconds = {"stats": 0.0, "solve": 0.0}
    for bi, t0 in enumerate(blocks):
        t1 = min(T, t0 + tb)
        tic = time.perf_counter()
        masks, tg = _stream(X, Y, is_val, t0, t1, masks=masks, block_rows=block_rows, device=dev, dtype=tdt)
        seconds["stats"] += time.perf_counter() - tic
        tic = time.perf_counter()
        if fit_op is None:
            fit_op = _Gram(masks, extra=False, standardise=True)
            all_op = _Gram(masks, extra=True, standardise=True)
            L_fit = fit_op.lipschitz()

        def l_all() -> float:
            if not L_all:
                L_all.append(all_op.lipschitz())
            return L_all[0]

        step = (lambda done, base=bi * (n_lambdas + 1): progress(base + done, total)) if progress else None
        res = _fit_block(masks, tg, fit_op, all_op, L_fit, l_all, n_lambdas=n_lambdas, eps=eps, tol=tol,
                         max_iter=max_iter, patience=patience, dtype=tdt, progress=step)
        del tg
        weight[:, t0:t1] = res.pop("weight")
        for k, v in res.items():
            parts[k].append(v)
        seconds["solve"] += time.perf_counter() - tic
        if step is not None:
            step(n_lambdas + 1)
    cat = {k: np.concatenate(v, axis=-1) for k, v in parts.items()}
    return LassoFit(
        weight=weight,
        n_train=int(masks.n),
        n_val=int(masks.V.shape[0]),
        seconds=seconds,
        **cat,
    )


def _check_block(target_block_: int | None, N: int, T: int, device: str | torch.device = "cpu") -> int:
    if target_block_ is None:
        return target_block(N, T, device)
    if not isinstance(target_block_, (int, np.integer)) or target_block_ < 1:
        raise ValueError(f"target_block must be None or an integer >= 1; got {target_block_!r}")
    return int(min(target_block_, T))


def _check_out(out: Any, N: int, T: int) -> None:
    if out is not None and tuple(getattr(out, "shape", ())) != (N, T):
        raise ValueError(f"out must have shape (N, T) = ({N}, {T}); got {getattr(out, 'shape', None)}")


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
    target_block: int | None = None,
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
    tb = _check_block(target_block, N, T, device)
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
    _check_rows(M, dtype)
    dev = torch.device(device)
    tdt = _DTYPES[dtype]
    is_val = np.zeros(M, dtype=bool)
    W_out = np.zeros((N, T), dtype=np.dtype(dtype))
    b_out = np.zeros(T)
    masks = op = None
    L = 0.0
    for t0 in range(0, T, tb):
        t1 = min(T, t0 + tb)
        masks, tg = _stream(X, Y, is_val, t0, t1, masks=masks, block_rows=block_rows, device=dev, dtype=tdt)
        if op is None:
            op = _Gram(masks, extra=False, standardise=False)
            L = op.lipschitz()
        q64, yy, ybar = _centred_targets(op, tg.suy, tg.sy, tg.syy)
        del tg
        W = _solve(op, q64.to(tdt), q64, torch.from_numpy(lam_np[t0:t1]).to(dev, tdt),
                   torch.zeros(N, t1 - t0, dtype=tdt, device=dev), yy, L=L, tol=tol, max_iter=max_iter)
        W_out[:, t0:t1] = W.cpu().numpy()
        b_out[t0:t1] = (ybar - op.xbar @ W.double()).cpu().numpy()
    return W_out, b_out


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
