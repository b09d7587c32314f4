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
from datamodels.errors import ClusterError, DatamodelsError

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


def _print_status(status: dict, *, json_out: bool) -> None:
    if json_out:
        print(json.dumps({k: v for k, v in status.items() if k != "trained"}, indent=2))
        return
    acc = status["mean_test_accuracy"]
    print(f"run {status['path']} ({status['config_name']}, {status['dataset']}: "
          f"N={status['num_train']}, T={status['num_targets']}, alpha={status['alpha']})")
    print(f"  models: {status['completed']}/{status['requested']} complete"
          + (f", {len(status['trained'])} trained now" if "trained" in status else ""))
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
    for flag, key in (("targets", "targets"), ("backend", "backend"), ("device", "device")):
        if getattr(args, flag) is not None:
            sets.append(f"fit.{key}={getattr(args, flag)}")
    from datamodels.cli_analysis import run_config

    run_cfg = run_config(args.run, sets, settable=("fit.", "resources."))
    summary = fit_run(args.run, run_cfg.fit, resources=run_cfg.resources, address=args.address,
                      progress=_fit_progress(not args.no_progress), takeover=args.takeover)
    _print_fit(summary, json_out=args.json)
    return 0


def _print_fit(s: dict, *, json_out: bool) -> None:
    if json_out:
        print(json.dumps(s, indent=2))
        return
    print(f"fit: {s['models_used']} models ({s['n_train']} fit + {s['n_val']} validation), "
          f"{s['models_left_out']} left out (non-finite margins); targets: {s['targets']}; "
          f"backend {s['fit']['backend']}, {s['seconds']:.1f} s ({'in the driver' if s['ran_on'] == 'driver' else 'as a Ray task'})")
    print(f"  mean non-zeros per datamodel: {s['mean_nnz']:.1f}   mean validation MSE: {s['mean_val_mse']:.4f}")


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
    """The main job: train, fit, evaluate (LDS), brittleness for all targets, verify a sample."""
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
    v = analysis["verify"].get("remove", {})
    rate = "n/a" if v.get("rate") is None else f"{v['rate']:.0%} ({v['verified']}/{v['checked']})"
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
    print(f"  verified        removal sets confirmed by retraining: {rate}")
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

    p = sub.add_parser("fit", help="fit one sparse linear datamodel per target",
                       description="Fit min (1/2M)||y_t - b - X w||^2 + lam_t ||w||_1 per target t on the "
                                   "run's complete models (lambda path on standardised features, lambda "
                                   "chosen per target on held-out models, refit on all). Stores weights "
                                   "in raw-mask units in RUN/datamodels/; replaces a previous fit only "
                                   "once the new one is complete.",
                       epilog="Other fit keys: --set fit.n_lambdas=60 --set fit.eps=1e-4 --set fit.val_fraction=0.2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run store (directory or URL)")
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

    p = sub.add_parser("status", help="how far a run is", description="Summarise a run store.")
    p.add_argument("run", help="run store (directory or URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ClusterError as e:  # the work could not run: exit 1, nothing written is lost
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DatamodelsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the store is consistent; re-run the same command to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
