"""Collect stage: train the models a run is missing, M of them on random alpha-subsets.

Model i is the spec :func:`collect_spec` (cfg, i): its mask and training seed derive from
(run seed, i). ``collect`` validates, claims the run, creates or extends the store, and hands
the specs of models 0..M-1 to :func:`datamodels.runner.run_specs`, which trains only the rows
that are not complete and writes them in the driver.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datamodels.claim import DriverClaim
from datamodels.config import RunConfig
from datamodels.data import load_dataset
from datamodels.runner import run_specs
from datamodels.specs import ModelSpec, Subset
from datamodels.storage import Location
from datamodels.store import COLLECT_LOGITS, COLLECT_OUTPUTS, RunStore
from datamodels.train import training_seed

__all__ = ["collect_spec", "collect", "CollectSummary"]

log = logging.getLogger(__name__)


def collect_spec(cfg: RunConfig, i: int) -> ModelSpec:
    """Model ``i`` of a run: round(alpha N) examples drawn from (seed, i), seed from (seed, i);
    it records margins, and logits too when i < collect.logit_models (in the same training)."""
    outputs = COLLECT_OUTPUTS + (COLLECT_LOGITS if int(i) < cfg.collect.logit_models else ())
    return ModelSpec(key=(int(i),), seed=training_seed(cfg.seed, int(i)),
                     subset=Subset.random((cfg.seed, int(i)), cfg.collect.alpha), outputs=outputs)


class CollectSummary(dict):
    """status() of the store after collecting, plus ``trained`` (indices trained this call),
    ``retried`` (units retried after a worker died) and ``by_node`` (models per node)."""


def collect(cfg: RunConfig, out: str | Path | Location, *, address: str | None = None, progress: bool = True,
            takeover: bool = False) -> CollectSummary:
    """Train until the store at ``out`` holds ``cfg.collect.models`` complete models.

    Everything is checked before anything is written: config (already validated), dataset
    (must load), store (compatible config, writable), cluster (reachable). Re-running trains
    only what is missing; asking for more models extends the run.
    """
    loc = out if isinstance(out, Location) else Location.for_output(out)
    dataset = load_dataset(cfg.data)
    if (cfg.train.flip or cfg.train.tta_flip) and not dataset.flippable:
        log.warning("train.flip/train.tta_flip: %s says width flips change its labels (data.flippable), so no "
                    "image is flipped; set data.flippable=true to flip anyway", dataset.name)
    RunStore.prepare(loc, cfg, dataset)
    if cfg.resources.executor == "ray":
        from datamodels import cluster

        cluster.connect(address)  # an unreachable cluster fails here, before the store exists
    with DriverClaim(loc, takeover=takeover) as claim:
        store = RunStore.create(loc, cfg, dataset, claim=claim)
        table = store.models_table()
        specs = [collect_spec(cfg, i) for i in range(cfg.collect.models)]
        run = run_specs(store, table, specs, cfg=cfg, dataset=dataset, address=address, progress=progress,
                        desc="train")
        summary = CollectSummary(store.status())
    summary["trained"] = sorted(k[0] for k in run.trained)
    summary["retried"] = run.retried
    summary["by_node"] = dict(run.by_node)
    return summary
