"""Every model the product trains is one spec: a training subset, label overrides, a seed, and
the outputs to record.

Collect models, held-out evaluation models, full-set reference models and verification checks
differ only in their specs: this module is the one place that turns a spec into a trained
model and its outputs (:func:`train_spec`), with no store and no Ray. The driver hands specs to
:func:`datamodels.runner.run_specs`, which schedules them and writes what comes back.

A spec is small and picklable: a random subset is described by the entropy it is drawn from,
not by its N-long mask, and its :meth:`ModelSpec.digest` identifies it (a store row trained
from another spec under the same key is stale and is retrained).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datamodels.config import RunConfig, apply_overrides, config_from_dict
from datamodels.data import Dataset
from datamodels.model import build_model, flat_state, load_flat_state
from datamodels.train import (_seeds, corrupt_labels, eval_options, predict, margin_from_logits, resolve_device,
                              subset_size, train_on)

__all__ = ["OUTPUTS", "Subset", "ModelSpec", "train_spec", "train_specs", "output_shape"]

# name -> (shape in dataset letters, dtype, fill value of a row not written yet)
OUTPUTS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "test_margins": (("T",), "float32", np.nan),
    "train_margins": (("N",), "float32", np.nan),  # out-of-sample where the mask is False
    "test_logits": (("T", "K"), "float32", np.nan),
    "train_logits": (("N", "K"), "float32", np.nan),
    "test_features": (("T", "D"), "float16", 0),  # penultimate layer
    "train_features": (("N", "D"), "float16", 0),
    # per-example margin gradients, count-sketched to P = fit.trak_dim dims (TRAK's features)
    "test_grads": (("T", "P"), "float32", np.nan),
    "train_grads": (("N", "P"), "float32", np.nan),
    "params": (("W",), "float32", np.nan),  # model.flat_state: the trained model itself (a teacher, an attack)
}


def output_shape(name: str, dims: dict[str, int]) -> tuple[int, ...]:
    """Shape of one row of output ``name`` for dataset dims {"N", "T", "K", "D", "W"}."""
    return tuple(int(dims[d]) for d in OUTPUTS[name][0])


@dataclass(frozen=True, eq=False)
class Subset:
    """Which training examples a model sees.

    kind "random": exactly round(alpha N) examples drawn by numpy's Generator from the entropy
    ``key`` = (run seed, *domain, index) (the determinism contract of docs/design.md).
    "all": every example but ``indices`` (a removal set; empty for the full set).
    "only": exactly ``indices``.
    """

    kind: str
    key: tuple[int, ...] = ()
    alpha: float = 1.0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def random(cls, key: tuple[int, ...], alpha: float) -> "Subset":
        return cls("random", tuple(int(k) for k in key), float(alpha))

    @classmethod
    def all_but(cls, indices=()) -> "Subset":
        return cls("all", indices=np.unique(np.asarray(indices, dtype=np.int64)))

    @classmethod
    def only(cls, indices) -> "Subset":
        return cls("only", indices=np.unique(np.asarray(indices, dtype=np.int64)))

    def mask(self, n: int) -> np.ndarray:
        """(N,) bool."""
        mask = np.zeros(n, dtype=bool)
        if self.kind == "random":
            rng = np.random.default_rng(_seeds(*self.key)[0])
            mask[rng.choice(n, size=subset_size(n, self.alpha), replace=False)] = True
        elif self.kind == "all":
            mask[:] = True
            mask[self.indices] = False
        elif self.kind == "only":
            mask[self.indices] = True
        else:
            raise ValueError(f"subset kind: expected random, all or only, got {self.kind!r}")
        return mask

    def _describe(self) -> bytes:
        return repr((self.kind, self.key, float(self.alpha))).encode() + self.indices.astype("<i8").tobytes()


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One model to train.

    key      unique within its table (e.g. (i,) for collect, (e, r) for evaluation)
    seed     training seed: init, batch order, augmentation
    subset   the training examples (:class:`Subset`)
    labels   None, or (indices (k,), new labels (k,)) replacing those training labels
    outputs  names from :data:`OUTPUTS` to record
    options  ((config key, value), ...) changes to the run's training recipe, e.g.
             (("train.epochs", 2),)
    teacher  None, or the (P,) float32 :func:`~datamodels.model.flat_state` of a trained model
             of the same architecture to distil from (the driver reads it from its table's
             ``params`` and ships it with the spec; ``train.distill_*`` set how)
    """

    key: tuple[int, ...]
    seed: int
    subset: Subset
    labels: tuple[np.ndarray, np.ndarray] | None = None
    outputs: tuple[str, ...] = ("test_margins",)
    options: tuple[tuple[str, Any], ...] = ()
    teacher: np.ndarray | None = None

    def __post_init__(self):
        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad:
            raise ValueError(f"spec outputs: expected names from {list(OUTPUTS)}, got {bad}")

    def digest(self) -> int:
        """A 63-bit identity of what the model is trained on and how (not of its key)."""
        h = hashlib.sha256(self.subset._describe())
        h.update(repr((int(self.seed), self.options)).encode())
        if self.labels is not None:
            idx, new = self.labels
            h.update(np.asarray(idx, dtype="<i8").tobytes() + b"|" + np.asarray(new, dtype="<i8").tobytes())
        if self.teacher is not None:  # a retrained teacher makes its students stale
            h.update(b"teacher|" + np.asarray(self.teacher, dtype="<f4").tobytes())
        return int.from_bytes(h.digest()[:8], "little") >> 1

    def train_labels(self, train_y: torch.Tensor) -> torch.Tensor | None:
        if self.labels is None:
            return None
        idx, new = self.labels
        labels = train_y.clone()
        labels[torch.as_tensor(np.asarray(idx, dtype=np.int64))] = torch.as_tensor(np.asarray(new, dtype=np.int64))
        return labels

    def label_row(self, n: int) -> np.ndarray:
        """(N,) int16: the new label of each overridden example, -1 elsewhere (how stores keep it)."""
        row = np.full(n, -1, dtype=np.int16)
        if self.labels is not None:
            row[np.asarray(self.labels[0], dtype=np.int64)] = np.asarray(self.labels[1], dtype=np.int16)
        return row

    def config(self, cfg: RunConfig) -> RunConfig:
        """The run's config with this spec's recipe ``options`` applied."""
        if not self.options:
            return cfg
        raw = apply_overrides(cfg.to_dict(), [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                              for k, v in self.options])
        return config_from_dict(RunConfig, raw, source=f"spec {self.key} options")


def _record(model, dataset: Dataset, cfg: RunConfig, outputs: tuple[str, ...], device,
            seed: int = 0) -> dict[str, np.ndarray]:
    kw = eval_options(dataset, cfg, device)
    out: dict[str, np.ndarray] = {}
    if "params" in outputs:
        out["params"] = flat_state(model)
    for split, x, y in (("test", dataset.test_x, dataset.test_y), ("train", dataset.train_x, dataset.train_y)):
        want = {o.split("_", 1)[1] for o in outputs if o.startswith(split + "_")}
        if "grads" in want:
            from datamodels.trak import projected_grads

            out[f"{split}_grads"] = projected_grads(model, x.to(device), y.to(device), dim=cfg.fit.trak_dim,
                                                    seed=seed, mean=kw["mean"], std=kw["std"]).cpu().numpy()
            want.discard("grads")
        if not want:
            continue
        logits, feats = predict(model, x.to(device), features="features" in want, **kw)
        if "margins" in want:
            out[f"{split}_margins"] = margin_from_logits(logits, y.to(device)).float().cpu().numpy()
        if "logits" in want:
            out[f"{split}_logits"] = logits.float().cpu().numpy()
        if "features" in want:
            out[f"{split}_features"] = feats.cpu().numpy().astype(np.float16)
    return out


def train_spec(dataset: Dataset, cfg: RunConfig, spec: ModelSpec, *,
               device: torch.device | None = None) -> dict[str, Any]:
    """Train the model ``spec`` describes; return {"key", "mask" (N,) bool, each output, "seconds"}.

    Margins are always against the TRUE labels (``dataset``'s), also where a spec overrides
    training labels or ``train.label_corruption`` corrupts them (the spec's overrides apply on
    top of the corrupted labels). On CPU with one thread the result is bit-identical on every
    retrain.
    """
    t0 = time.perf_counter()
    cfg = spec.config(cfg)
    device = device or resolve_device(cfg.train.device)
    mask = spec.subset.mask(dataset.num_train)
    labels = dataset.train_y
    if cfg.train.label_corruption > 0:
        labels = corrupt_labels(labels, cfg.train.label_corruption, num_classes=dataset.num_classes, seed=cfg.seed)
    labels = spec.train_labels(labels) if spec.labels is not None else labels
    teacher = None
    if spec.teacher is not None:
        teacher = load_flat_state(build_model(cfg.model, dataset.train_x.shape[1], dataset.num_classes),
                                  spec.teacher).to(device).eval()
    model = train_on(dataset, torch.from_numpy(np.flatnonzero(mask)), cfg, spec.seed,
                     labels=labels, device=device, teacher=teacher)
    out: dict[str, Any] = {"key": spec.key, "mask": mask}
    out.update(_record(model, dataset, cfg, spec.outputs, device, seed=spec.seed))
    out["seconds"] = time.perf_counter() - t0
    return out


def train_specs(dataset: Dataset, cfg: RunConfig, specs: list[ModelSpec]) -> list[dict[str, Any]]:
    """The unit of work an executor runs: train each spec in order, return their results."""
    return [train_spec(dataset, cfg, s) for s in specs]

