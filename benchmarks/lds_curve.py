"""LDS as a function of the number of models M on one run (the digits default by default).

Trains what is missing (up to the largest M, plus the evaluation models), then for each M fits
datamodels on the first M complete models only and scores them on the same held-out
evaluation set. Prints one row per M with the LDS, Pearson, the noise ceiling and fit time.

    python benchmarks/lds_curve.py --run runs/digits-m2000 --sizes 250,500,1000,2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.collect import collect  # noqa: E402
from datamodels.config import load_config  # noqa: E402
from datamodels.evaluate import evaluate_run, lds_report, read_eval  # noqa: E402
from datamodels.fit import RowView, fit_run, usable_rows  # noqa: E402
from datamodels.solver import fit_lasso  # noqa: E402
from datamodels.store import RunStore  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="pipeline YAML (default: digits)")
    ap.add_argument("--run", default="runs/digits-m2000", help="run store (created/extended as needed)")
    ap.add_argument("--sizes", default="250,500,1000,2000", help="comma-separated M values")
    ap.add_argument("--masks", type=int, default=100, help="evaluation masks E")
    ap.add_argument("--repeats", type=int, default=2, help="models R per evaluation mask")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = load_config(args.config, [f"collect.models={max(sizes)}"])

    print(header())
    collect(cfg, args.run, progress=True)
    store = RunStore.open(args.run)
    if "datamodels" not in store.group:
        fit_run(args.run, cfg.fit)  # evaluate_run needs a fit; the curve below refits per M
    evaluate_run(args.run, masks=args.masks, repeats=args.repeats, progress=True)
    e_masks, actual = read_eval(RunStore.open(args.run), args.masks, args.repeats)
    e_masks = e_masks.astype(np.float32)
    rows, _ = usable_rows(store, "test")
    models = store.models_table().group
    fc = cfg.fit
    device = "cpu" if fc.device == "auto" else fc.device

    print(f"\nrun {args.run}: N={store.dims['N']}, T={actual.shape[2]}, "
          f"E={args.masks} masks x R={args.repeats} repeats; fit: {fc.n_lambdas} lambdas, eps={fc.eps}, "
          f"val share {fc.val_fraction}, backend {fc.backend} on {device}")
    print(f"{'M':>6}{'LDS':>8}{'Pearson':>9}{'ceiling':>9}{'mean nnz':>10}{'fit s':>8}")
    for m in sizes:
        if m > len(rows):
            print(f"{m:>6}  (only {len(rows)} usable models)")
            continue
        sel = rows[:m]
        t0 = time.perf_counter()
        fit = fit_lasso(RowView([models["masks"]], sel), RowView([models["test_margins"]], sel),
                        n_lambdas=fc.n_lambdas, eps=fc.eps, val_fraction=fc.val_fraction, seed=cfg.seed,
                        backend=fc.backend, device=device, dtype=fc.dtype, block_rows=fc.block_rows, tol=fc.tol,
                        patience=fc.patience)
        dt = time.perf_counter() - t0
        r = lds_report(fit.bias[None, :] + e_masks @ fit.weight, actual)
        print(f"{m:>6}{r['lds']:>8.3f}{r['pearson']:>9.3f}{r['noise_ceiling']:>9.3f}"
              f"{fit.nnz.mean():>10.1f}{dt:>8.1f}")


if __name__ == "__main__":
    main()
