"""Test accuracy of candidate training recipes: one model per recipe, trained exactly as model 0
of a run of the pipeline (its alpha-subset of the training set, its seed), scored on every target.

The pipeline's data and subset size are kept (pipelines/fashion-mnist.yaml: a 30,000-image half
of Fashion-MNIST's 60,000 training images, the 10,000 test images); a recipe changes only the
keys it names (widths, epochs, flips, ...). By default everything runs on the CPU in float32
with one torch thread per model (as a collect worker does), whatever device the pipeline names.

    python benchmarks/recipe_accuracy.py [--config pipelines/fashion-mnist.yaml] \
        [--recipes w16-e8,w16-e8-flip,w16-e4] [--set KEY=VALUE ...] [--threads 1]

One model per recipe: differences of about a point are within seed-to-seed noise (not measured
here); read the table as a coarse ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.collect import collect_spec  # noqa: E402
from datamodels.config import load_config  # noqa: E402
from datamodels.data import load_dataset  # noqa: E402
from datamodels.specs import train_spec  # noqa: E402
from datamodels.train import subset_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = ["train.device=cpu", "train.precision=float32"]
RECIPES = {
    # the narrow ResNet-9 that a CPU can train on 30,000 images in minutes
    "w16-e8": ["model.widths=[16, 32, 64, 128]", "train.epochs=8", "train.flip=false", "train.tta_flip=false"],
    # ... with random width flips in training and flip-averaged logits at test time
    "w16-e8-flip": ["model.widths=[16, 32, 64, 128]", "train.epochs=8", "train.flip=true", "train.tta_flip=true"],
    # ... with half the epochs (half the cost of every model)
    "w16-e4": ["model.widths=[16, 32, 64, 128]", "train.epochs=4", "train.flip=false", "train.tta_flip=false"],
    # the small pipeline's width
    "w8-e8": ["model.widths=[8, 16, 32, 64]", "train.epochs=8", "train.flip=false", "train.tta_flip=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "pipelines" / "fashion-mnist.yaml"))
    ap.add_argument("--recipes", default="w16-e8,w16-e8-flip,w16-e4",
                    help=f"comma-separated, from: {', '.join(RECIPES)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key for every recipe (e.g. data.train_size=2000 for a quick look)")
    ap.add_argument("--device", default="cpu", help="cpu (float32) or 'pipeline' (the config's device, precision)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = ap.parse_args()
    names = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        ap.error(f"--recipes: unknown {unknown}; expected names from {list(RECIPES)}")

    torch.set_num_threads(args.threads)
    base = (CPU if args.device == "cpu" else []) + list(args.set)
    cfg0 = load_config(args.config, base)
    t0 = time.perf_counter()
    ds = load_dataset(cfg0.data)
    load_s = time.perf_counter() - t0
    n_sub = subset_size(ds.num_train, cfg0.collect.alpha)
    print(header())
    print(f"torch threads: {torch.get_num_threads()}; load average at start: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared machine: other work slows the timings)")
    print(f"config: {args.config}  (+ {' '.join(base) or 'nothing'})")
    print(f"data: {ds.name}, N={ds.num_train}, T={ds.num_test}, image {tuple(ds.train_x.shape[1:])}, "
          f"loaded in {load_s:.2f} s; each model trains on alpha N = {n_sub} images (model 0's subset)")
    t = cfg0.train
    print(f"shared recipe: batch {t.batch_size}, lr {t.lr} (peak at {t.warmup}), momentum {t.momentum}, "
          f"wd {t.weight_decay}, smoothing {t.label_smoothing}, translate {t.translate}, cutout {t.cutout}, "
          f"{t.precision} on {t.device}")
    print()
    print(f"{'recipe':<14}{'widths':<20}{'epochs':>7}{'flip':>6}{'tta':>6}{'wall s':>8}{'CPU s':>8}{'test acc':>10}")
    for name in names:
        cfg = load_config(args.config, base + RECIPES[name])
        spec = dataclasses.replace(collect_spec(cfg, 0), outputs=("test_margins",))
        cpu0 = time.process_time()
        out = train_spec(ds, cfg, spec)
        cpu = time.process_time() - cpu0  # this process's CPU time: what other work on the machine does not inflate
        acc = float(np.mean(out["test_margins"] > 0))
        flips = ds.flippable
        print(f"{name:<14}{str(list(cfg.model.widths)):<20}{cfg.train.epochs:>7}"
              f"{str(cfg.train.flip and flips).lower():>6}{str(cfg.train.tta_flip and flips).lower():>6}"
              f"{out['seconds']:>8.0f}{cpu:>8.0f}{acc:>10.4f}", flush=True)
    print(f"\n(one model per recipe, model 0 of the run: seed and subset from (seed {cfg0.seed}, 0); wall s: "
          "training and scoring the T targets; CPU s: this process's CPU time for the same; "
          f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())})")


if __name__ == "__main__":
    main()
