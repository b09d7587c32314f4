"""Are float16 logits enough for out-of-sample probabilities? And what do they cost per model?

Trains M collect models of a config (default: the digits default with 5% planted test-label
noise) in this process, keeping each model's float32 logits on every training and test example.
Then, side by side, from the float32 logits and from the same logits rounded to float16 (how the
collect table stores them): out-of-sample probabilities (training examples over the models that
did not train on them, test examples over all), cleanlab's flagged sets and label quality, and
precision/recall against the planted errors. Also the stored bytes per model (zstd + crc32c, the
product's codecs) of float16 and float32 logits, and the raw bytes at N=60,000, T=10,000, K=10.

    python benchmarks/logit_precision.py [--models 60] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=60)
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    args = ap.parse_args()
    import torch
    import zarr
    from scipy.stats import spearmanr

    from datamodels.collect import collect_spec
    from datamodels.config import load_config
    from datamodels.data import load_dataset
    from datamodels.integrity import create_array
    from datamodels.label_issues import find_issues, precision_recall, probability_sums
    from datamodels.label_noise import planted_label_noise
    from datamodels.specs import train_spec

    torch.set_num_threads(1)
    sets = args.set if args.set is not None else ["data.label_noise=0.05", "data.label_noise_split=test"]
    cfg = load_config(None, sets + ["collect.logit_models=1000000"])
    ds = load_dataset(cfg.data)
    print(header())
    print(f"config: digits default with {sets}; M={args.models} models trained here (1 thread)")
    t0 = time.perf_counter()
    test_l, train_l, masks = [], [], []
    for i in range(args.models):
        r = train_spec(ds, cfg, collect_spec(cfg, i))
        test_l.append(r["test_logits"])
        train_l.append(r["train_logits"])
        masks.append(r["mask"])
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    test_l, train_l, masks = np.stack(test_l), np.stack(train_l), np.stack(masks)
    planted = planted_label_noise(ds.describe())
    print(f"logit range: [{min(test_l.min(), train_l.min()):.2f}, {max(test_l.max(), train_l.max()):.2f}]")
    print(f"{'split':<6}{'max |dp|':>10}{'mean |dp|':>11}{'flag32':>8}{'flag16':>8}{'sym.diff':>9}"
          f"{'quality rho':>12}  precision/recall 32 | 16")
    for split, logits, out in (("test", test_l, None), ("train", train_l, ~masks)):
        res = {}
        for dt in (np.float32, np.float16):
            s, c = probability_sums(logits.astype(dt), out)
            ok = c > 0
            p = s[ok] / c[ok][:, None]
            y = (ds.test_y if split == "test" else ds.train_y).numpy()[ok]
            f = find_issues(p, y)
            idx = np.flatnonzero(ok)
            res[dt] = (p, idx[f["flagged"]], f["quality"])
        (p32, f32, q32), (p16, f16, q16) = res[np.float32], res[np.float16]
        d = np.abs(p32 - p16)
        sym = len(set(f32.tolist()) ^ set(f16.tolist()))
        pr = ""
        if split in planted:
            a, b = precision_recall(f32, planted[split][0]), precision_recall(f16, planted[split][0])
            pr = (f"  {a['precision']:.3f}/{a['recall']:.3f} | {b['precision']:.3f}/{b['recall']:.3f}")
        print(f"{split:<6}{d.max():>10.2e}{d.mean():>11.2e}{len(f32):>8}{len(f16):>8}{sym:>9}"
              f"{spearmanr(q32, q16).statistic:>12.6f}{pr}")
    with tempfile.TemporaryDirectory() as tmp:
        g = zarr.open_group(tmp, mode="w")
        n, t, k = train_l.shape[1], test_l.shape[1], train_l.shape[2]
        sizes = {}
        for dt in ("float16", "float32"):
            for name, arr in (("train", train_l), ("test", test_l)):
                a = create_array(g, f"{name}_{dt}", shape=arr.shape, chunks=(8, *arr.shape[1:]), dtype=dt)
                a[:] = arr.astype(dt)
            stored = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file() and dt in str(f)
                         and f.parent.name != "" and "/c/" in str(f))
            sizes[dt] = stored / args.models
    raw16 = (n + t) * k * 2
    print(f"stored bytes per model (zstd + crc32c) at N={n}, T={t}, K={k}: float16 {sizes['float16']:.0f} "
          f"(raw {raw16}), float32 {sizes['float32']:.0f} (raw {2 * raw16}); ratio stored/raw float16 "
          f"{sizes['float16'] / raw16:.2f}")
    big = (60000 + 10000) * 10 * 2
    print(f"raw float16 logits per model at N=60,000, T=10,000, K=10: {big / 1e6:.2f} MB; 100 models "
          f"{100 * big / 1e6:.0f} MB (CIFAR-10, N=50,000: {100 * (60000) * 10 * 2 / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
