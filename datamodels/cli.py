"""The `datamodels` command: one console script, one subcommand per stage.

Each subcommand validates its input, calls the stage's plain function, and decides what the
user sees (progress bars on stderr, a summary or ``--json`` on stdout). Bad input exits with
status 2 and a one-line message; nothing is written before validation passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from datamodels.config import RunConfig, load_config
from datamodels.errors import DatamodelsError, RunError

log = logging.getLogger("datamodels")

EPILOG = """\
Config keys can be overridden with --set KEY=VALUE (repeatable), e.g.
  --set train.epochs=8 --set collect.alpha=0.3 --set resources.workers=1
The embedded default (no CONFIG) is pipelines/digits.yaml: sklearn's bundled digits,
a local Ray started by the program itself.
"""


def _load(args) -> RunConfig:
    sets = list(args.set or [])
    if getattr(args, "models", None) is not None:
        sets.append(f"collect.models={args.models}")
    return load_config(getattr(args, "config", None), sets)


def _add_config_args(p, *, optional_config: bool):
    if optional_config:
        p.add_argument("config", nargs="?", help="pipeline YAML (default: the embedded digits pipeline)")
    else:
        p.add_argument("config", help="pipeline YAML, e.g. pipelines/digits.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. train.epochs=8")
    add_cluster_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_cluster_args(p, *, takeover: bool = True) -> None:
    """--address (which cluster) and --takeover (of a run whose driver is gone)."""
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join, HOST:PORT (default: $RAY_ADDRESS, else start a local Ray)")
    if takeover:
        p.add_argument("--takeover", action="store_true",
                       help="take over the run from another driver's claim without waiting for it to expire "
                            "(only when that driver is gone: two drivers must never write one run)")


def cmd_train(args) -> int:
    from datamodels.collect import collect

    cfg = _load(args)
    summary = collect(cfg, args.out, address=args.address, progress=not args.no_progress, takeover=args.takeover)
    _print_status(summary, json_out=False)
    return 0


def cmd_status(args) -> int:
    from datamodels.store import RunStore

    status = RunStore.open(args.run).status()
    _print_status(status, json_out=args.json)
    return 0


def cmd_check(args) -> int:
    from datamodels.check import check_run

    report = check_run(args.run, repair=args.repair, takeover=args.takeover, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"check {report.run}: {report.arrays} arrays, {report.chunks} chunk rows read")
        for d in report.damaged:
            print(f"  damaged: {d.message}")
            if d.repaired:
                print(f"    repaired: {d.repaired}")
        for table, rows in report.diverged.items():
            print(f"  diverged (non-finite outputs, left out by every reader): {table} rows "
                  f"{rows[:10]}{' ...' if len(rows) > 10 else ''} ({len(rows)})")
        if not report.damaged:
            print("  ok: every chunk decodes and its checksum matches")
        elif report.repaired:
            print("  repaired: re-run the commands named above to retrain or recompute what was removed")
        else:
            print(f"  {len(report.damaged)} damaged chunk(s): run `datamodels check {report.run} --repair`")
    return 0 if report.ok else 2


def _print_status(status: dict, *, json_out: bool) -> None:
    if json_out:
        print(json.dumps({k: v for k, v in status.items() if k != "trained"}, indent=2))
        return
    acc = status["mean_test_accuracy"]
    print(f"run {status['path']} ({status['config_name']}, {status['dataset']}: "
          f"N={status['num_train']}, T={status['num_targets']}, alpha={status['alpha']})")
    print(f"  models: {status['completed']}/{status['requested']} complete"
          + (f", {len(status['trained'])} trained now" if "trained" in status else "")
          + (f", {status['diverged']} diverged (non-finite margins, left out)" if status.get("diverged") else "")
          + (f"; {status['with_logits']} record logits" if status.get("with_logits") else ""))
    if acc is not None:
        print(f"  mean test accuracy: {acc:.4f}   mean training time: {status['mean_train_seconds']:.2f} s/model")


def _fit_progress(enabled: bool):
    from tqdm.auto import tqdm

    bar = {}

    def update(done, total):
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="lambda", desc="fit", disable=not enabled)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def cmd_fit(args) -> int:
    from datamodels.fit import fit_run

    sets = list(args.set)
    for flag, key in (("estimator", "estimator"), ("targets", "targets"), ("backend", "backend"),
                      ("device", "device")):
        if getattr(args, flag) is not None:
            sets.append(f"fit.{key}={getattr(args, flag)}")
    from datamodels.cli_analysis import run_config

    run_cfg = run_config(args.run, sets, settable=("fit.", "resources."))
    summary = fit_run(args.run, run_cfg.fit, resources=run_cfg.resources, address=args.address,
                      progress=None if args.no_progress else _fit_progress(True), takeover=args.takeover,
                      make_current=not args.keep_current)
    _print_fit(summary, json_out=args.json)
    return 0


def _print_fit(s: dict, *, json_out: bool) -> None:
    if json_out:
        print(json.dumps(s, indent=2))
        return
    where = "in the driver" if s["ran_on"] == "driver" else "as a Ray task"
    name = s.get("name", "lasso")
    if name == "lasso":
        print(f"fit lasso: {s['models_used']} models ({s['n_train']} fit + {s['n_val']} validation), "
              f"{s['models_left_out']} left out (non-finite margins); targets: {s['targets']}; "
              f"backend {s['fit']['backend']}, {s['seconds']:.1f} s ({where})")
        print(f"  mean non-zeros per datamodel: {s['mean_nnz']:.1f}   mean validation MSE: {s['mean_val_mse']:.4f}")
    else:
        trak = f", {s['trak_models']} of them featurised for TRAK (P={s['fit']['trak_dim']})" if s["trak_models"] else ""
        print(f"fit {name}: {s['models_used']} models{trak}, {s['models_left_out']} left out (non-finite margins); "
              f"targets: {s['targets']}; {s['seconds']:.1f} s ({where})")
        print(f"  mean non-zeros per datamodel: {s['mean_nnz']:.1f}   stored as fit {name!r}")


def cmd_evaluate(args) -> int:
    from datamodels.evaluate import evaluate_run

    report = evaluate_run(args.run, masks=args.masks, repeats=args.repeats, address=args.address,
                          progress=not args.no_progress, takeover=args.takeover)
    _print_lds(report, json_out=args.json)
    return 0


def _print_lds(r: dict, *, json_out: bool) -> None:
    if json_out:
        print(json.dumps(r, indent=2))
        return
    ceil = "n/a (repeats < 2)" if r["noise_ceiling"] is None else f"{r['noise_ceiling']:.3f}"
    print(f"LDS {r['lds']:.3f} (Spearman, mean over {r['T'] - r['targets_undefined']} targets; "
          f"E={r['E']} masks x R={r['R']} repeats)")
    print(f"  Pearson {r['pearson']:.3f}   MSE {r['mse']:.4f}   noise ceiling {ceil}"
          + ("" if r["split_half_reliability"] is None
             else f" (split-half reliability {r['split_half_reliability']:.3f})"))


def cmd_run(args) -> int:
    """The main job: train, fit, evaluate (LDS), brittleness for all targets, verified k for a sample."""
    from datamodels.collect import collect
    from datamodels.evaluate import evaluate_run
    from datamodels.fit import fit_run

    from datamodels.storage import Location

    cfg = _load(args)
    out = Location.for_output(args.out or str(Path("runs") / cfg.name))
    progress = not args.no_progress
    kw = dict(address=args.address, progress=progress, takeover=args.takeover)
    print(f"datamodels run: {cfg.name} -> {out}", file=sys.stderr)
    summary = collect(cfg, out, **kw)
    _print_status(summary, json_out=False)
    fit = fit_run(out, cfg.fit, resources=cfg.resources, address=args.address, progress=_fit_progress(progress),
                  takeover=args.takeover)
    _print_fit(fit, json_out=False)
    report = evaluate_run(out, masks=cfg.eval.masks, repeats=cfg.eval.repeats, **kw)
    _print_lds(report, json_out=False)
    from datamodels.cli_analysis import main_job_analysis

    analysis = main_job_analysis(out, cfg, **kw)
    _print_summary(summary, report, analysis)
    return 0


def _print_summary(status: dict, lds: dict, analysis: dict) -> None:
    b = analysis["brittleness"]
    print("\nsummary")
    print(f"  models          {status['completed']} trained, mean test accuracy {status['mean_test_accuracy']:.4f}")
    print(f"  datamodels      LDS {lds['lds']:.3f} (noise ceiling "
          f"{'n/a' if lds['noise_ceiling'] is None else format(lds['noise_ceiling'], '.3f')})")
    for mode in ("remove", "flip"):
        rows = b["summary"].get(mode, {})
        if rows:
            thr, q = next(iter(rows.items()))  # the first (highest) threshold
            qs = ", ".join(f"{p} {'>max' if q[p] is None else q[p]}" for p in ("q10", "q25", "q50"))
            print(f"  brittleness     {mode:<6} (C={thr}): k quantiles {qs}")
    v = analysis.get("verified")
    if v:
        for mode, by_method in v["summary"].items():
            for method, s in by_method.items():
                med = "n/a (fewer than half verified)" if s["median_k"] is None else f"{s['median_k']:g}"
                print(f"  verified        {mode:<6} along {method}: upper bound for {s['verified']}/{s['checked']} "
                      f"sampled targets, median k {med}")
        print(f"  verified cost   {v['used']} full-set models (K={v['models']} per check; {v['trained']} trained "
              "now)")
        print(f"  CDF plots       {b['cdf'].get('png')}  {v['figure']['png']}")
    else:
        print(f"  CDF plot        {b['cdf'].get('png')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datamodels",
        description="Estimate datamodels: train many models on random subsets (Ray, Zarr), "
                    "fit per-example sparse linear models, find brittle predictions.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline on CONFIG (default: digits)",
                       description="Run the pipeline end to end on CONFIG; resumable: "
                                   "re-running continues where it stopped.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p, optional_config=True)
    p.add_argument("--out", default=None,
                   help="run store: a directory (default: runs/<config name>) or a URL (s3://bucket/run, gs://...)")
    p.set_defaults(fn=cmd_run, models=None)

    p = sub.add_parser("train", help="train models on random subsets into a run store",
                       description="Train models on random alpha-subsets and write masks and margins "
                                   "into the run store. Re-running trains only the missing models; "
                                   "a larger --models extends the run.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p, optional_config=False)
    p.add_argument("--out", required=True,
                   help="run store: a directory or a URL (s3://bucket/run, gs://..., file://...); created if missing")
    p.add_argument("--models", type=int, default=None, help="models M to have in total (collect.models)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("fit", help="fit one linear datamodel per target (lasso, ridge, TRAK, ...)",
                       description="Fit one linear datamodel per target t with an estimator: lasso (default): "
                                   "min (1/2M)||y_t - b - X w||^2 + lam_t ||w||_1 on the run's complete models "
                                   "(lambda path on standardised features, lambda chosen per target on held-out "
                                   "models, refit on all); ridge: an L2 penalty chosen per target by GCV; trak: "
                                   "TRAK scores from per-example gradients of fit.trak_models models trained "
                                   "for it, calibrated to margins; trak-ridge: ridge on the masks shrunk towards "
                                   "TRAK (docs/estimators.md). Every estimator stores weights in raw-mask units "
                                   "in RUN/datamodels/ under its own name (several coexist); a new fit replaces "
                                   "the one of the same name only once complete.",
                       epilog="Other fit keys: --set fit.n_lambdas=60 --set fit.eps=1e-4 --set fit.val_fraction=0.2\n"
                              "  --set fit.trak_models=16 --set fit.trak_dim=512 --set fit.trak_ridge=0.01",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run store (directory or URL)")
    p.add_argument("--estimator", choices=["lasso", "ridge", "trak", "trak-ridge"], default=None,
                   help="how to estimate the datamodels (default: fit.estimator of the run, lasso)")
    p.add_argument("--keep-current", action="store_true",
                   help="store this fit beside the others without making it the one later stages read")
    p.add_argument("--targets", choices=["test", "test+train"], default=None,
                   help="test targets (default) or training examples too")
    p.add_argument("--backend", choices=["torch", "sklearn"], default=None,
                   help="torch: all targets at once (default); sklearn: per-target reference loop")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fit.* or resources.* key, e.g. resources.fit_on=cluster")
    add_cluster_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser("evaluate", help="measure datamodel quality (LDS) on held-out models",
                       description="Train E fresh masks R times each (stored in RUN/eval/, never used for "
                                   "fitting) and report the LDS: per target, the Spearman correlation "
                                   "between predicted and actual (repeat-averaged) margins across the E "
                                   "masks, averaged over targets; with Pearson, MSE and the noise ceiling.")
    p.add_argument("run", help="run store (directory or URL), fitted")
    p.add_argument("--masks", type=int, default=None, help="evaluation masks E (default: the run's eval.masks)")
    p.add_argument("--repeats", type=int, default=None, help="models R per mask (default: eval.repeats)")
    add_cluster_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_evaluate)

    from datamodels.cli_analysis import add_parsers

    add_parsers(sub)

    from datamodels.cli_experiments import add_parsers as add_experiment_parsers

    add_experiment_parsers(sub)

    from datamodels.cli_labels import add_parsers as add_label_parsers

    add_label_parsers(sub)

    p = sub.add_parser("status", help="how far a run is", description="Summarise a run store.")
    p.add_argument("run", help="run store (directory or URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("check", help="verify a run store's integrity (and repair it)",
                       description="Read every chunk of every array of RUN, verifying its checksum, and "
                                   "check that every complete model row is finite. Exit 0 when whole, 2 "
                                   "when damaged. --repair (under the run's claim) removes damaged chunks "
                                   "and marks their model rows incomplete, so re-running the stage that "
                                   "made them (train, evaluate, brittleness, verify) retrains exactly those; "
                                   "a damaged fit or result is removed, to be recomputed.")
    p.add_argument("run", help="run store (directory or URL)")
    p.add_argument("--repair", action="store_true", help="mend what is damaged (see above)")
    p.add_argument("--takeover", action="store_true", help="take over the run's claim (its driver is gone)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the store is consistent; re-run the same command to continue.", file=sys.stderr)
        return 130
    except Exception as e:
        code = exit_code(e)
        if args.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        expected = isinstance(e, DatamodelsError) or code == 2  # our own one-line errors
        print(f"error: {one_line(e)}" + ("" if args.verbose or expected else
                                         " (an unexpected error: re-run with -v for the traceback)"),
              file=sys.stderr)
        return code


def exit_code(e: BaseException) -> int:
    """2 for bad input (config, data, store: fix the input), 1 for a failure while running."""
    if isinstance(e, RunError):
        return 1
    if isinstance(e, (DatamodelsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                      PermissionError, ValueError)):
        return 2
    return 1


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an unexpected error is named by its type and cause."""
    text = " ".join(str(e).split())
    if isinstance(e, DatamodelsError):
        return text
    if isinstance(e, OSError) and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        return f"{type(e).__name__}:{where}: {e.strerror}"
    if exit_code(e) == 2 and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
