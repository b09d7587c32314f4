"""Is one writer enough? The driver's write rate for CIFAR-sized model rows, to local disk and to
an S3 API server on 127.0.0.1, next to the rate a GPU cluster would need.

A row is what the collect stage writes per model: mask (N,) bool, test margins (T,) and train
margins (N,) float32, seconds, complete. Rows are written through the product's own writer
(ModelTable.write) in units of one chunk (B rows), as the runner does. Margins are random normal
floats (nearly incompressible: the slow case); masks are random alpha = 0.5 subsets.

needed = GPUs x models per GPU-hour / 3600, for the stated per-GPU rates (no GPU rate of this
recipe has been measured yet: 3,000/GPU-hour is the goal of the GPU throughput work).

    python benchmarks/writer_rate.py [--n 50000 --t 10000 --block 8 --blocks 12 --gpus 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.specs import ModelSpec, Subset  # noqa: E402
from datamodels.storage import Location  # noqa: E402
from datamodels.table import ModelTable  # noqa: E402


def rows(n: int, t: int, count: int, rng) -> list[dict]:
    out = []
    for _ in range(count):
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, n // 2, replace=False)] = True
        out.append({"mask": mask, "test_margins": rng.normal(size=t).astype(np.float32),
                    "train_margins": rng.normal(size=n).astype(np.float32), "seconds": 1.0})
    return out


def measure(where: str, n: int, t: int, block: int, blocks: int) -> tuple[float, float]:
    """(models/s, MB/s of raw row data) writing ``blocks`` units of ``block`` rows at ``where``."""
    import zarr

    group = zarr.open_group(store=Location(where).zarr_store(), mode="w")
    table = ModelTable.require(group, "models", key_names=["i"], outputs=["test_margins", "train_margins"],
                               dims={"N": n, "T": t, "K": 10, "D": 8}, rows_per_chunk=block)
    specs = [ModelSpec(key=(i,), seed=i, subset=Subset.random((0, i), 0.5),
                       outputs=("test_margins", "train_margins")) for i in range(block * blocks)]
    todo = table.plan(specs)
    rng = np.random.default_rng(0)
    data = rows(n, t, block, rng)  # the same rows for every unit: generation is not timed
    t0 = time.perf_counter()
    for unit in table.chunks_of(todo):
        table.write(unit, data, [specs[r] for r in unit])
    dt = time.perf_counter() - t0
    raw = block * blocks * (n + 4 * t + 4 * n) / 1e6
    return block * blocks / dt, raw / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="training examples N")
    ap.add_argument("--t", type=int, default=10_000, help="targets T")
    ap.add_argument("--block", type=int, default=8, help="rows per unit of work = row chunk B")
    ap.add_argument("--blocks", type=int, default=12, help="units written per destination")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--per-gpu-hour", default="3000,10000", help="models per GPU-hour to compare with")
    args = ap.parse_args()
    print(header())
    print(f"rows: N={args.n}, T={args.t} ({(args.n * 5 + args.t * 4) / 1e6:.2f} MB raw per model), "
          f"{args.blocks} units of B={args.block} rows per destination")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name, where in (("local disk", f"{d}/run"), ("S3 API (moto, 127.0.0.1)", "s3://bench/run")):
            results.append((name, *measure(where, args.n, args.t, args.block, args.blocks)))
    server.stop()

    rates = [int(r) for r in args.per_gpu_hour.split(",")]
    need = {r: args.gpus * r / 3600 for r in rates}
    print()
    print(f"{'destination':<28}{'models/s':>10}{'MB/s':>8}" + "".join(
        f"{f'x need@{r}':>14}" for r in rates))
    for name, mps, mbs in results:
        print(f"{name:<28}{mps:>10.1f}{mbs:>8.1f}" + "".join(f"{mps / need[r]:>14.1f}" for r in rates))
    print("needed by " + ", ".join(f"{args.gpus} GPUs at {r:,} models/GPU-hour: {need[r]:.1f} models/s"
                                  for r in rates))
    print("(x need: measured rate / needed rate; above 1 means one driver keeps up)")


if __name__ == "__main__":
    main()
