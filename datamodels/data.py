"""Datasets as uint8 image tensors: sklearn's bundled digits, CIFAR-10 (python pickle batches),
Fashion-MNIST and MNIST (IDX files), the user's own arrays (one .npz), and synthetic CIFAR-shaped
data for throughput measurements.

Every loader returns a :class:`Dataset` with train (N images) and test (T targets) parts, a
fingerprint of the exact arrays, and the split that produced them, so the store can record
what a run was trained on. ``data.train_size`` / ``data.test_size`` take seeded subsets (numpy's
Generator seeded by ``data.split_seed``); the indices chosen are recorded in the split.
Every file is validated as it is read: a bad one is a one-line :class:`DataError` naming the
file (and array), what was expected and what was found.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datamodels.config import DataConfig
from datamodels.errors import DataError

__all__ = ["Dataset", "load_dataset", "read_idx", "write_cifar10_batches", "FASHION_MNIST_ROOT"]

log = logging.getLogger(__name__)


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
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # its bytes, not a copy of them
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
    """Per-channel mean and std of x / 255 by a float64 pass over the images (digits, synthetic:
    kept so that their runs reproduce the margins of stores made before :func:`_level_stats`)."""
    xf = x.double() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _level_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (n - 1) of x / 255 for uint8 images (n, C, H, W), from the count
    of each of the 256 grey levels: exact in float64 and without a float copy of the images
    (which would be 8x their size: 376 MB for Fashion-MNIST's training set)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        flat = x[:, c].reshape(-1)
        counts = np.zeros(256, dtype=np.float64)
        for a in range(0, flat.size, 1 << 22):  # bincount makes an int64 copy of what it counts: 32 MB at a time
            counts += np.bincount(flat[a : a + (1 << 22)], minlength=256)
        n = counts.sum()
        mu = float((counts * levels).sum() / n)
        var = float((counts * (levels - mu) ** 2).sum() / max(n - 1, 1))
        means.append(mu)
        stds.append(max(var ** 0.5, 1e-3))
    return tuple(means), tuple(stds)


def _make(name, train_x, train_y, test_x, test_y, classes, flippable, split, stats=None) -> Dataset:
    mean, std = _stats(train_x) if stats is None else stats
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


def _flippable(cfg: DataConfig, default: bool) -> bool:
    return default if cfg.flippable is None else cfg.flippable


def _subset(total: int, size: int | None, *, seed: int, stream: int, key: str, what: str) -> np.ndarray | None:
    """Sorted indices of a seeded subset of ``size`` of ``total`` examples; None for all of them.

    The subset is the first ``size`` of a permutation drawn by numpy's Generator seeded by
    (data.split_seed, stream) (stream 0: training images, 1: targets), so a smaller subset is
    contained in a larger one of the same seed, and the training subset does not depend on
    data.test_size.
    """
    if size is None or size == total:
        return None
    if size > total:
        raise DataError(f"{key}: expected at most the {total} {what}, got {size} (null: all of them)")
    perm = np.random.default_rng(np.random.SeedSequence([seed, stream])).permutation(total)
    return np.sort(perm[:size])


def _finish(name: str, cfg: DataConfig, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
            test_y: np.ndarray, classes, *, flippable: bool, split: dict) -> Dataset:
    """Take the data.train_size / data.test_size subsets, record them in ``split``, make the
    Dataset. Images uint8 (n, C, H, W) numpy arrays (C-contiguous after this); labels integer."""
    n, t = len(train_y), len(test_y)
    tr = _subset(n, cfg.train_size, seed=cfg.split_seed, stream=0, key="data.train_size",
                 what=f"{name} training images")
    te = _subset(t, cfg.test_size, seed=cfg.split_seed, stream=1, key="data.test_size",
                 what=f"{name} test images")
    if tr is not None:
        log.info("%s: a seeded subset of %d of the %d training images (data.train_size; null: all)", name, len(tr), n)
        train_x, train_y = train_x[tr], train_y[tr]
    if te is not None:
        log.info("%s: a seeded subset of %d of the %d test images (data.test_size; null: all)", name, len(te), t)
        test_x, test_y = test_x[te], test_y[te]
    train_x, test_x = np.ascontiguousarray(train_x), np.ascontiguousarray(test_x)
    split = {**split, "split_seed": cfg.split_seed, "train_total": n, "test_total": t,
             "train_indices": None if tr is None else tr.tolist(),
             "test_indices": None if te is None else te.tolist()}  # None: all, in file order
    return _make(name, torch.from_numpy(train_x), torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
                 torch.from_numpy(test_x), torch.from_numpy(np.asarray(test_y, dtype=np.int64)), classes,
                 flippable=flippable, split=split, stats=_level_stats(train_x))


def _load_digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)  # (1797, 8, 8) float in [0, 16]
    labels = np.asarray(bunch.target, dtype=np.int64)
    total = len(labels)
    if cfg.train_size is None:
        raise DataError(f"data.train_size: digits has no separate test set: expected the number of training "
                        f"images N (the other {total} - N are the targets), got null")
    if cfg.train_size >= total:
        raise DataError(
            f"data.train_size: expected fewer than the {total} digits images, got {cfg.train_size}"
        )
    # 16 * 16 = 256 would overflow uint8: the 17 grey levels map to 0, 16, ..., 255.
    x = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    perm = np.random.default_rng(cfg.split_seed).permutation(total)
    tr, te = np.sort(perm[: cfg.train_size]), np.sort(perm[cfg.train_size :])
    sub = _subset(len(te), cfg.test_size, seed=cfg.split_seed, stream=1, key="data.test_size",
                  what=f"digits targets left by data.train_size={cfg.train_size}")
    if sub is not None:
        te = te[sub]
    split = {
        "source": "sklearn.datasets.load_digits",
        "split_seed": cfg.split_seed,
        "train_indices": tr.tolist(),
        "test_indices": te.tolist(),
    }
    if sub is not None:  # only then: the split of every earlier digits run stays as it was
        split["test_size"] = cfg.test_size
    return _make(
        "digits",
        torch.from_numpy(x[tr]),
        torch.from_numpy(labels[tr]),
        torch.from_numpy(x[te]),
        torch.from_numpy(labels[te]),
        [str(i) for i in range(10)],
        flippable=_flippable(cfg, False),
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
    return _finish("cifar10", cfg, train_x, train_y, test_x, test_y, classes, flippable=_flippable(cfg, True),
                   split=split)


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
                 [f"class{i}" for i in range(k)], flippable=_flippable(cfg, True), split=split)


# --------------------------------------------------------------------------- IDX: Fashion-MNIST, MNIST

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes; the only type these datasets use
_GZIP_MAGIC = b"\x1f\x8b"


def _idx_expected(base: Path) -> str:
    return f"{base}/" + "{" + ", ".join(IDX_FILES.values()) + "}[.gz]"


def _idx_path(base: Path, name: str) -> Path:
    """``base/name`` or ``base/name.gz``, whichever exists (the plain file first)."""
    for cand in (base / name, base / f"{name}.gz"):
        if cand.is_file():
            return cand
    raise DataError(f"{base}: no {name} or {name}.gz (expected the four IDX files {_idx_expected(base)})")


def read_idx(path: str | Path, *, dims: int) -> np.ndarray:
    """The uint8 array of shape (d1, ..., d_dims) stored in IDX file ``path``, gzipped or not.

    IDX (the MNIST format): two zero bytes, a type byte (0x08: unsigned byte), the number of
    dimensions, then each dimension as a big-endian uint32, then the values in C order. The
    file must hold exactly that many values: a wrong magic number, a header cut short, fewer
    or more values than the header says, or an unreadable gzip stream is a one-line DataError
    naming the file. The values are read straight into the array that is returned.
    """
    path = Path(path)
    kind = "images" if dims == 3 else "labels"
    want = f"0x{_IDX_UBYTE << 8 | dims:08x} (IDX {kind}: unsigned bytes, {dims} dimension{'s' * (dims > 1)})"
    with open(path, "rb") as raw:
        zipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if zipped else raw
        try:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated: {len(head)} bytes, shorter than an IDX header "
                                f"(expected the magic number {want})")
            magic = struct.unpack(">I", head)[0]
            if magic != (_IDX_UBYTE << 8 | dims):
                raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected {want}; not an IDX {kind} "
                                "file, or a file of another kind under this name")
            sizes = f.read(4 * dims)
            if len(sizes) < 4 * dims:
                raise DataError(f"{path}: truncated inside its header ({4 + len(sizes)} of {4 + 4 * dims} bytes)")
            shape = struct.unpack(f">{dims}I", sizes)
            count = int(np.prod(shape, dtype=np.int64))
            if not zipped:
                have = path.stat().st_size - 4 - 4 * dims
                if have != count:
                    raise DataError(_idx_size_error(path, shape, count, have))
            elif count > 1 << 36:  # a garbled header: refuse before allocating
                raise DataError(f"{path}: the header says {' x '.join(map(str, shape))} values, more than any "
                                "IDX file holds; the file is damaged")
            out = np.empty(count, dtype=np.uint8)
            got, view = 0, memoryview(out)
            while got < count:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < count or (zipped and f.read(1)):
                raise DataError(_idx_size_error(path, shape, count, got if got < count else "more than"))
        except (EOFError, OSError, zlib.error) as e:  # a gzip stream cut short or damaged
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: the gzip stream cannot be read ({' '.join(str(e).split()) or type(e).__name__});"
                            " the file is truncated or damaged: copy it again") from None
    return out.reshape(shape)


def _idx_size_error(path: Path, shape, count: int, have) -> str:
    return (f"{path}: truncated or mislabelled: its header says {' x '.join(map(str, shape))} = {count} values, "
            f"the file holds {have} {'of them' if isinstance(have, int) else 'that'}; copy the file again")


def _check_labels(labels: np.ndarray, k: int, where: str) -> None:
    """DataError naming ``where`` unless every label is in [0, K)."""
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: label {int(labels[i])} at index {i} is outside [0, {k}) "
                        f"({len(bad)} such label{'s' * (len(bad) > 1)}); expected class indices 0..{k - 1}")


def _load_idx(cfg: DataConfig, name: str) -> Dataset:
    """Fashion-MNIST or MNIST from its four IDX files in data.root."""
    title, classes = ("Fashion-MNIST", FASHION_MNIST_CLASSES) if name == "fashion-mnist" else (
        "MNIST", tuple(str(i) for i in range(10)))
    if cfg.root is None and name == "mnist":
        raise DataError(f"data.root: expected the directory of MNIST's IDX files "
                        f"({', '.join(IDX_FILES.values())}, each may be .gz), got null")
    base = Path(cfg.root if cfg.root is not None else FASHION_MNIST_ROOT).expanduser()
    if not base.is_dir():
        how = ("install them with `apt-get install dataset-fashion-mnist` (Debian puts them in "
               f"{FASHION_MNIST_ROOT}) or set data.root" if name == "fashion-mnist" else "set data.root")
        raise DataError(f"data.root: {base} is not a directory of {title} IDX files "
                        f"(expected {_idx_expected(base)}): {how}")
    paths = {k: _idx_path(base, v) for k, v in IDX_FILES.items()}
    arrays = {k: read_idx(p, dims=3 if k.endswith("_x") else 1) for k, p in paths.items()}
    for part in ("train", "test"):
        x, y = arrays[f"{part}_x"], arrays[f"{part}_y"]
        if len(y) != len(x):
            raise DataError(f"{paths[part + '_y']}: {len(y)} labels for the {len(x)} images of "
                            f"{paths[part + '_x'].name}: expected one label per image")
        _check_labels(y, len(classes), str(paths[part + "_y"]))
    if len(arrays["train_y"]) < 2 or len(arrays["test_y"]) < 1:
        raise DataError(f"{paths['train_x'].parent}: {len(arrays['train_y'])} training and {len(arrays['test_y'])} "
                        "test images: expected at least 2 and 1")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"{paths['test_x']}: images of {'x'.join(map(str, arrays['test_x'].shape[1:]))}, the "
                        f"training images are {'x'.join(map(str, arrays['train_x'].shape[1:]))}: expected one size")
    split = {"source": str(base), "files": {k: p.name for k, p in paths.items()}}
    # Fashion-MNIST: a mirrored garment, bag or shoe is the same class (the shoes mostly face
    # one way in the files, so a flip makes new images, but never a wrong label). MNIST: a
    # mirrored digit is no digit, or another one.
    return _finish(name, cfg, arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None],
                   arrays["test_y"], classes, flippable=_flippable(cfg, name == "fashion-mnist"), split=split)


# --------------------------------------------------------------------------- npz: the user's own arrays

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL = ("classes",)
_MIN_SIDE = 8  # ResNet-9 halves height and width three times (8 -> 4 -> 2 -> 1)


def _npz_layout(x: np.ndarray, layout: str, where: str) -> str:
    """"nhw", "nchw" or "nhwc" of the images ``x``; DataError naming ``where`` when it cannot be told."""
    if x.ndim == 3:
        return "nhw"
    if x.ndim != 4:
        raise DataError(f"{where}: expected images (N, H, W) grey, (N, C, H, W) or (N, H, W, C), got shape "
                        f"{tuple(x.shape)}")
    if layout != "auto":
        return layout
    first, last = x.shape[1] <= 4, x.shape[3] <= 4
    if first != last:
        return "nchw" if first else "nhwc"
    raise DataError(f"{where}: cannot tell the channel axis of shape {tuple(x.shape)} (expected channels, at most "
                    "4, on axis 1 or 3): set data.layout to nchw or nhwc")


def _npz_images(x: np.ndarray, layout: str, where: str) -> np.ndarray:
    """Images validated and viewed as (n, C, H, W) (a transpose for NHWC, copied later)."""
    if x.dtype != np.uint8:
        hint = (": for floats in [0, 1] save (x * 255).round().astype(np.uint8)" if x.dtype.kind == "f" else
                ": save x.astype(np.uint8) if the values are 0..255")
        raise DataError(f"{where}: expected uint8 images (0..255), got dtype {x.dtype}{hint}")
    kind = _npz_layout(x, layout, where)
    x = x[:, None] if kind == "nhw" else x.transpose(0, 3, 1, 2) if kind == "nhwc" else x
    n, c, h, w = x.shape
    if n < 1 or c < 1:
        raise DataError(f"{where}: no images (shape {tuple(x.shape)} as N, C, H, W)")
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise DataError(f"{where}: images of {h}x{w} ({kind.upper()}, shape {tuple(x.shape)} as N, C, H, W): "
                        f"expected at least {_MIN_SIDE}x{_MIN_SIDE} (ResNet-9 halves them three times)"
                        + ("; or set data.layout" if kind != "nhw" else ""))
    return x


def _npz_labels(y: np.ndarray, n: int, xname: str, where: str) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: expected integer class indices of shape ({n},), got dtype {y.dtype} shape "
                        f"{tuple(y.shape)}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for the {n} images of {xname}: expected one label per image")
    return y


def _load_npz(cfg: DataConfig) -> Dataset:
    """The user's own arrays: one .npz (np.savez) at data.root holding x_train, y_train, x_test,
    y_test and optionally classes (K names)."""
    expect = ("an .npz holding x_train, y_train, x_test, y_test (uint8 images (N, H, W), (N, C, H, W) or "
              "(N, H, W, C); integer labels) and optionally classes")
    if cfg.root is None:
        raise DataError(f"data.root: expected the path of {expect}, got null")
    path = Path(cfg.root).expanduser()
    if not path.is_file():
        raise DataError(f"data.root: {path} {'is a directory' if path.is_dir() else 'does not exist'}; "
                        f"expected the path of {expect}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, not .npy, cut short
        raise DataError(f"{path}: not an .npz file ({' '.join(str(e).split()) or type(e).__name__}); expected "
                        f"{expect}, as np.savez writes it") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds one array (.npy), expected {expect}")
    with z:
        names = set(z.files)
        missing = [k for k in NPZ_ARRAYS if k not in names]
        extra = sorted(names - set(NPZ_ARRAYS) - set(NPZ_OPTIONAL))
        if missing or extra:
            what = (f"no array {', '.join(repr(k) for k in missing)}" if missing else
                    f"unexpected array {', '.join(repr(k) for k in extra)}")
            raise DataError(f"{path}: {what} (found: {', '.join(sorted(names)) or 'none'}); expected the arrays "
                            f"{', '.join(NPZ_ARRAYS)} and optionally {', '.join(NPZ_OPTIONAL)}")
        arrays = {}
        for k in sorted(names):
            try:
                arrays[k] = z[k]
            except ValueError as e:  # an object array: reading it would unpickle
                raise DataError(f"{path}: array '{k}' holds Python objects, which are not read (they would run "
                                f"code); save it as a plain array{', e.g. np.array(names, dtype=str)' * (k == 'classes')}"
                                f" ({' '.join(str(e).split())})") from None
            except Exception as e:  # a damaged member
                raise DataError(f"{path}: array '{k}' cannot be read ({' '.join(str(e).split()) or type(e).__name__});"
                                " the file is truncated or damaged") from None
    train_x = _npz_images(arrays["x_train"], cfg.layout, f"{path}: x_train")
    test_x = _npz_images(arrays["x_test"], cfg.layout, f"{path}: x_test")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(f"{path}: x_test: images of shape {tuple(test_x.shape[1:])} (C, H, W), x_train's are "
                        f"{tuple(train_x.shape[1:])}: expected one shape")
    train_y = _npz_labels(arrays["y_train"], len(train_x), "x_train", f"{path}: y_train")
    test_y = _npz_labels(arrays["y_test"], len(test_x), "x_test", f"{path}: y_test")
    if len(train_y) < 2:
        raise DataError(f"{path}: x_train: expected at least 2 training images, got {len(train_y)}")
    if "classes" in arrays:
        names_ = arrays["classes"]
        if names_.ndim != 1 or names_.dtype.kind not in "US" or len(names_) < 2:
            raise DataError(f"{path}: classes: expected the K >= 2 class names as a 1-D string array, got dtype "
                            f"{names_.dtype} shape {tuple(names_.shape)}")
        classes = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in names_.tolist())
    else:
        top = max(int(train_y.max()), int(test_y.max()) if len(test_y) else 0)
        classes = tuple(str(i) for i in range(max(top + 1, 2)))
    _check_labels(train_y, len(classes), f"{path}: y_train")
    _check_labels(test_y, len(classes), f"{path}: y_test")
    split = {"source": str(path), "layout": _npz_layout(arrays["x_train"], cfg.layout, "x_train")}
    return _finish("npz", cfg, train_x, train_y, test_x, test_y, classes, flippable=_flippable(cfg, False),
                   split=split)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset a config names, with ``data.label_noise`` applied to its given labels
    (datamodels.label_noise). Raises DataError when it cannot be found or read."""
    if cfg.dataset == "synthetic" and cfg.test_size is not None:
        raise DataError("data.test_size: synthetic data draws data.synthetic_test targets: set that instead, "
                        f"got test_size {cfg.test_size}")
    loaders = {"digits": _load_digits, "cifar10": _load_cifar10, "synthetic": _load_synthetic,
               "fashion-mnist": lambda c: _load_idx(c, "fashion-mnist"), "mnist": lambda c: _load_idx(c, "mnist"),
               "npz": _load_npz}
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
