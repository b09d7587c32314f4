"""Wall time of datamodels.solver.fit_lasso: torch backend vs the per-target scikit-learn loop.

Same data, same lambda grid (n_lambdas, eps), same tol, same split, same refit. The sklearn
loop (and the optional skglm loop) is timed on a subset of targets and extrapolated
linearly to all T; the output says so. Objective gap: the refit objective of both fits on
the subset's targets, on all M models, at each fit's chosen lambda.

    python benchmarks/fit_speed.py                 # size (a) only
    python benchmarks/fit_speed.py --sizes a b     # (b) is 4x (a) in M*N*T: M and N doubled

Sizes: (a) M=2000, N=1000, T=797 (the digits default); (b) M=4000, N=2000, T=797.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import sklearn
import torch

from datamodels.solver import fit_lasso

SIZES = {"a": (2000, 1000, 797), "b": (4000, 2000, 797)}


def make_data(M, N, T, seed=0, alpha=0.5, k=10, noise=1.0):
    """Fixed-size random masks; margins = 2 + masks @ W + noise with W = k heavy-tailed
    effects per target plus small dense effects (std 0.01)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((M, N), dtype=bool)
    for i in range(M):
        X[i, rng.choice(N, int(round(alpha * N)), replace=False)] = True
    W = rng.normal(0, 0.01, size=(N, T))
    for t in range(T):
        W[rng.choice(N, k, replace=False), t] += rng.standard_t(3, size=k) * 0.3
    Y = 2.0 + X @ W + rng.normal(0, noise, size=(M, T))
    return X, Y.astype(np.float32)


def refit_objective(X, Y, fit, cols):
    """(len(cols),) objective of the refit on all M models, standardised-feature l1 term."""
    Xf = X.astype(np.float64)
    sd = Xf.std(0)
    out = []
    for j, t in enumerate(cols):
        w = fit.weight[:, j].astype(np.float64)
        r = Y[:, t] - fit.bias[j] - Xf @ w
        out.append(0.5 * (r @ r) / len(X) + fit.lam[j] * np.abs(w * sd).sum())
    return np.array(out)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def skglm_path_time(X, Y, fit, cols, tol):
    """Seconds for skglm's Lasso over the same per-target grid (fitting share, standardised,
    warm-started). Path only: no selection or refit. None if skglm is missing."""
    try:
        from skglm import Lasso as SkLasso
    except ImportError:
        return None
    is_val = np.zeros(len(X), bool)
    is_val[np.random.default_rng(0).permutation(len(X))[: fit.n_val]] = True
    Xf = X[~is_val].astype(np.float64)
    Z = (Xf - Xf.mean(0)) / Xf.std(0)
    t0 = time.perf_counter()
    for t in cols:
        y = Y[~is_val, t].astype(np.float64)
        y = y - y.mean()
        m = SkLasso(alpha=fit.lambdas[0, t], fit_intercept=False, warm_start=True, tol=tol)
        for lam in fit.lambdas[:, t]:
            m.alpha = lam
            m.fit(Z, y)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["a"], choices=sorted(SIZES))
    p.add_argument("--sklearn-targets", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--n-lambdas", type=int, default=100)
    p.add_argument("--no-skglm", action="store_true")
    p.add_argument("--patience", default="none,5",
                   help="comma list of path early-stop settings to compare (none = whole path), "
                        "applied identically to both backends")
    args = p.parse_args()
    patiences = [None if v.strip() == "none" else int(v) for v in args.patience.split(",")]

    print(f"hardware: {os.cpu_count()} cores, {cpu_model()}, torch threads {torch.get_num_threads()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}"
    )
    print(f"grid: n_lambdas={args.n_lambdas}, eps=1e-3, tol={args.tol}, val_fraction=0.1, seed=0")
    for name in args.sizes:
        M, N, T = SIZES[name]
        X, Y = make_data(M, N, T)
        S = min(args.sklearn_targets, T)
        cols = list(range(S))
        print(f"\n== size ({name}): M={M} models, N={N} examples, T={T} targets ==")
        for patience in patiences:
            run_one(name, X, Y, cols, S, T, args, patience)


def run_one(name, X, Y, cols, S, T, args, patience):
    if True:
        print(f"-- path early stop: {'none (whole path)' if patience is None else f'patience {patience}'}")

        torch_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        ft = fit_lasso(X, Y, n_lambdas=args.n_lambdas, tol=args.tol, backend="torch", patience=patience)
        t_torch = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"torch  (float32, cpu, all {T} targets): {t_torch:8.1f} s   "
            f"peak RSS {rss / 1024:.0f} MiB (was {torch_peak_before / 1024:.0f} MiB before)"
        )

        t0 = time.perf_counter()
        fs = fit_lasso(X, Y[:, cols], n_lambdas=args.n_lambdas, tol=args.tol, backend="sklearn",
                       patience=patience)
        t_sk = time.perf_counter() - t0
        t_sk_all = t_sk / S * T
        print(
            f"sklearn loop (Gram CD, float64), TIMED ON {S} of {T} targets: {t_sk:.1f} s "
            f"-> EXTRAPOLATED linearly to {T}: {t_sk_all:8.1f} s"
        )
        if not args.no_skglm and patience is None:
            t_gl = skglm_path_time(X, Y, ft, cols, args.tol)
            if t_gl is not None:
                print(
                    f"skglm loop (path only, no selection/refit), TIMED ON {S} targets: "
                    f"{t_gl:.1f} s -> EXTRAPOLATED to {T}: {t_gl / S * T:8.1f} s"
                )

        # The torch fit of the subset's targets, as a LassoFit-like view.
        class _View:
            weight, bias, lam = ft.weight[:, cols], ft.bias[cols], ft.lam[cols]

        same_lam = np.isclose(ft.lam[cols], fs.lam, rtol=1e-6)
        ot = refit_objective(X, Y, _View, cols)
        osk = refit_objective(X, Y, fs, cols)
        rel = (ot - osk) / osk
        print(
            f"subset check: same chosen lambda for {same_lam.sum()}/{S} targets; refit objective "
            f"(torch - sklearn)/sklearn: max {rel.max():.2e}, min {rel.min():.2e}; "
            f"max |w_torch - w_sklearn| {np.abs(ft.weight[:, cols] - fs.weight).max():.2e}"
        )
        print(f"RATIO sklearn/torch wall time (size {name}, patience {patience}): {t_sk_all / t_torch:.1f}x")
        print(
            f"torch fit: median nnz {np.median(ft.nnz):.0f}, median chosen path index "
            f"{np.median(np.nanargmin(ft.val_mse_path, 0)):.0f} of {args.n_lambdas}; lambdas solved per "
            f"target: mean {np.isfinite(ft.val_mse_path).sum(0).mean():.1f}"
        )


if __name__ == "__main__":
    main()
