"""Seeded label flips: the one drawing behind ``data.label_noise`` and ``train.label_corruption``.

Two uses, one draw (:func:`draw_label_flips`: exactly round(share n) examples without
replacement, each given one of the K - 1 classes that are not its own, uniformly):

- ``data.label_noise`` (:func:`apply_label_noise`, called when the dataset loads): the flipped
  labels *are* the dataset's given labels -- every model trains on them and its margins are
  measured against them, the store's ``train_labels``/``test_labels`` hold them and the dataset
  fingerprint changes. The planted indices and their true labels are recorded in the store
  (``attrs.dataset.split.label_noise``), a known answer for ``datamodels label-issues``.
  Seeded by (data.split_seed, LABEL_NOISE_DOMAIN, split), split 0 = train, 1 = test.
- ``train.label_corruption`` (:func:`datamodels.train.corrupt_labels`): a training recipe -- the
  dataset keeps its true labels, only the labels the models are trained on are corrupted, and
  margins stay against the true labels (the experiments of docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from datamodels.domains import LABEL_NOISE_DOMAIN

__all__ = ["LABEL_NOISE_DOMAIN", "draw_label_flips", "apply_label_noise", "planted_label_noise"]

SPLITS = {"train": 0, "test": 1}


def draw_label_flips(y: np.ndarray, share: float, *, num_classes: int,
                     entropy: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(indices (k,), new labels (k,)) for labels ``y`` (n,): k = round(share n) distinct
    examples, each new label uniform over the K - 1 classes other than its own, all drawn by
    numpy's Generator from ``SeedSequence(entropy)``. Indices are in drawing order."""
    n = int(len(y))
    k = int(math.floor(share * n + 0.5))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if num_classes < 2:
        raise ValueError(f"label flips need at least 2 classes, got {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))
    idx = rng.choice(n, size=k, replace=False)
    shift = rng.integers(1, num_classes, size=k)  # 1..K-1: never the class it had
    return idx.astype(np.int64), ((np.asarray(y)[idx].astype(np.int64) + shift) % num_classes)


def apply_label_noise(dataset, share: float, split: str, *, seed: int):
    """``dataset`` with round(share n) labels of ``split`` ("train", "test" or "both") replaced
    by other classes (see the module docstring); the draw is recorded in ``split["label_noise"]``
    as {share, split, seed, train/test: {indices (sorted), true, given}}. ``share`` 0: unchanged."""
    if share <= 0:
        return dataset
    record = {"share": float(share), "split": split, "seed": int(seed)}
    labels = {"train": dataset.train_y, "test": dataset.test_y}
    for part, code in SPLITS.items():
        if split not in (part, "both"):
            continue
        y = labels[part].numpy()
        idx, new = draw_label_flips(y, share, num_classes=dataset.num_classes,
                                    entropy=[seed, LABEL_NOISE_DOMAIN, code])
        order = np.argsort(idx)
        idx, new = idx[order], new[order]
        record[part] = {"indices": idx.tolist(), "true": y[idx].tolist(), "given": new.tolist()}
        noisy = y.copy()
        noisy[idx] = new
        labels[part] = torch.from_numpy(noisy).to(labels[part].dtype)
    return dataclasses.replace(dataset, train_y=labels["train"].contiguous(), test_y=labels["test"].contiguous(),
                               split={**dataset.split, "label_noise": record})


def planted_label_noise(dataset_attrs: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (indices (k,), true labels (k,))} planted by ``data.label_noise``, from a store's
    ``attrs["dataset"]`` (empty when the run has none)."""
    rec = (dataset_attrs.get("split") or {}).get("label_noise") or {}
    return {part: (np.asarray(rec[part]["indices"], dtype=np.int64), np.asarray(rec[part]["true"], dtype=np.int64))
            for part in SPLITS if part in rec}
