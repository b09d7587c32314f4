"""Subcommand `label-issues` of the `datamodels` command (datamodels.label_issues is the stage)."""

from __future__ import annotations

import argparse
import json
import textwrap

from datamodels.errors import ConfigError

__all__ = ["add_parsers", "cmd_label_issues"]


def _plot_target(given: str) -> str:
    """Where ``--plot given`` writes (a directory gets label-issues.png); checked before any work."""
    from pathlib import Path

    from datamodels.cli_analysis import plot_path
    from datamodels.storage import Location

    if Location(given).local and Path(given).is_dir():
        given = str(Path(given) / "label-issues.png")
    return plot_path(given, 0)


def cmd_label_issues(args) -> int:
    from datamodels.cli_analysis import _jsonable, run_config
    from datamodels.label_issues import benchmark, label_issues, plot_issues

    if args.top < 0:
        raise ConfigError(f"--top: expected >= 0, got {args.top}")
    cfg = run_config(args.run, list(args.set), settable=("label_issues.", "resources."))
    if args.benchmark:
        from datamodels.label_issues import bench_arms

        bench_arms(cfg)  # bad configurations fail before any work
    plot = _plot_target(args.plot) if args.plot else None
    res = label_issues(args.run, split=args.split, top=args.top, cfg=cfg.label_issues, fit=args.fit)
    if plot:
        res["plot"] = str(plot_issues(res, plot, run=args.run))
    if args.benchmark:
        issues = res if "test" in res["splits"] else None
        res["benchmark"] = benchmark(args.run, cfg, issues=issues, address=args.address,
                                     progress=not args.no_progress, takeover=args.takeover)
    if args.json:
        print(json.dumps(_jsonable(res), indent=2))
        return 0
    _print(res)
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _print(res: dict) -> None:
    classes = res["classes"]
    print(f"label issues in {res['run']} (cleanlab confident learning, filter_by={res['filter_by']}, on "
          "out-of-sample probabilities)")
    for split, r in res["splits"].items():
        print(f"\n{split}: {r['flagged']} of {r['with_probabilities']} examples flagged ({_pct(r['flagged_rate'])}); "
              f"probabilities from {r['models']} models ({r['mean_models_per_example']:.1f} per example on average)")
        if r["note"]:
            print(f"  note: {r['note']}")
        p = r["planted"]
        if p is not None:
            print(f"  planted errors (data.label_noise): {p['planted']}; flagged {p['true_positives']} of them: "
                  f"precision {_pct(p['precision'])}, recall {_pct(p['recall'])}; suggested label = true label for "
                  f"{_pct(r['suggested_is_true'])} of those caught"
                  + (f"; {p['never_out_of_sample']} planted never out of sample" if p["never_out_of_sample"] else ""))
        if not r["issues"]:
            continue
        if r["flagged"] < len(r["issues"]):
            print(f"  (ranked by label quality; past the {r['flagged']} flagged, the lowest-quality labels that are "
                  "not flagged)")
        print(f"  {'rank':>4} {'index':>6} {'given':>10} {'suggested':>10} {'quality':>8} {'flagged':>8}  planted")
        for rank, i in enumerate(r["issues"], 1):
            planted = "-" if i["planted"] is None else (f"yes (true {classes[i['true']]})" if i["planted"] else "no")
            print(f"  {rank:>4} {i['index']:>6} {classes[i['given']]:>10} {classes[i['suggested']]:>10} "
                  f"{i['quality']:>8.4f} {'yes' if i['flagged'] else 'no':>8}  {planted}")
            e = i.get("explanation")
            if e:
                for side, name in (("toward_given", "toward given"), ("toward_suggested", "toward suggested")):
                    items = "  ".join(f"#{x['index']}({classes[x['label']]}) {x['weight']:+.3f}" for x in e[side])
                    print(f"       {name:>16}: {items or 'none'}")
        if r["explanations_note"]:
            print(f"  explanations: {r['explanations_note']}")
    if "plot" in res:
        print(f"\nplot: {res['plot']}")
    b = res.get("benchmark")
    if b:
        print(f"\nbenchmark: {b['models_per_arm']} full-set models per configuration; test accuracy (mean +- std) "
              f"with the {b['flagged']} flagged test labels as given, removed, relabelled"
              + (", and on the true labels" if "true" in b["variants"] else ""))
        width = max(len(a) for a in b["arms"]) + 2
        print("  " + "configuration".ljust(width) + "".join(f"{v:>18}" for v in b["variants"]))
        for arm in b["arms"]:
            cells = "".join(f"{100 * s['mean']:>10.2f} +- {100 * s['std']:<4.2f}" if s["mean"] is not None
                            else f"{'n/a':>18}" for s in (b["accuracy"][arm][v] for v in b["variants"]))
            print("  " + arm.ljust(width) + cells)
        for v, changed in b["ranking_changes"].items():
            print(f"  ranking {v}: {' > '.join(b['ranking'][v])} ({'CHANGES' if changed else 'unchanged'})")
        print(f"  figure: {b['figure']}")


def add_parsers(sub) -> None:
    """Add the `label-issues` subcommand to ``sub`` (argparse subparsers)."""
    from datamodels.cli import add_cluster_args

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=88)

    p = sub.add_parser(
        "label-issues", help="likely label errors (confident learning on out-of-sample probabilities)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=wrap("Average the softmax probabilities of the run's models that record logits (the first "
                         "collect.logit_models): each training example over the models that did not train on it, "
                         "each test example over all of them. Run cleanlab's confident learning on them "
                         "(find_label_issues, get_label_quality_scores) and list the flagged examples ranked by "
                         "label quality, with the suggested label and, from the run's datamodels, the training "
                         "examples that push the prediction toward the given label (largest weights) and toward "
                         "the suggested one (most negative weights among examples of that class). With "
                         "data.label_noise, precision and recall against the planted errors.")
        + "\n\n" + wrap("--benchmark: train label_issues.bench_models full-set models per configuration in "
                        "label_issues.bench_arms (stored, resumable) and report their test accuracy on the given "
                        "labels, with the flagged test examples removed and relabelled, and whether their ranking "
                        "changes; a figure next to the run."),
        epilog="examples:\n  datamodels label-issues runs/digits --top 8 --plot issues.png\n"
               "  datamodels run --out runs/digits-noise5 --set data.label_noise=0.05\n"
               "  datamodels label-issues runs/digits-noise5 --split test --json\n"
               "  datamodels label-issues runs/digits --benchmark --set label_issues.bench_models=8\n"
               "needs: datamodels train (logits), and datamodels fit RUN for the explanations")
    p.add_argument("run", help="run store (directory or URL)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both", help="which labels (default both)")
    p.add_argument("--top", type=int, default=10, help="flagged examples listed (and explained) per split (default 10)")
    p.add_argument("--fit", default=None, help="the fit whose datamodels explain (default: the current one)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write the listed issues as an image grid to PATH (png; a directory gets "
                        "PATH/label-issues.png)")
    p.add_argument("--benchmark", action="store_true",
                   help="also train and score the label_issues.bench_arms configurations (see above)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a label_issues.* or resources.* key (repeatable)")
    add_cluster_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(fn=cmd_label_issues)
