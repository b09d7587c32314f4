"""Every seed domain of the product in one place.

Random quantities derive from (run seed, domain, index...): collect model i from (seed, i), every
other stage from (seed, DOMAIN, ...), so no two stages ever share a mask, a seed or a draw by
accident. A new stage takes the next unused number here; a test checks that all are distinct.
Changing a number changes what existing runs would train (their rows become stale), so numbers
are never reused or moved.
"""

from __future__ import annotations

__all__ = ["DOMAINS"]

EVAL_DOMAIN = 1_000_001  # evaluation masks (seed, this, e) and their repeats (seed, this, e, r)
FULL_DOMAIN = 1_000_002  # full-set reference models (seed, this, f)
VERIFY_DOMAIN = 1_000_003  # verification checks (seed, this, target, mode, method id, k, j)
TRAK_DOMAIN = 1_000_004  # TRAK featurised models (seed, this, m)
CORRUPTION_DOMAIN = 1_000_005  # train.label_corruption (seed, this)
LFE_DOMAIN = 1_000_006  # learn-from-errors experiment models
KD_DOMAIN = 1_000_007  # noisy-kd experiment models
BENCH_DOMAIN = 1_000_008  # label-issues benchmark models (seed, this, f)
LABEL_NOISE_DOMAIN = 1_000_009  # data.label_noise (split seed, this, split)
BASELINE_DOMAIN = 1_000_010  # random-baseline rankings (seed, this, target)
FLIP_DOMAIN = 1_000_011  # random flip labels (seed, this, target)
SAMPLE_DOMAIN = 1_000_012  # targets the main job samples for verification

DOMAINS = {name: value for name, value in globals().items() if name.endswith("_DOMAIN")}
