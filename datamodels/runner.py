"""The one path every trained model takes: specs -> table rows -> executor -> driver writes.

:func:`run_specs` is what every stage calls. It gives each spec a row of its table (the resume
rule: complete rows of the same spec are skipped, see :class:`~datamodels.table.ModelTable`),
groups the rows to train by row chunk into units of work, runs them on an executor, and writes
each unit's results in the driver as it returns (the completion rule: ``complete`` last). An
interrupted call keeps every unit that returned; calling it again trains only the rest.

Executors (``resources.executor``):

- ``ray`` (default): the elastic actor pool of :mod:`datamodels.cluster` -- an embedded local
  Ray, or the cluster at ``--address``/``RAY_ADDRESS``.
- ``local``: in this process, one model at a time, without Ray (a single GPU box, a notebook).

Divergence, the one rule for every stage: a model whose outputs are not all finite is written
(retraining reproduces it) but never silently -- :class:`SpecRun` lists it, a warning names the
count, ``status`` counts it and every reader leaves it out. Once at least
:data:`DIVERGENCE_MIN_MODELS` models (or all of them, if fewer) have been trained by a call and
more than half of them diverged, the call stops with a
:class:`~datamodels.errors.DivergenceError` naming the likely setting.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from datamodels.config import RunConfig
from datamodels.data import Dataset
from datamodels.errors import DivergenceError
from datamodels.specs import ModelSpec, train_specs
from datamodels.table import ModelTable

__all__ = ["run_specs", "SpecRun", "DIVERGENCE_MIN_MODELS", "divergence_error"]

log = logging.getLogger(__name__)
DIVERGENCE_MIN_MODELS = 8


@dataclass
class SpecRun:
    """What :func:`run_specs` did: keys trained now (in the order written), units retried after
    a worker died, models trained per node (Ray node id, or "local"), keys of the models trained
    now whose outputs are not finite (diverged)."""

    trained: list[tuple[int, ...]] = field(default_factory=list)
    diverged: list[tuple[int, ...]] = field(default_factory=list)
    retried: int = 0
    by_node: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Unit:
    rows: tuple[int, ...]
    specs: tuple[ModelSpec, ...]


def run_specs(store, table: ModelTable, specs: list[ModelSpec], *, cfg: RunConfig, dataset: Dataset,
              address: str | None = None, progress: bool = True, desc: str = "train",
              executor: str | None = None) -> SpecRun:
    """Train every spec whose row in ``table`` is not complete; write results as they return.

    ``store`` must hold the run's claim (``with store.writing(): ...``); it is checked before
    every write. ``dataset`` is what the workers train on (shipped to them by the driver).
    """
    store.check_claim()
    todo = table.plan(specs)
    out = SpecRun()
    if not todo:
        return out
    spec_of = {int(r): s for r, s in zip(table.rows_of([s.key for s in specs]), specs)}
    units = [_Unit(tuple(rows), tuple(spec_of[r] for r in rows)) for rows in table.chunks_of(todo)]
    log.info("%s: %d of %d models to train in %d units", table.group.path, len(todo), len(specs), len(units))

    def write(unit: _Unit, results: list[dict[str, Any]]) -> None:
        store.check_claim()
        bad = set(table.write(list(unit.rows), results, list(unit.specs)))
        out.trained.extend(tuple(s.key) for s in unit.specs)
        out.diverged.extend(tuple(s.key) for r, s in zip(unit.rows, unit.specs) if r in bad)
        if bad:
            log.warning("%s: %d model(s) of key(s) %s trained to non-finite outputs (diverged): recorded, "
                        "and left out by every reader", table.group.path, len(bad),
                        [tuple(s.key) for r, s in zip(unit.rows, unit.specs) if r in bad][:4])
        if len(out.trained) >= min(DIVERGENCE_MIN_MODELS, len(todo)) and 2 * len(out.diverged) > len(out.trained):
            raise divergence_error(cfg, table.where, len(out.diverged), len(out.trained))

    if (executor or cfg.resources.executor) == "local":
        _run_local(units, write, dataset=dataset, cfg=cfg, progress=progress, desc=desc)
        out.by_node["local"] = len(out.trained)
        return out
    from datamodels import cluster  # Ray stays out of everything else

    cluster.connect(address)
    pool = cluster.Pool.get(dataset, threads=cfg.train.threads, device=cfg.train.device, resources=cfg.resources)
    tasks = [cluster.Task(key=(table.group.path, u.rows[0]), fn=train_specs, args=(cfg, list(u.specs)),
                          units=len(u.rows)) for u in units]
    unit_of = {t.key: u for t, u in zip(tasks, units)}
    report = pool.run(tasks, lambda task, results: write(unit_of[task.key], results), progress=progress, desc=desc)
    out.by_node, out.retried = report.by_node, report.retried
    return out


def _run_local(units: list[_Unit], write: Callable, *, dataset: Dataset, cfg: RunConfig, progress: bool,
               desc: str) -> None:
    import torch
    from tqdm.auto import tqdm

    from datamodels.train import resolve_device

    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    with tqdm(total=sum(len(u.rows) for u in units), unit="models", desc=desc, disable=not progress) as bar:
        for u in units:
            write(u, train_specs(dataset, cfg, list(u.specs)))
            bar.update(len(u.rows))


def divergence_error(cfg: RunConfig, what: str, diverged: int, trained: int) -> DivergenceError:
    """The message when most models diverge: how many, the likely setting and its value, the fix."""
    from datamodels.config import ModelConfig, TrainConfig

    t, default = cfg.train, TrainConfig()
    hints = [f"train.lr={t.lr:g} (default {default.lr:g}): lower it, e.g. --set train.lr={t.lr / 10:g}"]
    if t.precision != "float32":
        hints.append(f"train.precision={t.precision}: try float32")
    if cfg.model.scale_out > 1:
        hints.append(f"model.scale_out={cfg.model.scale_out:g} (default {ModelConfig().scale_out:g})")
    return DivergenceError(
        f"{what}: {diverged} of the {trained} models trained so far have NaN or infinite outputs (training "
        f"diverged), so the run stopped; the likely setting is {'; or '.join(hints)}. The models already "
        "written are kept; a store's training settings are fixed, so train the new setting into a new --out")
