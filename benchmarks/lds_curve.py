"""LDS against models trained and CPU-seconds, for every estimator, on the same held-out masks.

Trains what is missing in one run (up to the largest M collect models, the largest m TRAK
models, the E x R evaluation models), then fits each estimator on prefixes of those models and
scores all of them on the same evaluation masks:

- lasso, ridge: the first M collect models (M in --sizes).
- trak: the first m featurised models (m in --trak-sizes), calibrated on their own masks.
- trak-ridge: the same m models for both signals (equal models with trak);
  trak-ridge+M: the largest m TRAK models plus the first M collect models.

CPU-seconds = the training seconds of the models used (each trained by one single-threaded
worker, so wall = CPU; TRAK models include their gradient featurisation) + the fit's CPU time
(``time.process_time``, all threads of this process). LDS is printed two ways: targets whose
prediction or outcome is constant over the masks ("undefined", e.g. an all-zero datamodel)
skipped, and counted as 0.

    python benchmarks/lds_curve.py --run runs/digits-m2000 --sizes 100,250,500,1000,2000 \\
        --trak-sizes 1,4,16,32 --masks 50 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.collect import collect  # noqa: E402
from datamodels.config import load_config  # noqa: E402
from datamodels.estimators import fit_ridge, fit_trak, mask_stats  # noqa: E402
from datamodels.evaluate import evaluate_run, lds_report, read_eval  # noqa: E402
from datamodels.fit import RowView, fit_run, train_trak_models, trak_table, usable_rows  # noqa: E402
from datamodels.solver import fit_lasso  # noqa: E402
from datamodels.store import RunStore  # noqa: E402
from datamodels.trak import trak_scores  # noqa: E402

ALL = ("lasso", "ridge", "trak", "trak-ridge")


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="pipeline YAML (default: digits)")
    ap.add_argument("--run", default="runs/digits-m2000", help="run store (created/extended as needed)")
    ap.add_argument("--estimators", default=",".join(ALL), help=f"comma-separated, from {', '.join(ALL)}")
    ap.add_argument("--sizes", default="100,250,500,1000", help="collect models M for the mask regressions")
    ap.add_argument("--trak-sizes", default="1,4,16,32", help="featurised models m for TRAK")
    ap.add_argument("--masks", type=int, default=50, help="evaluation masks E")
    ap.add_argument("--repeats", type=int, default=2, help="models R per evaluation mask")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    estimators = [e for e in args.estimators.split(",") if e]
    bad = [e for e in estimators if e not in ALL]
    if bad:
        ap.error(f"--estimators: expected names from {', '.join(ALL)}, got {', '.join(bad)}")
    sizes, trak_sizes = _ints(args.sizes), _ints(args.trak_sizes)
    uses_trak = any(e.startswith("trak") for e in estimators)
    cfg = load_config(args.config, [f"collect.models={max(sizes)}", *args.set,
                                    f"fit.trak_models={max(trak_sizes) if uses_trak else 1}"])

    print(header())
    collect(cfg, args.run, progress=True)
    store = RunStore.open(args.run)
    if "datamodels" not in store.group:  # evaluate_run reads a fit; the curve below fits its own
        fit_run(args.run, dataclasses.replace(cfg.fit, estimator="ridge"))
    evaluate_run(args.run, masks=args.masks, repeats=args.repeats, progress=True)
    store = RunStore.open(args.run)
    trak_rows = np.zeros(0, dtype=np.int64)
    if uses_trak:
        with store.writing():
            trak_rows = train_trak_models(store, cfg, progress=True)
    e_masks, actual = read_eval(store, args.masks, args.repeats)
    e_masks = e_masks.astype(np.float32)
    rows, _ = usable_rows(store, "test")
    models = store.models_table().group
    seconds = np.asarray(models["seconds"][:], dtype=np.float64)
    fc = cfg.fit
    device = "cpu" if fc.device == "auto" else fc.device
    tt = trak_table(store, fc.trak_dim) if uses_trak else None
    t_seconds = np.asarray(tt.group["seconds"][:], dtype=np.float64) if tt is not None else None

    print(f"\nrun {args.run}: N={store.dims['N']}, T={actual.shape[2]}, E={args.masks} masks x R={args.repeats} "
          f"repeats; lasso: {fc.n_lambdas} lambdas, eps={fc.eps}, val share {fc.val_fraction}; ridge grid "
          f"{fc.ridge_grid}; TRAK: P={fc.trak_dim}, kernel ridge {fc.trak_ridge}, count-sketch projection")
    print(f"mean training s/model: collect {seconds[rows].mean():.2f}"
          + (f", TRAK (with featurisation) {t_seconds[trak_rows].mean():.2f}" if uses_trak else ""))
    print(f"{'estimator':<16}{'models':>7}{'CPU-s':>9}{'LDS skip':>10}{'LDS as 0':>10}{'undef':>7}"
          f"{'Pearson':>9}{'ceiling':>9}{'mean nnz':>10}{'fit CPU-s':>11}")

    def report(name, n_models, train_s, fit_cpu, weight, bias):
        r = lds_report(bias[None, :] + e_masks @ weight, actual)
        per = np.nan_to_num(r["per_target_lds"], nan=0.0)
        lds = float("nan") if r["lds"] is None else r["lds"]
        pear = float("nan") if r["pearson"] is None else r["pearson"]
        ceil = float("nan") if r["noise_ceiling"] is None else r["noise_ceiling"]
        print(f"{name:<16}{n_models:>7}{train_s + fit_cpu:>9.0f}{lds:>10.3f}{per.mean():>10.3f}"
              f"{r['targets_undefined']:>7}{pear:>9.3f}{ceil:>9.3f}{(weight != 0).sum(0).mean():>10.1f}"
              f"{fit_cpu:>11.1f}", flush=True)

    def collect_source(m):
        sel = rows[:m]
        return RowView([models["masks"]], sel), RowView([models["test_margins"]], sel)

    def trak_source(m):
        sel = trak_rows[:m]
        return RowView([tt.group["masks"]], sel), RowView([tt.group["test_margins"]], sel)

    taus = {}

    def tau_of(m):
        """TRAK scores of the first m models and the CPU-seconds they took (counted in every fit
        that uses them, also when cached)."""
        if m not in taus:
            c0 = time.process_time()
            sel = trak_rows[:m]
            tau = trak_scores((tt.group["train_grads"][int(r)] for r in sel),
                              (tt.group["test_grads"][int(r)] for r in sel), ridge=fc.trak_ridge, device=device)
            taus[m] = (tau, time.process_time() - c0)
        return taus[m]

    for est in estimators:
        if est in ("lasso", "ridge"):
            for m in sizes:
                if m > len(rows):
                    print(f"{est:<16}{m:>7}  (only {len(rows)} usable models)")
                    continue
                c0 = time.process_time()
                X, Y = collect_source(m)
                if est == "lasso":
                    f = fit_lasso(X, Y, n_lambdas=fc.n_lambdas, eps=fc.eps, val_fraction=fc.val_fraction,
                                  seed=cfg.seed, backend=fc.backend, device=device, dtype=fc.dtype,
                                  block_rows=fc.block_rows, tol=fc.tol, patience=fc.patience)
                else:
                    f = fit_ridge(mask_stats([(X, Y)]), grid=fc.ridge_grid, device=device)
                report(est, m, seconds[rows[:m]].sum(), time.process_time() - c0, f.weight, f.bias)
            continue
        combine = est == "trak-ridge"
        for m in trak_sizes:
            if m > len(trak_rows):
                continue
            tau, tau_cpu = tau_of(m)
            c0 = time.process_time()
            f = fit_trak(mask_stats([trak_source(m)]), tau, combine=combine, grid=fc.ridge_grid, device=device)
            report(est, m, t_seconds[trak_rows[:m]].sum(), tau_cpu + time.process_time() - c0, f.weight, f.bias)
        if combine:
            m = max(trak_sizes)
            for extra in sizes:
                if extra > len(rows):
                    continue
                tau, tau_cpu = tau_of(m)
                c0 = time.process_time()
                f = fit_trak(mask_stats([collect_source(extra), trak_source(m)]), tau, combine=True,
                             grid=fc.ridge_grid, device=device)
                report(f"trak-ridge+{extra}", m + extra, t_seconds[trak_rows[:m]].sum() + seconds[rows[:extra]].sum(),
                       tau_cpu + time.process_time() - c0, f.weight, f.bias)


if __name__ == "__main__":
    main()
