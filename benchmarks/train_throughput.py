"""Collect-stage throughput on the digits default: models/s for 1 and 2 Ray workers, next to a
single-process loop and the physical floor of this machine.

floor = (training + margin FLOPs of one model) / (measured float32 matmul rate per worker
thread x workers). The ratio measured/floor shows how far we are from the limit.

    python benchmarks/train_throughput.py [--models 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, matmul_rate  # noqa: E402

from datamodels.collect import collect  # noqa: E402
from datamodels.config import load_config  # noqa: E402
from datamodels.data import load_dataset  # noqa: E402
from datamodels.model import build_model, count_flops  # noqa: E402
from datamodels.train import subset_size, train_model  # noqa: E402


def model_flops(cfg, ds) -> float:
    f = count_flops(build_model(cfg.model, ds.train_x.shape[1], ds.num_classes), tuple(ds.train_x.shape[1:]))
    n_sub = subset_size(ds.num_train, cfg.collect.alpha)
    evals = (ds.num_train + ds.num_test) * (2 if cfg.train.tta_flip and ds.flippable else 1)
    return 3 * f * n_sub * cfg.train.epochs + f * evals  # backward ~ 2x forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=48, help="models per measurement")
    ap.add_argument("--config", default=None, help="pipeline YAML (default: digits)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    ds = load_dataset(cfg.data)
    flops = model_flops(cfg, ds)
    rate1 = matmul_rate(threads=1)
    print(header())
    print(f"problem: {cfg.name}, N={ds.num_train}, T={ds.num_test}, alpha={cfg.collect.alpha}, "
          f"epochs={cfg.train.epochs}, widths={cfg.model.widths}")
    print(f"model FLOPs: {flops / 1e9:.2f} GFLOP (train + margins); "
          f"float32 matmul rate, 1 thread: {rate1 / 1e9:.1f} GFLOP/s")

    rows = []
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    accs = [train_model(ds, cfg, i).test_accuracy for i in range(args.models // 2)]
    dt = time.perf_counter() - t0
    rows.append(("loop, 1 process", 1, len(accs) / dt, sum(accs) / len(accs)))

    for workers in (1, 2):
        c = load_config(args.config, [f"collect.models={args.models}", f"resources.workers={workers}"])
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            s = collect(c, Path(d) / "run", progress=False)
            dt = time.perf_counter() - t0
        rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", workers, args.models / dt,
                     s["mean_test_accuracy"]))

    print()
    print(f"{'setup':<18}{'models/s':>10}{'floor models/s':>16}{'of floor':>10}{'mean acc':>10}")
    for name, w, mps, acc in rows:
        floor = w * rate1 / flops
        print(f"{name:<18}{mps:>10.2f}{floor:>16.1f}{mps / floor:>10.1%}{acc:>10.4f}")
    print("(ray rows include starting the actors and loading the data: end-to-end wall time)")


if __name__ == "__main__":
    main()
