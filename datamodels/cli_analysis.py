"""Subcommands `brittleness`, `verify` and `query` of the `datamodels` command.

``add_parsers(subparsers)`` adds them to the main parser; each command function validates
its input, calls the stage's plain function and returns an exit code. Config comes from the
run's store; ``--set`` may change only brittleness.*, verify.* and resources.* keys (anything
else would change how the models are trained, which the run fixes).
"""

from __future__ import annotations

import argparse
import json
import textwrap

import numpy as np

from datamodels.errors import ConfigError

__all__ = ["add_parsers", "cmd_brittleness", "cmd_brittleness_compare", "cmd_verify", "cmd_query", "run_config", "main_job_analysis"]

_SETTABLE = ("brittleness.", "verify.", "resources.")


def run_config(run: str, sets: list[str], settable: tuple[str, ...] = _SETTABLE):
    """The run store's config with ``--set`` overrides, only of keys under ``settable``
    (default: brittleness, verify and resources; the run fixes how models are trained)."""
    from datamodels.config import RunConfig, apply_overrides, config_from_dict
    from datamodels.store import RunStore

    for s in sets:
        if not s.startswith(settable):
            raise ConfigError(f"--set {s!r}: only {', '.join(k + '*' for k in settable)} keys may change "
                              "here (the run fixes how models are trained)")
    raw = apply_overrides(RunStore.open(run).config.to_dict(), sets)
    return config_from_dict(RunConfig, raw, source=f"{run} (with --set {' '.join(sets)})" if sets else run)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _common(p, *, ray: bool = True):
    from datamodels.cli import add_cluster_args

    p.add_argument("run", help="run store (directory or URL), trained and fitted")
    if ray:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a brittleness.*, verify.* or resources.* key (repeatable)")
        add_cluster_args(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


# --------------------------------------------------------------------------- brittleness


def cmd_brittleness(args) -> int:
    from datamodels.brittleness import brittleness

    sets = list(args.set)
    if args.full_models is not None:
        sets.append(f"brittleness.full_models={args.full_models}")
    cfg = run_config(args.run, sets)
    res = brittleness(args.run, targets=args.targets, cfg=cfg, cdf_path=args.cdf, address=args.address,
                      progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(_jsonable({k: res[k] for k in ("targets", "thresholds", "status", "baseline", "k_remove",
                                                          "k_flip", "summary", "cdf")}), indent=2))
        return 0
    _print_brittleness(res)
    return 0


def _print_brittleness(res: dict) -> None:
    s = res["summary"]
    print(f"brittleness: {s['targets']} targets: {s['estimated']} estimated, {s['unreachable']} not reachable "
          f"within max_k, {s['misclassified']} misclassified by the full-set models")
    for mode in ("remove", "flip"):
        for thr, row in s[mode].items():
            q = " ".join(f"{p}={'>max' if row[p] is None else row[p]}" for p in ("q10", "q25", "q50"))
            fr = " ".join(f"<= {m}: {'n/a' if row[f'frac_le_{m}'] is None else format(row[f'frac_le_{m}'], '.3f')}"
                          for m in (1, 10, 100))
            print(f"  {mode:6s} C={thr:>5s}  k quantiles {q}   fraction brittle {fr}")
    print(f"  CDF: {res['cdf']['csv']}  {res['cdf']['png']}")


def cmd_brittleness_compare(args) -> int:
    from datamodels.brittleness import compare_brittleness

    res = compare_brittleness(args.runs, labels=args.labels, thresholds=args.threshold, out=args.out)
    if args.json:
        print(json.dumps(_jsonable(res), indent=2))
        return 0
    print(f"brittleness of {len(res['runs'])} runs over the same targets (fractions of the targets each run's "
          "full-set models classify correctly)")
    for r in res["runs"]:
        s = r["summary"]
        print(f"  {r['label']}: {s['estimated'] + s['unreachable']} of {s['targets']} targets correct")
        for mode in ("remove", "flip"):
            for thr, row in s[mode].items():
                fr = " ".join(f"<= {m}: {'n/a' if row[f'frac_le_{m}'] is None else format(row[f'frac_le_{m}'], '.3f')}"
                              for m in (1, 10, 100))
                print(f"    {mode:6s} C={thr:>5s}  median k {'>max' if row['q50'] is None else row['q50']:>5}   "
                      f"fraction brittle {fr}")
    print(f"  CDF: {res['cdf']['csv']}  {res['cdf']['png']}")
    return 0


# --------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    from datamodels.store import RunStore
    from datamodels.verify import sample_targets, verify

    cfg = run_config(args.run, list(args.set))
    if (args.targets is None) == (args.sample is None):
        raise ConfigError("verify: pass exactly one of --targets LIST or --sample N")
    targets = args.targets if args.targets is not None else sample_targets(RunStore.open(args.run), args.sample)
    if args.models is not None and args.models < 1:
        raise ConfigError(f"--models: expected >= 1, got {args.models}")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds: expected >= 1, got {args.rounds}")
    if not len(targets):
        raise ConfigError("verify: no target to verify (no target has an estimate)")
    out = verify(args.run, targets, mode=args.mode, method=args.method, models=args.models, rounds=args.rounds,
                 cfg=cfg, address=args.address, progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(_jsonable({"results": out["results"], "summary": out["summary"],
                                    "trained": len(out["trained"])}), indent=2))
        return 0
    _print_verify(out)
    return 0


def _print_verify(out: dict) -> None:
    for r in out["results"]:
        checks = ", ".join(f"k={c['k']}: mean margin {c['mean_margin']:+.3f} "
                           f"({c['frac_misclassified']:.0%} misclassified) {'OK' if c['success'] else 'no'}"
                           for c in r["checks"])
        print(f"target {r['target']} [{r['mode']}/{r['method']}] {r['status']}"
              + (f" with k={r['verified_k']}" if r["verified_k"] else "") + (f": {checks}" if checks else ""))
    s = out["summary"]
    rate = "n/a" if s["rate"] is None else f"{s['rate']:.1%}"
    print(f"verified {s['verified']}/{s['checked']} targets ({rate}); {s['skipped']} skipped; "
          f"{len(out['trained'])} models trained now")


# --------------------------------------------------------------------------- query


def cmd_query(args) -> int:
    from datamodels.query import plot_query, query

    if args.top < 1:
        raise ConfigError(f"--top: expected >= 1, got {args.top}")
    res = query(args.run, args.target, top=args.top)
    if args.plot:
        res["plot"] = str(plot_query(res, args.plot, run=args.run))
    if args.json:
        print(json.dumps(_jsonable(res), indent=2))
        return 0
    _print_query(res)
    return 0


def _print_query(r: dict) -> None:
    mm = "n/a" if r["mean_margin"] is None else f"{r['mean_margin']:+.3f}"
    acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    print(f"target {r['target']}: label {r['label']} ({r['class']}); over {r['models']} models mean margin {mm}, "
          f"accuracy {acc}")
    b = r["brittleness"]
    if b["estimated"] is None:
        print("  brittleness: not estimated (run `datamodels brittleness RUN`)")
    else:
        fm = "n/a" if b["full_set_margin"] is None else f"{b['full_set_margin']:+.3f}"
        print(f"  brittleness: {b['status']}, full-set margin {fm}")
        for mode in ("remove", "flip"):
            ks = "  ".join(f"C={c}: {'-' if k is None else k}" for c, k in b["estimated"][mode].items())
            print(f"    estimated {mode:6s} {ks}")
    for mode, methods in r["verified"].items():
        for method, d in methods.items():
            tried = ", ".join(f"k={c['k']} {'OK' if c['success'] else 'no'}" for c in d["checks"] if c["done"])
            print(f"    verified {mode}/{method}: {d['verified_k'] or 'not verified'} ({tried})")
    for key in ("supporters", "opposers"):
        items = "  ".join(f"#{e['index']}({e['label']}) {e['weight']:+.3f}" for e in r[key]) or "none"
        print(f"  {key}: {items}")
    if "plot" in r:
        print(f"  plot: {r['plot']}")


# --------------------------------------------------------------------------- main job


def main_job_analysis(run, cfg, *, address: str | None = None, progress: bool = True,
                      modes: tuple[str, ...] = ("remove",), json_out: bool = False, takeover: bool = False) -> dict:
    """The end of `datamodels run`: brittleness for all targets, then verification of
    ``cfg.verify.targets`` targets sampled among those with an estimate (method
    ``cfg.verify.method``, K = ``cfg.verify.models``, ``cfg.verify.rounds`` checks each), for each
    mode in ``modes``. Prints the CDF quantiles and the verified success rate (unless
    ``json_out``); returns {"brittleness": summary and CDF paths, "verify": {mode: success_rate}}.
    """
    from datamodels.brittleness import brittleness
    from datamodels.store import RunStore
    from datamodels.verify import sample_targets, verify

    res = brittleness(run, cfg=cfg, address=address, progress=progress, takeover=takeover)
    if not json_out:
        _print_brittleness(res)
    out = {"brittleness": {"summary": res["summary"], "cdf": res["cdf"]}, "verify": {}}
    targets = sample_targets(RunStore.open(run), cfg.verify.targets) if cfg.verify.targets else []
    for mode in modes:
        if not targets:
            out["verify"][mode] = {"checked": 0, "verified": 0, "rate": None, "skipped": 0}
            continue
        v = verify(run, targets, mode, cfg=cfg, address=address, progress=progress, takeover=takeover)
        out["verify"][mode] = v["summary"]
        if not json_out:
            s = v["summary"]
            rate = "n/a" if s["rate"] is None else f"{s['rate']:.1%}"
            print(f"verify ({mode}, {cfg.verify.method}, K={cfg.verify.models}): {s['verified']}/{s['checked']} "
                  f"sampled targets verified ({rate})")
    return out


# --------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    """Add the `brittleness`, `verify` and `query` subcommands to ``sub`` (argparse subparsers)."""
    fmt = argparse.RawDescriptionHelpFormatter

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=88)

    p = sub.add_parser(
        "brittleness", help="estimate how few training examples hold each prediction up",
        formatter_class=fmt,
        description=wrap("For each target rank training examples by datamodel weight (most supportive first) and "
                    "estimate, per threshold C in brittleness.thresholds, the smallest k whose removal (or "
                    "label flip) drives the predicted margin to C or below. The baseline margin is measured "
                    "on brittleness.full_models models trained on the full training set (trained here, with "
                    "Ray, once). Stores RUN/brittleness/ and writes the CDF over targets as CSV and PNG."),
        epilog="examples:\n  datamodels brittleness runs/digits\n"
               "  datamodels brittleness runs/digits --targets 0-99 --set brittleness.thresholds=[0,-1]\n"
               "needs: datamodels fit RUN")
    _common(p)
    p.add_argument("--targets", default=None, help="targets: all (default) or a list like 0,5,10-19")
    p.add_argument("--full-models", type=int, default=None, help="full-set models F (brittleness.full_models)")
    p.add_argument("--cdf", default=None, metavar="PATH",
                   help="write the CDF to PATH.csv and PATH.png (default: next to the store, "
                        "RUN_brittleness_cdf.csv/.png)")
    p.set_defaults(fn=cmd_brittleness)

    p = sub.add_parser(
        "brittleness-compare", help="the brittleness CDFs of two or more runs on one figure",
        formatter_class=fmt,
        description=wrap("Draw the stored removal and flip brittleness CDFs of two or more runs over the same "
                         "targets side by side, e.g. how data-level brittleness changes when the training labels "
                         "are corrupted. Trains nothing: each run needs `datamodels brittleness` first."),
        epilog="example (clean vs 20% corrupted labels):\n"
               "  datamodels run --out runs/digits\n"
               "  datamodels run --out runs/digits-corrupt20 --set train.label_corruption=0.2\n"
               "  datamodels brittleness-compare runs/digits runs/digits-corrupt20\n"
               "needs: datamodels brittleness RUN, for every RUN")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run stores (directories or URLs), at least two")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="legend label per run (default: run name and its label corruption)")
    p.add_argument("--threshold", type=float, action="append", default=None, metavar="C",
                   help="threshold C to draw (repeatable; default: every C all runs have)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write PATH.csv and PATH.png (default: next to the first run, A_vs_B_brittleness_cdf)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(fn=cmd_brittleness_compare)

    p = sub.add_parser(
        "verify", help="retrain without (or with flipped) estimated sets and check the target flips",
        formatter_class=fmt,
        description=wrap("For each target train K fresh models on the full training set minus the estimated set "
                    "(--mode remove) or with its labels flipped (--mode flip), and call the check a success "
                    "when the target's mean margin is below 0. Starts at the k of the first threshold (C=0) "
                    "and moves to the next threshold's k after a failure, up to --rounds checks. Every check "
                    "is recorded in RUN/verify/; re-running never retrains a recorded check."),
        epilog="examples:\n  datamodels verify runs/digits --targets 3,17 --mode remove\n"
               "  datamodels verify runs/digits --sample 20 --mode flip --method random --models 8\n"
               "needs: datamodels brittleness RUN")
    _common(p)
    p.add_argument("--targets", default=None, help="targets to verify, e.g. 3,17,40-45")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="instead of --targets: N targets sampled (seeded) among those with an estimate")
    p.add_argument("--mode", choices=["remove", "flip"], default="remove", help="remove (default) or flip the set")
    p.add_argument("--method", choices=["datamodel", "representation", "pixel", "random"], default=None,
                   help="how the set is chosen: datamodel weights (default: verify.method), or a baseline "
                        "among the target's class: nearest in full-model representation, nearest in pixels, "
                        "random")
    p.add_argument("--models", type=int, default=None, help="models K per check (default: verify.models)")
    p.add_argument("--rounds", type=int, default=None, help="checks per target at most (default: verify.rounds)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser(
        "query", help="everything the run knows about one target",
        formatter_class=fmt,
        description=wrap("Print a target's label, mean margin and accuracy over the run's models, its estimated and "
                    "verified removal and flip sizes, and the training examples that support and oppose it "
                    "most (index, label, datamodel weight)."),
        epilog="examples:\n  datamodels query runs/digits 0 --json\n"
               "  datamodels query runs/digits 12 --plot t12.png\nneeds: datamodels fit RUN")
    _common(p, ray=False)
    p.add_argument("target", type=int, help="target (test example) index")
    p.add_argument("--top", type=int, default=10, help="supporters and opposers to list (default 10)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write an image grid (target, top supporters, top opposers) to PATH (png)")
    p.set_defaults(fn=cmd_query)
