"""Verified brittleness per ranking: every stored fit (estimator) against the baselines, on the
same sampled targets, through the same grow-then-bisect search by retraining.

On a fitted run (the digits default by default) with brittleness estimates, draws one seeded
sample of targets among those the full-set models classify correctly and, for every ranking
(each fit by name, representation, pixel, random) and mode, searches the smallest k whose
removal (flip) makes the target's mean margin over K fresh full-set models negative. Prints
side by side, per mode and ranking: verified upper bounds (count, rate), median verified k
(unverified targets counted as not brittle), median estimated k (fits), checks and models;
then the issue's goal (>= 90% verified with the best ranking, its median k below every
baseline's), a paired comparison per baseline (targets where the best ranking's k is smaller
or larger, mean k) and the cost in models trained. Writes the figure next to the run.
Resumable: checks already in the store are reused (the cost line says what this call trained).
``--sample-seed`` draws an independent sample of targets.

    python benchmarks/verify_methods.py --run runs/digits --targets 20 --models 4 --rounds 12 --tolerance 0
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

from datamodels.brittleness import _cdf_base, brittleness, read_brittleness  # noqa: E402
from datamodels.reports import write_verified_cdf  # noqa: E402
from datamodels.store import RunStore  # noqa: E402
from datamodels.verify import BASELINES, sample_targets, search  # noqa: E402


def fmt_k(k) -> str:
    return ">max" if k is None else f"{k:g}"


def verified_ks(results: list[dict], mode: str, method: str) -> dict[int, int]:
    """{target: verified k} of one ranking in one mode (verified targets only)."""
    return {r["target"]: r["verified_k"] for r in results
            if r["mode"] == mode and r["method"] == method and r["verified_k"] is not None}


def paired(results: list[dict], mode: str, a: str, b: str) -> str:
    """Ranking ``a`` against ``b`` target by target (both verified): how often its k is smaller,
    larger, equal, and the mean k of each -- the median alone hides a consistent difference."""
    ka, kb = verified_ks(results, mode, a), verified_ks(results, mode, b)
    both = [(ka[t], kb[t]) for t in ka if t in kb]
    if not both:
        return f"{a} vs {b}: no target verified by both"
    x, y = np.asarray(both, dtype=np.float64).T
    return (f"{a} vs {b} on {len(both)} targets: smaller k on {(x < y).sum()}, larger on {(x > y).sum()}, "
            f"equal on {(x == y).sum()}; mean k {x.mean():.1f} vs {y.mean():.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/digits", help="a fitted run store")
    ap.add_argument("--targets", type=int, default=20, help="targets in the sample")
    ap.add_argument("--sample-seed", type=int, default=None,
                    help="seed of the target sample (default: the run's seed); another seed draws an "
                         "independent sample, to check a comparison on targets it was not chosen on")
    ap.add_argument("--models", type=int, default=4, help="models K per check")
    ap.add_argument("--rounds", type=int, default=12, help="checks per search at most")
    ap.add_argument("--tolerance", type=float, default=0.0, help="bisection tolerance (0: the exact smallest k)")
    ap.add_argument("--start-k", type=int, default=None, help="first k of rankings without an estimate")
    ap.add_argument("--modes", default="remove,flip")
    ap.add_argument("--methods", default="fits,representation,pixel,random",
                    help="rankings: fit names, fits (every stored fit), representation, pixel, random")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    args = ap.parse_args()
    print(header())
    store = RunStore.open(args.run)
    cfg = store.config
    more = {"tolerance": args.tolerance} | ({"start_k": args.start_k} if args.start_k else {})
    cfg = dataclasses.replace(cfg, verify=dataclasses.replace(cfg.verify, **more))
    est = read_brittleness(store) if "brittleness" in store.group else None
    if est is None or "pending" in set(est["status"]):
        brittleness(args.run, cfg=cfg, address=args.address, progress=True)  # full-set models, once
    targets = sample_targets(RunStore.open(args.run), args.targets, seed=args.sample_seed)
    modes = args.modes.split(",")
    print(f"run {args.run}: N={store.dims['N']}, {store.complete_mask().sum()} models collected; "
          f"{len(targets)} sampled targets {targets} (sample seed "
          f"{cfg.seed if args.sample_seed is None else args.sample_seed})")
    print(f"search: K={args.models} models per check, at most {args.rounds} checks, tolerance {args.tolerance}, "
          f"start k {cfg.verify.start_k} (baselines) or the fit's estimate; modes {modes}")
    t0 = time.perf_counter()
    out = search(args.run, targets, modes=modes, methods=args.methods, models=args.models, rounds=args.rounds,
                 cfg=cfg, address=args.address, progress=True)
    seconds = time.perf_counter() - t0
    trained_by = {}
    for key in out["trained"]:
        trained_by[key[2]] = trained_by.get(key[2], 0) + 1
    used = sum(r["models"] for r in out["results"])

    print()
    print(f"{'mode':<7}{'ranking':<16}{'verified':>10}{'rate':>7}{'median k':>10}{'estimated':>11}"
          f"{'checks':>8}{'models':>8}")
    for mode, by_method in out["summary"].items():
        for method, s in by_method.items():
            rate = "n/a" if s["rate"] is None else f"{s['rate']:.0%}"
            est_k = fmt_k(s["median_estimated_k"]) if s["fit"] else "-"
            ok = f"{s['verified']}/{s['checked']}"
            print(f"{mode:<7}{method:<16}{ok:>10}{rate:>7}"
                  f"{fmt_k(s['median_k']):>10}{est_k:>11}{s['checks']:>8}{s['models']:>8}")
    print("(median k over the searched targets, unverified ones counted as not brittle: >max when fewer "
          "than half are verified)")

    print("\ngoal: a verified bound for >= 90% of sampled targets with the best ranking, its median k below "
          "every baseline's")
    for mode, by_method in out["summary"].items():
        fits = {m: s for m, s in by_method.items() if s["fit"]}
        base = {m: s for m, s in by_method.items() if m in BASELINES and not s["fit"]}
        if not fits:
            continue

        def order(item, mode=mode):  # verified rate, then median k, then mean verified k
            name, s = item
            ks = list(verified_ks(out["results"], mode, name).values())
            return (-(s["rate"] or 0), float("inf") if s["median_k"] is None else s["median_k"],
                    float(np.mean(ks)) if ks else float("inf"))

        best, s = min(fits.items(), key=order)
        below = all(s["median_k"] is not None and (b["median_k"] is None or s["median_k"] < b["median_k"])
                    for b in base.values())
        rate = 0 if s["rate"] is None else s["rate"]
        print(f"  {mode:<7}best ranking {best}: {s['verified']}/{s['checked']} verified ({rate:.0%}; "
              f">= 90%: {'yes' if rate >= 0.9 else 'NO'}); median k {fmt_k(s['median_k'])} vs "
              + ", ".join(f"{m} {fmt_k(b['median_k'])}" for m, b in base.items())
              + (f" (below all: {'yes' if below else 'NO'})" if base else " (no baseline searched: not judged)")
              + f"; {s['models']} models")
        for m in base:
            print("    " + paired(out["results"], mode, best, m))
    print(f"\ncost: {used} full-set models in the checks ({len(out['trained'])} trained by this call, "
          f"{seconds:.0f} s); the run's collect stage trained {store.complete_mask().sum()}")
    where = _cdf_base(store.loc, None, verified=True)
    where = where if args.sample_seed is None else f"{where}_sample{args.sample_seed}"
    fig = write_verified_cdf(out["results"], where, models=args.models,
                             trained=len(out["trained"]))
    print(f"figure: {fig['png']}  data: {fig['csv']}  per target: {fig['targets_csv']}")


if __name__ == "__main__":
    main()
