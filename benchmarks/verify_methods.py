"""Verified removal: datamodel-selected sets against the baselines, on the same targets.

On a fitted run (the digits default by default), estimates brittleness for all targets, draws
one seeded sample of targets among those with an estimate, and verifies removal sets chosen by
each method (datamodel, representation, pixel, random) with the same k schedule (the
datamodel's k at each threshold). Prints, per method, the verified success rate and the
median verified k (over verified targets). Resumable: checks already in the store are reused.

    python benchmarks/verify_methods.py --run runs/digits-m2000 --targets 20 --models 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.brittleness import brittleness, read_brittleness  # noqa: E402
from datamodels.store import RunStore  # noqa: E402
from datamodels.verify import sample_targets, verify  # noqa: E402

METHODS = ("datamodel", "representation", "pixel", "random")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/digits-m2000", help="a fitted run store")
    ap.add_argument("--targets", type=int, default=20, help="targets in the sample")
    ap.add_argument("--models", type=int, default=4, help="models K per check")
    ap.add_argument("--rounds", type=int, default=3, help="checks per target (coarse threshold search)")
    ap.add_argument("--mode", default="remove", choices=["remove", "flip"])
    args = ap.parse_args()
    print(header())
    store = RunStore.open(args.run)
    est = read_brittleness(store) if "brittleness" in store.group else None
    if est is None or "pending" in set(np.asarray(est["status"]).tolist()):
        brittleness(args.run, progress=True)
    targets = sample_targets(RunStore.open(args.run), args.targets)
    print(f"run {args.run}: {len(targets)} sampled targets {targets}; mode {args.mode}, K={args.models}, "
          f"up to {args.rounds} checks per target")
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        out = verify(args.run, targets, args.mode, method, args.models, rounds=args.rounds, progress=True)
        ks = [r["verified_k"] for r in out["results"] if r["status"] == "verified"]
        s = out["summary"]
        rows.append((method, s["verified"], s["checked"], s["rate"],
                     float(np.median(ks)) if ks else None, len(out["trained"]), time.perf_counter() - t0))
    print()
    print(f"{'method':<16}{'verified':>10}{'rate':>8}{'median k':>10}{'models':>8}{'s':>7}")
    for m, ok, n, rate, med, trained, dt in rows:
        print(f"{m:<16}{f'{ok}/{n}':>10}{'n/a' if rate is None else f'{rate:.0%}':>8}"
              f"{'-' if med is None else f'{med:g}':>10}{trained:>8}{dt:>7.0f}")
    print("(median k over verified targets; 'models' = retrained by this run, 0 when resumed)")


if __name__ == "__main__":
    main()
