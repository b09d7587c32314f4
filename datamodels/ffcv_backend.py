"""FFCV batch source (``train.loader: ffcv``; extra ``datamodels[ffcv]``).

The default batch source (:class:`datamodels.train.MemoryBatches`) keeps the whole training set
on the device as uint8 and is the fastest choice whenever it fits there (CIFAR-10: 150 MB).
FFCV earns its keep when it does not: data larger than device memory, JPEG datasets decoded on
CPU threads, data streamed from page cache. See ``docs/throughput.md``.

Two functions:

- :func:`write_beton` writes the TRAINING set (N images, raw uint8 -- not JPEG, so pixels are
  exact -- their labels, and each example's index) to a ``.beton`` file, plus a small JSON
  sidecar holding a digest of the images so that a stale file is refused, not silently used.
- :func:`ffcv_batches` returns a batch source with the interface of ``MemoryBatches``:
  ``len()`` batches per epoch and ``epoch(gen)`` yielding (uint8 (B, C, H, W), int64 (B,)) on
  the device.

Identical results whichever backend loads the data: the epoch order is drawn from the model's
generator ``gen`` exactly as ``MemoryBatches`` draws it (one ``randperm`` of the subset on the
device), and FFCV is handed that order through a custom traversal order. The loader yields each
example's index, and labels are taken by index from the ``labels`` tensor the caller passes
(label-flip experiments pass labels that differ from the dataset's; the beton's label field is
never read). So the same images, the same labels, in the same order, meet the same augmentation
draws: on CPU the margins match ``MemoryBatches`` bit for bit.

One FFCV ``Loader`` is built per process (key: beton path and its size/mtime, batch size,
device, worker threads, calling thread) and reused for every model, because each new Loader
JIT-compiles its pipeline on its first epoch (6-10 s for JPEG pipelines). FFCV's ``indices=``
argument is fixed when a Loader is built, so instead of one Loader per mask, the traversal order
we hand it contains exactly the model's masked examples: the same restriction, without a
recompile per model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from datamodels.errors import ConfigError, DataError
from datamodels.train import SubsetBatches

__all__ = ["INSTALL_COMMAND", "write_beton", "ffcv_batches", "FFCVBatches", "clear_loader_cache"]

log = logging.getLogger(__name__)

INSTALL_COMMAND = (
    'apt-get install -y libturbojpeg0-dev libopencv-dev pkg-config && pip install "datamodels[ffcv]"'
)
_FORMAT = "datamodels-beton/1"
_FIELDS = ("image", "label", "index")


def _ffcv():
    """Import FFCV (or fail with the install command). FFCV's import sets torch's thread count
    to 1 as a side effect; undo that so a worker keeps its ``train.threads``."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        from ffcv.fields import IntField, NDArrayField
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.loader import Loader
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ImportError(
            f"train.loader=ffcv needs FFCV, which cannot be imported here ({e}). "
            f"Install it with: {INSTALL_COMMAND}"
        ) from e
    finally:
        torch.set_num_threads(threads)
    return {
        "IntField": IntField, "NDArrayField": NDArrayField, "IntDecoder": IntDecoder,
        "NDArrayDecoder": NDArrayDecoder, "Loader": Loader, "Reader": Reader, "Squeeze": Squeeze,
        "ToDevice": ToDevice, "ToTensor": ToTensor, "TraversalOrder": TraversalOrder,
        "DatasetWriter": DatasetWriter,
    }


# --------------------------------------------------------------------------- writing

_digests: dict[int, str] = {}  # id(train_x) -> sha256 of its bytes, dropped when the tensor dies


def _images_digest(x: torch.Tensor) -> str:
    """sha256 of the uint8 image bytes, shape and dtype (cached per tensor object)."""
    key = id(x)
    if key not in _digests:
        a = np.ascontiguousarray(x.numpy())
        h = hashlib.sha256(f"{a.shape} {a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
        _digests[key] = h.hexdigest()
        weakref.finalize(x, _digests.pop, key, None)
    return _digests[key]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class _Rows:
    """What FFCV's writer indexes: row i -> (image (C, H, W) uint8, label, i)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), int(i)


def write_beton(dataset, path: str | Path, *, num_workers: int = 1) -> Path:
    """Write ``dataset``'s training set (N examples) to the FFCV file ``path``.

    Fields: ``image`` uint8 (C, H, W), stored raw (exact pixels); ``label`` the dataset's label;
    ``index`` the example's row in ``dataset.train_x``. A sidecar ``<path>.json`` records N,
    the image shape and a sha256 of the images. The file appears atomically (written to a
    temporary name, then renamed), so concurrent workers never read a half-written file.
    """
    f = _ffcv()
    x = dataset.train_x
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise DataError(f"write_beton: expected uint8 (N, C, H, W) training images, got "
                        f"{x.dtype} {tuple(x.shape)}")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    xs = np.ascontiguousarray(x.numpy())
    ys = dataset.train_y.numpy().astype(np.int64)
    fields = {
        "image": f["NDArrayField"](np.dtype("uint8"), tuple(xs.shape[1:])),
        "label": f["IntField"](),
        "index": f["IntField"](),
    }
    try:
        writer = f["DatasetWriter"](str(tmp), fields, num_workers=max(1, num_workers))
        with contextlib.redirect_stderr(io.StringIO()):  # FFCV draws a progress bar
            writer.from_indexed_dataset(_Rows(xs, ys))
        meta = {
            "format": _FORMAT,
            "dataset": dataset.name,
            "num_train": int(xs.shape[0]),
            "image_shape": list(xs.shape[1:]),
            "images_sha256": _images_digest(x),
            "fields": list(_FIELDS),
        }
        side_tmp = tmp.with_name(tmp.name + ".json")
        side_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(side_tmp, _sidecar(path))
        os.replace(tmp, path)
    finally:
        for p in (tmp, tmp.with_name(tmp.name + ".json")):
            if p.exists():
                p.unlink()
    log.info("wrote %s: %d training images %s", path, xs.shape[0], tuple(xs.shape[1:]))
    return path


def _check_beton(dataset, path: Path) -> None:
    """Refuse a beton that does not hold exactly ``dataset``'s training images."""
    side = _sidecar(path)
    if not side.is_file():
        raise DataError(
            f"data.beton: {path} has no sidecar {side.name}, so it was not written by "
            f"datamodels.ffcv_backend.write_beton and its contents cannot be checked; "
            f"delete it (or point data.beton elsewhere) and it will be rewritten"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"data.beton: cannot read {side}: {e}") from None
    expected = {
        "format": _FORMAT,
        "num_train": dataset.num_train,
        "image_shape": list(dataset.train_x.shape[1:]),
        "images_sha256": _images_digest(dataset.train_x),
    }
    diff = {k: (v, meta.get(k)) for k, v in expected.items() if meta.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in diff.items())
        raise DataError(
            f"data.beton: {path} was written from other training images than this run's "
            f"dataset ({what}); delete it (or point data.beton elsewhere) and it will be rewritten"
        )


# --------------------------------------------------------------------------- loading

_loaders: dict[tuple, tuple] = {}
_loaders_lock = threading.Lock()
_checked: dict[tuple, bool] = {}  # betons already checked against a dataset's images


def clear_loader_cache() -> None:
    """Forget the cached Loaders (tests; after rewriting a beton in place)."""
    with _loaders_lock:
        _loaders.clear()
        _checked.clear()


def _given_order_class(f):
    class GivenOrder(f["TraversalOrder"]):
        """A traversal order we set before each epoch (FFCV calls ``order(loader)``)."""

        def __init__(self):
            self.order = None

        def __call__(self, loader):
            self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
            self.distributed, self.sampler = False, None
            if self.order is None:  # the first order fixes len(loader): all N examples
                self.order = np.asarray(loader.indices, dtype=np.int64)
            return self

        def sample_order(self, epoch: int):
            return self.order

    return GivenOrder


def _loader(path: Path, batch_size: int, device: torch.device):
    """The process's cached (Loader, GivenOrder) for this beton, batch size and device."""
    f = _ffcv()
    stat = path.stat()
    threads = torch.get_num_threads()
    try:  # FFCV sets numba's (<= its thread pool) and torch's thread counts to num_workers
        import numba

        workers = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        workers = 1
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, batch_size, str(device), workers,
           threading.get_ident())
    with _loaders_lock:
        if key not in _loaders:
            order = _given_order_class(f)()
            image = [f["NDArrayDecoder"](), f["ToTensor"]()]
            index = [f["IntDecoder"](), f["ToTensor"]()]
            if device.type != "cpu":
                image.append(f["ToDevice"](device, non_blocking=True))
                index.append(f["ToDevice"](device, non_blocking=True))
            index.append(f["Squeeze"]())
            loader = f["Loader"](
                str(path), batch_size=batch_size, num_workers=workers, order=order,
                drop_last=False, seed=0,  # seed unused (our order); 0 keeps numpy's global RNG untouched
                pipelines={"image": image, "label": None, "index": index},
            )
            torch.set_num_threads(threads)
            _loaders[key] = (loader, order)
            log.info("built an FFCV Loader for %s (batch %d, %s)", path, batch_size, device)
        return _loaders[key]


class FFCVBatches(SubsetBatches):
    """Batches of one model's subset from a cached FFCV Loader, in ``MemoryBatches``' order.

    Yielded images are FFCV's reusable buffers: valid until the next batch is requested.
    """

    def __init__(self, loader, order, idx: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device):
        super().__init__(idx, batch_size)
        self.loader, self.order_holder = loader, order
        self.labels, self.device = labels, device

    def epoch(self, gen: torch.Generator):
        n = self.idx.numel()
        # The same draw as MemoryBatches.epoch, so the generator stays in step with it.
        order = self.epoch_order(gen).cpu().numpy().astype(np.int64)  # one host sync per epoch
        if n % self.batch_size == 1:
            order = order[:-1]  # a last batch of one example is dropped (batch norm needs two)
        self.order_holder.order = order
        threads = torch.get_num_threads()
        try:
            for images, index in self.loader:
                yield images, self.labels[index]
        finally:
            torch.set_num_threads(threads)


def ffcv_batches(dataset, train_idx: torch.Tensor, cfg, labels: torch.Tensor,
                 device: torch.device) -> FFCVBatches:
    """Batch source over ``cfg.data.beton`` for the examples ``train_idx`` (indices into N).

    Writes the beton first when it is missing; refuses one written from other images.
    ``labels`` (N,) are the training labels to use (taken by example index). Raises ImportError
    with the install command when FFCV is not installed.
    """
    _ffcv()
    if cfg.data.beton is None:
        raise ConfigError("data.beton: expected the path of a .beton file (written if missing) "
                          "when train.loader is 'ffcv', got null")
    path = Path(cfg.data.beton).expanduser()
    if not path.is_file():
        with _loaders_lock:
            if not path.is_file():
                write_beton(dataset, path)
    stat = path.stat()
    check_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, _images_digest(dataset.train_x))
    if check_key not in _checked:
        _check_beton(dataset, path)
        _checked[check_key] = True
    if labels.shape != (dataset.num_train,):
        raise ValueError(f"labels: expected shape ({dataset.num_train},), got {tuple(labels.shape)}")
    loader, order = _loader(path, cfg.train.batch_size, device)
    return FFCVBatches(loader, order, train_idx.to(device), labels.to(device=device, dtype=torch.long),
                       cfg.train.batch_size, device)
