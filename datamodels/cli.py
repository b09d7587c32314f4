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
from datamodels.errors import DatamodelsError

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
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_train(args) -> int:
    from datamodels.collect import collect

    cfg = _load(args)
    summary = collect(cfg, args.out, address=args.address, progress=not args.no_progress)
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


def cmd_run(args) -> int:
    """The main job on a config: for now the collect stage; later stages extend it."""
    from datamodels.collect import collect

    cfg = _load(args)
    out = args.out or str(Path("runs") / cfg.name)
    print(f"datamodels run: {cfg.name} -> {out}", file=sys.stderr)
    summary = collect(cfg, out, address=args.address, progress=not args.no_progress)
    _print_status(summary, json_out=False)
    return 0


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
    p.add_argument("--out", default=None, help="run store directory (default: runs/<config name>)")
    p.set_defaults(fn=cmd_run, models=None)

    p = sub.add_parser("train", help="train models on random subsets into a run store",
                       description="Train models on random alpha-subsets and write masks and margins "
                                   "into the run store. Re-running trains only the missing models; "
                                   "a larger --models extends the run.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p, optional_config=False)
    p.add_argument("--out", required=True, help="run store directory (created if missing)")
    p.add_argument("--models", type=int, default=None, help="models M to have in total (collect.models)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("status", help="how far a run is", description="Summarise a run store.")
    p.add_argument("run", help="run store directory")
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
    except (DatamodelsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the store is consistent; re-run the same command to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
