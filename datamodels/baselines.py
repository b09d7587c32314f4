"""Rankings of training examples for a target: the datamodel's, and the baselines' it is
compared with (Ilyas et al., 2022, section 4).

- "datamodel": by datamodel weight, most supportive first.
- "representation": nearest to the target in the penultimate features of the full-set models.
- "pixel": nearest to the target in raw pixels.
- "random": a seeded permutation.

Baselines rank only examples labelled like the target: their removal is what can lower the
target's margin (removing a near neighbour of another class would raise it).
"""

from __future__ import annotations

import numpy as np
import torch

from datamodels.domains import BASELINE_DOMAIN
from datamodels.errors import ConfigError

__all__ = ["METHODS", "BASELINE_DOMAIN", "rank_examples", "baseline_ranking", "pixels"]

METHODS = ("datamodel", "representation", "pixel", "random")


def rank_examples(weight_t: np.ndarray) -> np.ndarray:
    """Training indices (N,) by datamodel weight, most supportive (largest) first.

    Ties keep index order (a stable sort), so the ranked set of size k is reproducible.
    """
    return np.argsort(-np.asarray(weight_t, dtype=np.float64), kind="stable")


def pixels(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) uint8 as (B, C*H*W) float32 in [0, 1]."""
    return x.reshape(x.shape[0], -1).numpy().astype(np.float32) / 255.0


def baseline_ranking(method: str, target: int, *, train_y: np.ndarray, target_label: int, seed: int,
                     train_repr: np.ndarray | None = None, target_repr: np.ndarray | None = None) -> np.ndarray:
    """Training indices of the target's class, ordered by a baseline heuristic.

    "representation"/"pixel": Euclidean distance of ``train_repr`` (N, D) to ``target_repr``
    (D,) -- penultimate features of the full-set models, or raw pixels -- closest first.
    "random": a permutation seeded by (run seed, BASELINE_DOMAIN, target).
    """
    same = np.flatnonzero(np.asarray(train_y) == target_label)
    if method == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, BASELINE_DOMAIN, int(target)]))
        return same[rng.permutation(len(same))]
    if method in ("representation", "pixel"):
        d = np.linalg.norm(np.asarray(train_repr[same], dtype=np.float64)
                           - np.asarray(target_repr, dtype=np.float64)[None], axis=1)
        return same[np.argsort(d, kind="stable")]
    raise ConfigError(f"method: expected one of {list(METHODS[1:])} for a baseline, got {method!r}")
