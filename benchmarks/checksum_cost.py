"""What do checksums cost? Read and write rates of a CIFAR-sized collect table (masks (M, N)
bool, test margins (M, T) float32) stored three ways, side by side in one run:

- ``plain``:   zstd only, opened with Zarr's own LocalStore (the store before checksums);
- ``crc``:     zstd + Zarr's crc32c codec, LocalStore (the codec verifies on decode);
- ``checked``: zstd + crc32c through the product's CheckedStore (what every stage reads
  through: the chunk's checksum is verified once more to name the array, chunk and rows).

Reads are whole chunk-rows (what fit and check do); writes are one chunk per call.

    python benchmarks/checksum_cost.py [--n 50000 --t 10000 --models 512 --block 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from datamodels.integrity import CheckedStore, checksum_codecs  # noqa: E402


def make(root: Path, kind: str, m: int, n: int, t: int, b: int):
    raw = zarr.storage.LocalStore(str(root / kind))
    store = CheckedStore(raw, str(root / kind)) if kind == "checked" else raw
    g = zarr.open_group(store=store, mode="w")
    comp = {"compressors": checksum_codecs()} if kind != "plain" else {}
    masks = g.create_array("masks", shape=(m, n), chunks=(b, n), dtype="bool", **comp)
    margins = g.create_array("test_margins", shape=(m, t), chunks=(b, t), dtype="float32", **comp)
    return masks, margins


def run(kind: str, root: Path, m: int, n: int, t: int, b: int, rng) -> tuple[float, float, int]:
    masks, margins = make(root, kind, m, n, t, b)
    mask_block = rng.random((b, n)) < 0.5
    margin_block = rng.normal(size=(b, t)).astype(np.float32)
    t0 = time.perf_counter()
    for r in range(0, m, b):
        masks[r: r + b] = mask_block
        margins[r: r + b] = margin_block
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = 0
    for r in range(0, m, b):
        total += masks[r: r + b].nbytes + margins[r: r + b].nbytes
    read_s = time.perf_counter() - t0
    return write_s, read_s, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--t", type=int, default=10000)
    ap.add_argument("--models", type=int, default=512)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(header())
    print(f"zarr {zarr.__version__}; table: M={a.models} N={a.n} T={a.t}, chunks of {a.block} rows; "
          f"best of {a.repeats}")
    rng = np.random.default_rng(0)
    best: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(a.repeats):
            for kind in ("plain", "crc", "checked"):
                w, r, total = run(kind, Path(d) / str(rep), a.models, a.n, a.t, a.block, rng)
                old = best.get(kind)
                best[kind] = (min(w, old[0]) if old else w, min(r, old[1]) if old else r, total)
    base_w, base_r, _ = best["plain"]
    print(f"{'store':<8} {'write MB/s':>11} {'read MB/s':>10} {'write x plain':>14} {'read x plain':>13}")
    for kind, (w, r, total) in best.items():
        mb = total / 1e6
        print(f"{kind:<8} {mb / w:>11.0f} {mb / r:>10.0f} {base_w / w:>14.2f} {base_r / r:>13.2f}")


if __name__ == "__main__":
    main()
