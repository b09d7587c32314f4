"""Experiments made of the specs the pipeline already trains: subsets, label overrides, seeds,
recipe options, a teacher.

- :func:`learn_from_errors` -- "Learning from Incorrectly Labeled Data" (Wallace): a briefly
  trained teacher relabels the training set with its predictions; a fresh student trained on
  only the examples the teacher got WRONG (with the teacher's wrong labels) is tested on the real
  test set, next to a student trained on the same examples with their true labels.
- :func:`noisy_kd` -- "Noisy Collaboration in Knowledge Distillation": a baseline, random label
  corruption, Gaussian input noise, distillation from a teacher, a fickle teacher (dropout kept
  on while it teaches), soft randomization (noisy student input, clean teacher input) and all
  of them together, on clean test accuracy and under L-inf PGD (:mod:`datamodels.attacks`).

Every model is a :class:`~datamodels.specs.ModelSpec` in the table
``experiments/<name>/models`` of a run store, trained by :func:`datamodels.runner.run_specs`:
re-running an experiment trains only what is missing. Keys are (arm, seed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from datamodels.claim import DriverClaim
from datamodels.config import RunConfig
from datamodels.data import Dataset, load_dataset
from datamodels.domains import KD_DOMAIN, LFE_DOMAIN
from datamodels.runner import run_specs
from datamodels.specs import ModelSpec, Subset
from datamodels.storage import Location, save_figure
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.train import training_seed

__all__ = ["LFE_ARMS", "KD_ARMS", "learn_from_errors", "noisy_kd", "wrong_label_set", "kd_arm_options"]

log = logging.getLogger(__name__)

LFE_ARMS = ("teacher", "student (teacher's wrong labels)", "student (true labels)")


def _open(cfg: RunConfig, out, dataset: Dataset, claim: DriverClaim) -> RunStore:
    return RunStore.create(out, cfg, dataset, claim=claim)


def _summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "values": [float(x) for x in v]}


def _bar_png(where: str, title: str, names: Sequence[str], groups: dict[str, list[list[float]]],
             chance: float | None) -> str:
    """Bars (mean) with every seed's value as a dot; ``groups`` {series: [per name values]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(14, max(6, 1.1 * len(names) + 0.3 * len(names) * len(groups))), 4.5))
    width = 0.8 / max(1, len(groups))
    for g, (series, per_name) in enumerate(groups.items()):
        xs = np.arange(len(names)) + (g - (len(groups) - 1) / 2) * width
        means = [np.mean(v) if len(v) else np.nan for v in per_name]
        ax.bar(xs, means, width, label=series, alpha=0.8)
        for x, v in zip(xs, per_name):
            ax.plot([x] * len(v), v, "k.", ms=4)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.13)  # headroom above 100% for the legend, so it never hides a bar
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(groups) + (chance is not None), frameon=False)
    fig.tight_layout()
    return save_figure(fig, where)


# --------------------------------------------------------------------------- learning from errors


def wrong_label_set(train_logits: np.ndarray, train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The examples a teacher gets wrong and its labels for them: (indices (k,), labels (k,)),
    from the teacher's training logits (N, K) and the true labels (N,). Every returned label
    differs from the true one."""
    pred = np.asarray(train_logits).argmax(axis=1)
    wrong = np.flatnonzero(pred != np.asarray(train_y))
    return wrong, pred[wrong].astype(np.int64)


def _lfe_table(store: RunStore) -> ModelTable:
    return store.table("experiments/learn-from-errors/models", key_names=["arm", "seed"],
                       outputs=("test_margins", "train_logits"), rows_per_chunk=1, labels=True)


def learn_from_errors(cfg: RunConfig, out, *, seeds: int = 3, teacher_epochs: int = 1,
                      dataset: Dataset | None = None, address: str | None = None, progress: bool = True,
                      takeover: bool = False) -> dict:
    """Run the experiment for ``seeds`` seeds into the run store at ``out``; return its report.

    Per seed s: a teacher (the full training set, ``teacher_epochs`` epochs of the run's recipe)
    records its training logits; its wrong set W = {i : argmax teacher(x_i) != y_i} becomes
    the subset of two students trained with the run's recipe from the same seed: one on the
    teacher's labels for W (``labels`` override), one on the true labels. Accuracies are on the
    real test set; chance is 1/K.
    """
    loc = out if isinstance(out, Location) else Location.for_output(out)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    RunStore.prepare(loc, cfg, dataset)
    y = dataset.train_y.numpy()
    with DriverClaim(loc, takeover=takeover) as claim:
        store = _open(cfg, loc, dataset, claim)
        table = _lfe_table(store)
        outputs = ("test_margins", "train_logits")
        teachers = [ModelSpec(key=(0, s), seed=training_seed(cfg.seed, s, domain=(LFE_DOMAIN, 0)),
                              subset=Subset.all_but(), outputs=outputs, options=(("train.epochs", int(teacher_epochs)),))
                    for s in range(seeds)]
        run_specs(store, table, teachers, cfg=cfg, dataset=dataset, address=address, progress=progress,
                  desc="teachers")
        logits = table.read("train_logits", table.rows_of([t.key for t in teachers]))
        students, wrong_sets = [], {}
        for s in range(seeds):
            wrong, new = wrong_label_set(logits[s], y)
            wrong_sets[s] = wrong
            if len(wrong) < 2:  # a batch needs two examples; nothing to learn from
                log.warning("seed %d: the teacher gets %d training examples wrong; no students", s, len(wrong))
                continue
            seed = training_seed(cfg.seed, s, domain=(LFE_DOMAIN, 1))
            students += [ModelSpec(key=(1, s), seed=seed, subset=Subset.only(wrong), labels=(wrong, new), outputs=outputs),
                         ModelSpec(key=(2, s), seed=seed, subset=Subset.only(wrong), outputs=outputs)]
        run_specs(store, table, students, cfg=cfg, dataset=dataset, address=address, progress=progress,
                  desc="students")
        rows = table.rows_of([t.key for t in teachers] + [t.key for t in students])
        margins = dict(zip([tuple(k) for k in table.keys()[rows]], table.read("test_margins", rows)))
    teacher_train = [(logits[s].argmax(1) == y).mean() for s in range(seeds)]
    per_seed = []
    for s in range(seeds):
        row = {"seed": s, "teacher_train_accuracy": float(teacher_train[s]),
               "teacher_test_accuracy": float((margins[(0, s)] > 0).mean()), "wrong_set": int(len(wrong_sets[s]))}
        for arm, name in ((1, "student_accuracy"), (2, "true_label_accuracy")):
            row[name] = float((margins[(arm, s)] > 0).mean()) if (arm, s) in margins else None
        per_seed.append(row)
    done = [r for r in per_seed if r["student_accuracy"] is not None]
    report = {
        "experiment": "learn-from-errors", "run": loc.url, "dataset": dataset.name, "N": dataset.num_train,
        "T": dataset.num_test, "K": dataset.num_classes, "seeds": seeds, "teacher_epochs": int(teacher_epochs),
        "student_epochs": cfg.train.epochs, "chance": 1.0 / dataset.num_classes, "per_seed": per_seed,
        "teacher_train_accuracy": _summary([r["teacher_train_accuracy"] for r in per_seed]),
        "teacher_test_accuracy": _summary([r["teacher_test_accuracy"] for r in per_seed]),
        "wrong_set": _summary([r["wrong_set"] for r in per_seed]),
        "student_accuracy": _summary([r["student_accuracy"] for r in done]),
        "true_label_accuracy": _summary([r["true_label_accuracy"] for r in done]),
    }
    report["png"] = _bar_png(
        loc.child("experiments/learn-from-errors/accuracy.png"),
        f"learning from incorrect labels ({dataset.name}, {seeds} seed{'s' if seeds > 1 else ''})",
        ["teacher", "student: teacher's\nwrong labels", "student: true labels"],
        {"test accuracy": [[r["teacher_test_accuracy"] for r in per_seed], [r["student_accuracy"] for r in done],
                           [r["true_label_accuracy"] for r in done]]},
        report["chance"])
    return report


# --------------------------------------------------------------------------- noisy distillation

KD_ARMS = ("baseline", "label corruption", "input noise", "distillation", "fickle teacher",
           "soft randomization", "all combined")


@dataclass(frozen=True)
class KDSettings:
    """The noise each arm of :func:`noisy_kd` adds (recipe keys of the run's ``train`` section)."""

    label_corruption: float = 0.2
    input_noise: float = 0.5
    teacher_dropout: float = 0.3
    distill_weight: float = 0.7
    distill_temperature: float = 4.0


def kd_arm_options(arm: str, k: KDSettings) -> tuple[tuple[tuple[str, object], ...], bool]:
    """(recipe options, whether the arm distils from the teacher) of arm ``arm``."""
    kd = (("train.distill_weight", k.distill_weight), ("train.distill_temperature", k.distill_temperature))
    table = {
        "baseline": ((), False),
        "label corruption": ((("train.label_corruption", k.label_corruption),), False),
        "input noise": ((("train.input_noise", k.input_noise),), False),
        "distillation": (kd, True),
        "fickle teacher": (kd + (("train.teacher_dropout", k.teacher_dropout),), True),
        "soft randomization": (kd + (("train.input_noise", k.input_noise),), True),
        "all combined": (kd + (("train.teacher_dropout", k.teacher_dropout), ("train.input_noise", k.input_noise),
                               ("train.label_corruption", k.label_corruption)), True),
    }
    if arm not in table:
        raise ValueError(f"noisy-kd arm: expected one of {list(table)}, got {arm!r}")
    return table[arm]


def _kd_table(store: RunStore) -> ModelTable:
    return store.table("experiments/noisy-kd/models", key_names=["arm", "seed"],
                       outputs=("test_margins", "params"), rows_per_chunk=1)


def noisy_kd(cfg: RunConfig, out, *, seeds: int = 3, epsilons: Sequence[float] = (0.0, 0.02, 0.05, 0.1),
             pgd_steps: int = 10, settings: KDSettings = KDSettings(), dataset: Dataset | None = None,
             address: str | None = None, progress: bool = True, takeover: bool = False) -> dict:
    """Train a teacher and every arm of :data:`KD_ARMS` for ``seeds`` seeds; return clean and
    PGD accuracy per arm.

    The teacher of seed s is a model of the run's recipe on the full training set (key
    (0, s)); arm a (key (a + 1, s)) is a student of the same architecture trained from its own
    seed on the full set with the arm's options; distilling arms learn from teacher s.
    ``epsilons`` are L-inf radii in pixel units ([0, 1] scale, see :mod:`datamodels.attacks`);
    0 is clean accuracy.
    """
    from datamodels.attacks import adversarial_accuracy
    from datamodels.model import build_model, load_flat_state
    from datamodels.train import eval_options

    loc = out if isinstance(out, Location) else Location.for_output(out)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    RunStore.prepare(loc, cfg, dataset)
    outputs = ("test_margins", "params")
    with DriverClaim(loc, takeover=takeover) as claim:
        store = _open(cfg, loc, dataset, claim)
        table = _kd_table(store)
        teachers = [ModelSpec(key=(0, s), seed=training_seed(cfg.seed, s, domain=(KD_DOMAIN, 0)),
                              subset=Subset.all_but(), outputs=outputs) for s in range(seeds)]
        run_specs(store, table, teachers, cfg=cfg, dataset=dataset, address=address, progress=progress,
                  desc="teachers")
        params = table.read("params", table.rows_of([t.key for t in teachers]))
        students = []
        for a, arm in enumerate(KD_ARMS, start=1):
            options, distils = kd_arm_options(arm, settings)
            for s in range(seeds):
                students.append(ModelSpec(key=(a, s), seed=training_seed(cfg.seed, s, domain=(KD_DOMAIN, a)),
                                          subset=Subset.all_but(), outputs=outputs, options=options,
                                          teacher=params[s] if distils else None))
        run_specs(store, table, students, cfg=cfg, dataset=dataset, address=address, progress=progress,
                  desc="students")
        keys = [t.key for t in teachers] + [t.key for t in students]
        rows = table.rows_of(keys)
    device = torch.device("cpu")
    norm = eval_options(dataset, cfg, device)
    mean, std = norm["mean"], norm["std"]
    acc: dict[tuple[int, int], dict[float, float]] = {}
    for key, row in zip(keys, rows):
        model = load_flat_state(build_model(cfg.model, dataset.train_x.shape[1], dataset.num_classes),
                                table.read("params", [row])[0]).eval()
        acc[tuple(key)] = adversarial_accuracy(model, dataset.test_x, dataset.test_y, epsilons, mean=mean, std=std,
                                               steps=pgd_steps)
    arms = {}
    for a, arm in enumerate(("teacher",) + KD_ARMS):
        options = () if a == 0 else kd_arm_options(arm, settings)[0]
        arms[arm] = {"options": {k: v for k, v in options},
                     "accuracy": {f"{e:g}": _summary([acc[(a, s)][float(e)] for s in range(seeds)]) for e in epsilons}}
    report = {"experiment": "noisy-kd", "run": loc.url, "dataset": dataset.name, "N": dataset.num_train,
              "T": dataset.num_test, "K": dataset.num_classes, "seeds": seeds, "epsilons": [float(e) for e in epsilons],
              "attack": f"L-inf PGD in pixel space [0, 1], {pgd_steps} steps of 2.5 eps / steps, best iterate kept",
              "chance": 1.0 / dataset.num_classes, "arms": arms}
    names = list(arms)
    report["png"] = _bar_png(
        loc.child("experiments/noisy-kd/accuracy.png"), f"noisy distillation ({dataset.name}, {seeds} seed{'s' if seeds > 1 else ''})",
        names, {("clean" if e == 0 else f"PGD eps={e:g}"): [arms[n]["accuracy"][f"{e:g}"]["values"] for n in names]
                for e in epsilons}, report["chance"])
    return report
