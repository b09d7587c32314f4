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

__all__ = ["add_parsers", "cmd_brittleness", "cmd_verify", "cmd_query", "run_config", "main_job_analysis",
           "verified_brittleness", "cmd_brittleness_compare"]

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
    if not args.verify and any(getattr(args, a) is not None for a in ("sample", "verify_targets", "methods", "modes",
                                                                        "models", "rounds")):
        raise ConfigError("--sample, --verify-targets, --methods, --modes, --models and --rounds need --verify")
    if args.verify:  # bad search options fail before any training
        from datamodels.store import RunStore
        from datamodels.verify import _validate_modes, resolve_rankings

        _check_search_args(args)
        resolve_rankings(RunStore.open(args.run), _split(args.methods) or cfg.verify.methods)
        _validate_modes(_split(args.modes) or cfg.verify.modes)
    res = brittleness(args.run, targets=args.targets, cfg=cfg, cdf_path=args.cdf, address=args.address,
                      progress=not args.no_progress, takeover=args.takeover)
    keys = ("targets", "thresholds", "status", "baseline", "k_remove", "k_flip", "summary", "cdf")
    out = {k: res[k] for k in keys}
    if args.verify:
        out["verified"] = verified_brittleness(
            args.run, cfg, targets=args.verify_targets, sample=args.sample, methods=args.methods, modes=args.modes,
            models=args.models, rounds=args.rounds, cdf_path=args.cdf, address=args.address,
            progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(_jsonable(out), indent=2))
        return 0
    _print_brittleness(res)
    if args.verify:
        _print_verified(out["verified"])
    return 0


def _check_search_args(args) -> None:
    for name in ("sample", "models", "rounds"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name}: expected >= 1, got {v}")
    if getattr(args, "sample", None) is not None and getattr(args, "verify_targets", None) is not None:
        raise ConfigError("pass only one of --sample N and --verify-targets LIST")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [p for p in text.replace(" ", "").split(",") if p]


def verified_brittleness(run, cfg, *, targets=None, sample: int | None = None, methods=None, modes=None,
                         models: int | None = None, rounds: int | None = None, cdf_path=None,
                         address: str | None = None, progress: bool = True, takeover: bool = False) -> dict:
    """Grow-then-bisect searches for ``targets`` (or ``sample`` targets, default
    cfg.verify.targets, drawn among those classified correctly), every ranking in ``methods``
    and mode in ``modes``; writes the verified CDF figure next to the run. Returns {"targets",
    "results", "summary", "models" (K), "trained" (models trained now), "used" (models in the
    checks), "figure" (paths)}."""
    from datamodels.brittleness import _cdf_base
    from datamodels.reports import write_verified_cdf
    from datamodels.store import RunStore
    from datamodels.verify import sample_targets, search

    store = RunStore.open(run)
    if targets is None:
        targets = sample_targets(store, cfg.verify.targets if sample is None else sample)
    if not len(targets):
        raise ConfigError("verify: no target to search (none is classified correctly by the full-set models)")
    out = search(run, targets, modes=_split(modes) if isinstance(modes, str) else modes,
                 methods=_split(methods) if isinstance(methods, str) else methods, models=models, rounds=rounds,
                 cfg=cfg, address=address, progress=progress, takeover=takeover)
    base = _cdf_base(store.loc, cdf_path, verified=True)
    used = sum(r["models"] for r in out["results"])
    fig = write_verified_cdf(out["results"], base, models=out["models"], trained=len(out["trained"]))
    return {"targets": sorted({r["target"] for r in out["results"]}), "results": out["results"],
            "summary": out["summary"], "models": out["models"], "trained": len(out["trained"]), "used": used,
            "figure": fig}


def _fmt_k(k) -> str:
    return ">max" if k is None else f"{k:g}"


def _print_verified(v: dict) -> None:
    print(f"verified brittleness: {len(v['targets'])} targets, K={v['models']} models per check; "
          f"{v['used']} models in the checks ({v['trained']} trained now)")
    print(f"  {'mode':<7}{'method':<16}{'verified':>9}{'median k':>10}{'estimated':>11}{'checks':>8}{'models':>8}")
    for mode, methods in v["summary"].items():
        for method, s in methods.items():
            est = _fmt_k(s["median_estimated_k"]) if s["fit"] else "-"
            ok = f"{s['verified']}/{s['checked']}"
            print(f"  {mode:<7}{method:<16}{ok:>9}{_fmt_k(s['median_k']):>10}{est:>11}{s['checks']:>8}"
                  f"{s['models']:>8}")
    print("  (median k over the searched targets; >max: fewer than half verified / reachable)")
    print(f"  figure: {v['figure']['png']}  data: {v['figure']['csv']}  per target: {v['figure']['targets_csv']}")


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
    _check_search_args(args)
    targets = args.targets if args.targets is not None else sample_targets(RunStore.open(args.run), args.sample)
    if not len(targets):
        raise ConfigError("verify: no target to verify (none is classified correctly by the full-set models)")
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
        checks = ", ".join(f"k={c['k']} {'OK' if c['success'] else 'no'} ({c['mean_margin']:+.2f})"
                           for c in r["checks"])
        bound = ""
        if r["verified_k"] is not None:
            bound = f" k={r['verified_k']}" + ("" if r["exact"] else f" (k={r['lower']} failed)")
        est = "" if r["fit"] is None else f"; estimated {_fmt_k(r['estimated_k'])}"
        print(f"target {r['target']} [{r['mode']}/{r['method']}] {r['status']}{bound}{est}"
              + (f": {checks}" if checks else ""))
    s = out["summary"]
    rate = "n/a" if s["rate"] is None else f"{s['rate']:.1%}"
    used = sum(r["models"] for r in out["results"])
    print(f"verified {s['verified']}/{s['checked']} targets ({rate}); {s['skipped']} skipped (misclassified); "
          f"{used} models in the checks, {len(out['trained'])} trained now")


# --------------------------------------------------------------------------- query


def plot_path(given: str, target: int) -> str:
    """Where ``--plot given`` writes: ``given`` itself, ``given``/query-<target>.png for a directory,
    ``given``.png without a suffix. ConfigError, before any work, if its directory cannot take it."""
    import os
    from pathlib import Path

    from datamodels.storage import Location

    loc = Location(given)
    if not loc.local:
        return given
    p = Path(loc.url)
    if p.is_dir():
        p = p / f"query-{target}.png"
    elif not p.suffix:
        p = p.with_suffix(".png")
    if not p.parent.is_dir():
        raise ConfigError(f"--plot {given}: the directory {p.parent} does not exist; create it or choose another path")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--plot {given}: the directory {p.parent} is not writable; choose another path")
    return str(p)


def cmd_query(args) -> int:
    from datamodels.query import plot_query, query

    if args.top < 1:
        raise ConfigError(f"--top: expected >= 1, got {args.top}")
    plot = plot_path(args.plot, args.target) if args.plot else None  # checked before any work
    res = query(args.run, args.target, top=args.top)
    if plot:
        res["plot"] = str(plot_query(res, plot, run=args.run))
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
                      modes: tuple[str, ...] | None = None, json_out: bool = False, takeover: bool = False) -> dict:
    """The end of `datamodels run`: brittleness for all targets, then verified brittleness:
    grow-then-bisect searches along the ranking ``cfg.verify.method`` (default: the current
    fit) for ``cfg.verify.targets`` targets sampled among those classified correctly, in each
    mode of ``modes`` (default cfg.verify.modes), K = ``cfg.verify.models`` models per check;
    with the figure next to the run. Prints the CDF quantiles and the verified table (unless
    ``json_out``); returns {"brittleness": summary and CDF paths, "verified": see
    :func:`verified_brittleness` (None when no target is sampled), "verify": {mode: rate}}.
    """
    from datamodels.brittleness import brittleness

    res = brittleness(run, cfg=cfg, address=address, progress=progress, takeover=takeover)
    if not json_out:
        _print_brittleness(res)
    out = {"brittleness": {"summary": res["summary"], "cdf": res["cdf"]}, "verified": None, "verify": {}}
    if not cfg.verify.targets:
        return out
    from datamodels.store import RunStore
    from datamodels.verify import sample_targets

    targets = sample_targets(RunStore.open(run), cfg.verify.targets)
    if not targets:  # nothing to search is a finding, not an error, at the end of a long job
        if not json_out:
            print("verified brittleness: skipped (the full-set models classify no target correctly)")
        return out
    v = verified_brittleness(run, cfg, targets=targets, methods=[cfg.verify.method], modes=modes,
                             address=address, progress=progress, takeover=takeover)
    out["verified"] = v
    out["verify"] = {mode: next(iter(by_method.values())) for mode, by_method in v["summary"].items()}
    if not json_out:
        _print_verified(v)
    return out


# --------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    """Add the `brittleness`, `verify` and `query` subcommands to ``sub`` (argparse subparsers)."""
    fmt = argparse.RawDescriptionHelpFormatter

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=88)

    p = sub.add_parser(
        "brittleness", help="estimate how few training examples hold each prediction up (--verify: and check)",
        formatter_class=fmt,
        description=wrap("For each target rank training examples by datamodel weight (most supportive first) and "
                    "estimate, per threshold C in brittleness.thresholds, the smallest k whose removal (or "
                    "label flip) drives the predicted margin to C or below. The baseline margin is measured "
                    "on brittleness.full_models models trained on the full training set (trained here, with "
                    "Ray, once). Stores RUN/brittleness/ and writes the CDF over targets as CSV and PNG.")
        + "\n\n" + wrap("--verify: then, for a sample of the targets the full-set models classify correctly, "
                    "search by retraining the smallest k along each ranking (--methods: the run's fits and "
                    "the baselines) whose removal or label flip (--modes) makes the target's mean margin "
                    "over K fresh full-set models negative: grow k from the ranking's estimate (doubling) "
                    "until a check succeeds, then bisect. Every check is stored in RUN/verify/ and never "
                    "retrained. Draws the fraction of targets brittle to <= k, estimated and verified, per "
                    "method, removal and flip (RUN_verified_cdf.png next to the store)."),
        epilog="examples:\n  datamodels brittleness runs/digits\n"
               "  datamodels brittleness runs/digits --targets 0-99 --set brittleness.thresholds=[0,-1]\n"
               "  datamodels brittleness runs/digits --verify --sample 20 --models 4\n"
               "  datamodels brittleness runs/digits --verify --methods lasso,pixel --modes remove "
               "--verify-targets 3,17\n"
               "needs: datamodels fit RUN")
    _common(p)
    p.add_argument("--targets", default=None, help="targets: all (default) or a list like 0,5,10-19")
    p.add_argument("--full-models", type=int, default=None, help="full-set models F (brittleness.full_models)")
    p.add_argument("--cdf", default=None, metavar="PATH",
                   help="write the CDF to PATH.csv and PATH.png (default: next to the store, "
                        "RUN_brittleness_cdf.csv/.png); the verified figure to PATH_verified.*")
    g = p.add_argument_group("verified brittleness (retrains K models per check)")
    g.add_argument("--verify", action="store_true", help="search verified k by retraining and draw the figure")
    g.add_argument("--sample", type=int, default=None, metavar="N",
                   help="targets searched: N sampled (seeded) among those classified correctly (default "
                        "verify.targets)")
    g.add_argument("--verify-targets", default=None, metavar="LIST", help="instead of --sample: these targets")
    g.add_argument("--methods", default=None, metavar="LIST",
                   help="rankings, comma-separated: fit names, datamodel (the current fit), fits (every fit), "
                        "representation, pixel, random (default verify.methods: fits and the three baselines)")
    g.add_argument("--modes", default=None, metavar="LIST", help="remove, flip or remove,flip (default verify.modes)")
    g.add_argument("--models", type=int, default=None, help="models K per check (default verify.models)")
    g.add_argument("--rounds", type=int, default=None, help="checks per search at most (default verify.rounds)")
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
        "verify", help="find by retraining the smallest k along a ranking that flips each target",
        formatter_class=fmt,
        description=wrap("For each target train K fresh models on the full training set minus the first k "
                    "examples of a ranking (--mode remove) or with their labels flipped (--mode flip); a check "
                    "succeeds when the target's mean margin is below 0. The search starts at the ranking's "
                    "estimate (a fit) or verify.start_k (a baseline), doubles k until a check succeeds, then "
                    "bisects down to the smallest k that succeeds, up to --rounds checks. Every check is "
                    "recorded in RUN/verify/; re-running never retrains a recorded check."),
        epilog="examples:\n  datamodels verify runs/digits --targets 3,17 --mode remove\n"
               "  datamodels verify runs/digits --sample 20 --mode flip --method random --models 4\n"
               "  datamodels verify runs/digits --targets 3 --method ridge --set verify.tolerance=0.1\n"
               "needs: datamodels brittleness RUN")
    _common(p)
    p.add_argument("--targets", default=None, help="targets to verify, e.g. 3,17,40-45")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="instead of --targets: N targets sampled (seeded) among those classified correctly")
    p.add_argument("--mode", choices=["remove", "flip"], default="remove", help="remove (default) or flip the set")
    p.add_argument("--method", default=None,
                   help="the ranking: datamodel (the current fit; default verify.method), a fit's name, or a "
                        "baseline among the target's class: representation (nearest in full-model features), "
                        "pixel (nearest in pixels), random")
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
                   help="write an image grid (target, top supporters, top opposers) to PATH (png; a directory "
                        "gets PATH/query-TARGET.png); the path written is printed")
    p.set_defaults(fn=cmd_query)
