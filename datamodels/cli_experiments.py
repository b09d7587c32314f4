"""Subcommand `experiment` of the `datamodels` command: `learn-from-errors` and `noisy-kd`.

Each takes a run config (default: the embedded digits pipeline) and an --out run store
(default runs/<experiment>); re-running the same command trains only what is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parsers"]


def _common(p) -> None:
    from datamodels.cli import _add_config_args

    _add_config_args(p, optional_config=True)
    p.add_argument("--out", default=None, help="run store: a directory (default: runs/<experiment>) or a URL")
    p.add_argument("--seeds", type=int, default=3, help="independent repetitions (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")


def _out(args, name: str) -> str:
    return args.out or str(Path("runs") / name)


def _check_seeds(args) -> None:
    from datamodels.errors import ConfigError

    if args.seeds < 1:
        raise ConfigError(f"--seeds: expected at least 1, got {args.seeds}")


def _pm(s: dict, pct: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    f = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    return f"{s['mean'] * f:.1f}{unit} +- {s['std'] * f:.1f}{unit}"


def cmd_learn_from_errors(args) -> int:
    from datamodels.cli import _load
    from datamodels.errors import ConfigError
    from datamodels.experiments import learn_from_errors

    _check_seeds(args)
    if args.teacher_epochs < 1:
        raise ConfigError(f"--teacher-epochs: expected at least 1, got {args.teacher_epochs}")
    cfg = _load(args)
    r = learn_from_errors(cfg, _out(args, "learn-from-errors"), seeds=args.seeds, teacher_epochs=args.teacher_epochs,
                          address=args.address, progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"learning from incorrect labels: {r['dataset']} (N={r['N']}, T={r['T']}, K={r['K']}), "
          f"{r['seeds']} seeds, mean +- std over seeds")
    print(f"  teacher ({r['teacher_epochs']} epoch{'s' if r['teacher_epochs'] > 1 else ''}, full set): "
          f"train {_pm(r['teacher_train_accuracy'])}, test {_pm(r['teacher_test_accuracy'])}")
    print(f"  wrong-label set: {_pm(r['wrong_set'], pct=False)} of {r['N']} training examples")
    print(f"  student on them ({r['student_epochs']} epochs), teacher's wrong labels: test {_pm(r['student_accuracy'])}")
    print(f"  student on them, true labels:                test {_pm(r['true_label_accuracy'])}")
    print(f"  chance: {r['chance'] * 100:.1f}%   figure: {r['png']}")
    return 0


def cmd_noisy_kd(args) -> int:
    from datamodels.cli import _load
    from datamodels.errors import ConfigError
    from datamodels.experiments import noisy_kd

    _check_seeds(args)
    eps = [0.0] + [float(e) for e in args.eps]
    if any(e < 0 or e > 1 for e in eps):
        raise ConfigError(f"--eps: expected values in [0, 1] (pixel scale), got {args.eps}")
    cfg = _load(args)
    r = noisy_kd(cfg, _out(args, "noisy-kd"), seeds=args.seeds, epsilons=eps, pgd_steps=args.pgd_steps,
                 address=args.address, progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"noisy distillation: {r['dataset']} (N={r['N']}, T={r['T']}), {r['seeds']} seeds, mean +- std; "
          f"{r['attack']}")
    cols = [f"{e:g}" for e in r["epsilons"]]
    print(f"  {'arm':<20}" + "".join(f"{('clean' if c == '0' else 'eps ' + c):>17}" for c in cols))
    for arm, a in r["arms"].items():
        print(f"  {arm:<20}" + "".join(f"{_pm(a['accuracy'][c]):>17}" for c in cols))
    print(f"  figure: {r['png']}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("experiment", help="experiments on the same machinery (learn-from-errors, noisy-kd)",
                       description="Experiments whose every model is a spec in the run store: re-running "
                                   "the same command trains only what is missing.")
    esub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    q = esub.add_parser(
        "learn-from-errors", help="train a student only on a weak teacher's wrong labels",
        description="A teacher trained briefly on the full training set relabels it with its predictions; a "
                    "fresh student trained only on the examples it got wrong (with those wrong labels) is tested "
                    "on the real test set, next to a student on the same examples with their true labels, and "
                    "chance. Every model is stored in OUT/experiments/learn-from-errors/models.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q)
    q.add_argument("--teacher-epochs", type=int, default=1,
                   help="epochs of the teacher (default 1: weak enough to get a fair share wrong)")
    q.set_defaults(fn=cmd_learn_from_errors, models=None)

    q = esub.add_parser(
        "noisy-kd", help="baseline vs label corruption, input noise, distillation, fickle teacher, soft "
                         "randomization and all combined; clean and PGD accuracy",
        description="Trains a teacher per seed and one student per arm and seed (recipe keys "
                    "train.label_corruption, train.input_noise, train.distill_weight/temperature, "
                    "train.teacher_dropout), then measures test accuracy clean and under L-inf PGD in pixel space.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q)
    q.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.1], metavar="EPS",
                   help="L-inf radii in pixel units, [0, 1] scale (default 0.02 0.05 0.1); clean is always shown")
    q.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default 10)")
    q.set_defaults(fn=cmd_noisy_kd, models=None)
