"""Datasets as uint8 image tensors: sklearn's bundled digits, CIFAR-10 (python pickle batches),
and synthetic CIFAR-shaped data for throughput measurements.

Every loader returns a :class:`Dataset` with train (N images) and test (T targets) parts, a
fingerprint of the exact arrays, and the split that produced them, so the store can record
what a run was trained on.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datamodels.config import DataConfig
from datamodels.errors import DataError

__all__ = ["Dataset", "load_dataset", "write_cifar10_batches"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images are uint8 (N, C, H, W) / (T, C, H, W); labels int64 in [0, K)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per-channel mean of train_x / 255
    std: tuple[float, ...]
    flippable: bool  # whether width flips preserve the label semantics
    split: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """sha256 over the four arrays: identical data gives an identical string."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            a = t.numpy()
            h.update(str(a.shape).encode() + str(a.dtype).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "image_shape": list(self.train_x.shape[1:]),
            "classes": list(self.classes),
            "fingerprint": self.fingerprint(),
            "split": self.split,
        }


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.double() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _make(name, train_x, train_y, test_x, test_y, classes, flippable, split) -> Dataset:
    mean, std = _stats(train_x)
    return Dataset(
        name=name,
        train_x=train_x.contiguous(),
        train_y=train_y.long().contiguous(),
        test_x=test_x.contiguous(),
        test_y=test_y.long().contiguous(),
        classes=tuple(classes),
        mean=mean,
        std=std,
        flippable=flippable,
        split=split,
    )


def _load_digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)  # (1797, 8, 8) float in [0, 16]
    labels = np.asarray(bunch.target, dtype=np.int64)
    total = len(labels)
    if cfg.train_size >= total:
        raise DataError(
            f"data.train_size: expected fewer than the {total} digits images, got {cfg.train_size}"
        )
    # 16 * 16 = 256 would overflow uint8: the 17 grey levels map to 0, 16, ..., 255.
    x = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    perm = np.random.default_rng(cfg.split_seed).permutation(total)
    tr, te = np.sort(perm[: cfg.train_size]), np.sort(perm[cfg.train_size :])
    split = {
        "source": "sklearn.datasets.load_digits",
        "split_seed": cfg.split_seed,
        "train_indices": tr.tolist(),
        "test_indices": te.tolist(),
    }
    return _make(
        "digits",
        torch.from_numpy(x[tr]),
        torch.from_numpy(labels[tr]),
        torch.from_numpy(x[te]),
        torch.from_numpy(labels[te]),
        [str(i) for i in range(10)],
        flippable=False,
        split=split,
    )


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _cifar_dir(root: str | None) -> Path:
    if root is None:
        raise DataError(
            "data.root: expected the directory of CIFAR-10's python batches "
            "(data_batch_1..5, test_batch), got null"
        )
    base = Path(root).expanduser()
    for cand in (base, base / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file():
            return cand
    raise DataError(
        f"data.root: no CIFAR-10 python batches in {base} "
        f"(expected {base}/data_batch_1..5 and test_batch, or a cifar-10-batches-py/ inside it)"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch missing: {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # corrupt, truncated or foreign pickle
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    return data, labels


def _load_cifar10(cfg: DataConfig) -> Dataset:
    root = _cifar_dir(cfg.root)
    parts = [_read_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_batch(root / "test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            m = pickle.load(f, encoding="bytes")
        classes = tuple(n.decode() if isinstance(n, bytes) else n for n in m[b"label_names"])
    split = {"source": str(root), "train": "data_batch_1..5", "test": "test_batch"}
    return _make(
        "cifar10",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        classes,
        flippable=True,
        split=split,
    )


def _load_synthetic(cfg: DataConfig) -> Dataset:
    """CIFAR-shaped (3, 32, 32) images: a class-dependent smooth pattern plus noise.

    Learnable, so training behaves like real training, but for throughput only: accuracy on it
    means nothing about CIFAR-10.
    """
    g = torch.Generator().manual_seed(cfg.split_seed)
    n, t, k = cfg.synthetic_train, cfg.synthetic_test, 10
    protos = torch.nn.functional.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def draw(m):
        y = torch.randint(0, k, (m,), generator=g)
        x = 0.6 * protos[y] + 0.4 * torch.rand(m, 3, 32, 32, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    train_x, train_y = draw(n)
    test_x, test_y = draw(t)
    split = {"source": "synthetic", "split_seed": cfg.split_seed}
    return _make("synthetic", train_x, train_y, test_x, test_y,
                 [f"class{i}" for i in range(k)], flippable=True, split=split)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset a config names, with ``data.label_noise`` applied to its given labels
    (datamodels.label_noise). Raises DataError when it cannot be found or read."""
    loaders = {"digits": _load_digits, "cifar10": _load_cifar10, "synthetic": _load_synthetic}
    dataset = loaders[cfg.dataset](cfg)
    from datamodels.label_noise import apply_label_noise  # data.label_noise: the given labels themselves

    return apply_label_noise(dataset, cfg.label_noise, cfg.label_noise_split, seed=cfg.split_seed)


def write_cifar10_batches(directory: str | Path, train_x, train_y, test_x, test_y,
                          classes=CIFAR10_CLASSES) -> Path:
    """Write arrays in CIFAR-10's python-pickle format (five train batches and test_batch).

    Used by tests to make a miniature CIFAR-10 in exactly the published format.
    train_x/test_x: uint8 (n, 3, 32, 32); labels int.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_y)), 5)
    for i, idx in enumerate(chunks, start=1):
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in np.asarray(train_y)[idx]],
            b"data": np.asarray(train_x)[idx].reshape(len(idx), -1).astype(np.uint8),
            b"filenames": [f"img_{j}.png".encode() for j in idx],
        }
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in np.asarray(test_y)],
        b"data": np.asarray(test_x).reshape(len(test_y), -1).astype(np.uint8),
        b"filenames": [f"test_{j}.png".encode() for j in range(len(test_y))],
    }
    with open(d / "test_batch", "wb") as f:
        pickle.dump(test, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f)
    return d
