"""The run store: one Zarr v3 group per run on the local (or shared) filesystem.

Layout (M models, N training examples, T targets, B = block size = row chunk)::

    RUN/                     attrs: schema_version, config, dataset, provenance, requested
      masks          (M, N) bool      chunks (B, N)
      train_margins  (M, N) float32   chunks (B, N)   out-of-sample where the mask is False
      test_margins   (M, T) float32   chunks (B, T)
      seconds        (M,)   float32   chunks (B,)     training wall time
      complete       (M,)   bool      chunks (B,)     written last: a row counts only then
      train_labels (N,), test_labels (T,) int64
      logs/worker-<host>-<pid>.jsonl   one line per completed model (plain files)

Concurrency rules: work is handed out in blocks of B model indices aligned with the row chunks,
so no two writers ever touch the same chunk (a partial chunk write is a read-modify-write);
no sharding. Within a row, ``complete`` is written after every other array, so a crash
between two writes leaves the row incomplete and it is retrained. Chunk files are written
atomically by Zarr's local store (temporary file + rename). One driver at a time holds
``RUN/.lock``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from datamodels.config import RunConfig, config_from_dict, diff_identity
from datamodels.data import Dataset
from datamodels.errors import StoreError

__all__ = ["RunStore", "SCHEMA_VERSION", "versions"]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
ROW_ARRAYS = ("masks", "train_margins", "test_margins", "seconds")  # written before `complete`


def versions() -> dict[str, str]:
    import numpy
    import torch

    out = {"python": platform.python_version(), "numpy": numpy.__version__,
           "torch": torch.__version__, "zarr": zarr.__version__}
    try:
        from importlib.metadata import version

        out["datamodels"] = version("datamodels")
    except Exception:
        pass
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def _check_writable(path: Path) -> None:
    """Fail early, before anything is written, if ``path`` cannot hold a store."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"cannot create run store at {path}: a file of that name exists")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"cannot create run store at {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create run store at {path}: {parent} is not writable")


class RunStore:
    """A run's Zarr group. Open with :meth:`open` (existing) or :meth:`create` (new/extend)."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "RunStore":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no run store at {path} (expected a directory made by `datamodels train`)")
        group = zarr.open_group(str(path), mode=mode)
        version = group.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema version {version}, this datamodels reads {SCHEMA_VERSION}")
        return cls(path, group)

    @classmethod
    def prepare(cls, path: str | Path, cfg: RunConfig, dataset: Dataset) -> None:
        """Check, without writing, that ``cfg`` may create or extend a store at ``path``.

        Raises StoreError naming the differing keys when an existing store was made with an
        incompatible config or other data.
        """
        path = Path(path)
        _check_writable(path)
        if path.exists() and any(path.iterdir()):
            if not (path / "zarr.json").is_file():
                raise StoreError(f"{path} exists and is not a run store; choose another --out")
            existing = cls.open(path)
            old = existing.config
            diff = diff_identity(old, cfg)
            if diff:
                lines = "; ".join(f"{k}: store has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
                raise StoreError(
                    f"{path} was created with another config ({lines}). "
                    "Use another --out, or the store's own config (`datamodels status RUN --json`)."
                )
            fp = existing.group.attrs["dataset"]["fingerprint"]
            if fp != dataset.fingerprint():
                raise StoreError(
                    f"{path} was trained on other data (dataset fingerprint {fp[:12]}..., "
                    f"now {dataset.fingerprint()[:12]}...)"
                )

    @classmethod
    def create(cls, path: str | Path, cfg: RunConfig, dataset: Dataset) -> "RunStore":
        """Create the store, or open it and extend it to ``cfg.collect.models`` rows.

        Call :meth:`prepare` first (the CLI does): this method assumes the config is compatible.
        """
        cls.prepare(path, cfg, dataset)
        path = Path(path)
        m, n, t, b = cfg.collect.models, dataset.num_train, dataset.num_test, cfg.collect.block_size
        if (path / "zarr.json").is_file():
            store = cls.open(path, mode="r+")
            store._extend(m)
            return store
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({
            "schema_version": SCHEMA_VERSION,
            "config": cfg.to_dict(),
            "dataset": dataset.describe(),
            "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                           "versions": versions()},
            "block_size": b,
            "requested": m,
        })
        group.create_array("masks", shape=(m, n), chunks=(b, n), dtype=bool, fill_value=False)
        group.create_array("train_margins", shape=(m, n), chunks=(b, n), dtype="float32", fill_value=np.nan)
        group.create_array("test_margins", shape=(m, t), chunks=(b, t), dtype="float32", fill_value=np.nan)
        group.create_array("seconds", shape=(m,), chunks=(b,), dtype="float32", fill_value=np.nan)
        group.create_array("complete", shape=(m,), chunks=(b,), dtype=bool, fill_value=False)
        group.create_array("train_labels", data=dataset.train_y.numpy())
        group.create_array("test_labels", data=dataset.test_y.numpy())
        return cls(path, group)

    def _extend(self, m: int) -> None:
        old = self.requested
        if m <= old:
            return
        for name in ROW_ARRAYS + ("complete",):
            arr = self.group[name]
            arr.resize((m,) + arr.shape[1:])
        self.group.attrs["requested"] = m
        cfg = dict(self.group.attrs["config"])
        cfg["collect"] = {**cfg["collect"], "models": m}
        self.group.attrs["config"] = cfg
        log.info("extended %s from %d to %d models", self.path, old, m)

    # ------------------------------------------------------------------ reading
    @property
    def config(self) -> RunConfig:
        return config_from_dict(RunConfig, self.group.attrs["config"], source=f"{self.path} (attrs)")

    @property
    def requested(self) -> int:
        return int(self.group.attrs["requested"])

    @property
    def block_size(self) -> int:
        return int(self.group.attrs["block_size"])

    def complete_mask(self) -> np.ndarray:
        """(M,) bool: rows whose every array has been written."""
        return np.asarray(self.group["complete"][:], dtype=bool)

    def missing(self, upto: int | None = None) -> list[int]:
        done = self.complete_mask()
        upto = len(done) if upto is None else min(upto, len(done))
        return [int(i) for i in np.flatnonzero(~done[:upto])]

    def blocks(self, indices: list[int]) -> list[list[int]]:
        """Group model indices by row chunk, so each work unit owns whole chunks."""
        out: dict[int, list[int]] = {}
        for i in indices:
            out.setdefault(i // self.block_size, []).append(i)
        return [out[k] for k in sorted(out)]

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        arr = self.group[name]
        return np.asarray(arr[:] if rows is None else arr.get_orthogonal_selection((rows,)))

    def status(self) -> dict:
        done = self.complete_mask()
        idx = np.flatnonzero(done)
        acc = None
        if len(idx):
            tm = self.read("test_margins", idx)
            acc = float((tm > 0).mean())
        seconds = self.read("seconds", idx) if len(idx) else np.array([])
        cfg = self.group.attrs["config"]
        ds = self.group.attrs["dataset"]
        return {
            "path": str(self.path),
            "config_name": cfg.get("name"),
            "dataset": ds["name"],
            "num_train": ds["num_train"],
            "num_targets": ds["num_test"],
            "alpha": cfg["collect"]["alpha"],
            "requested": self.requested,
            "completed": int(done.sum()),
            "missing": int((~done).sum()),
            "mean_test_accuracy": acc,
            "mean_train_seconds": float(np.mean(seconds)) if len(seconds) else None,
            "created": self.group.attrs["provenance"]["created"],
        }

    # ------------------------------------------------------------------ writing
    def write_result(self, result, *, after_array: Callable[[str], None] | None = None) -> None:
        """Write one model's row; ``complete`` last. ``after_array(name)`` is a test hook."""
        i = result.index
        values = {
            "masks": result.mask,
            "train_margins": result.train_margins,
            "test_margins": result.test_margins,
            "seconds": np.float32(result.seconds),
        }
        for name in ROW_ARRAYS:
            self.group[name][i] = values[name]
            if after_array is not None:
                after_array(name)
        self.group["complete"][i] = True

    def log_event(self, event: dict) -> None:
        """Append one JSON line to this process's own worker log (no shared file)."""
        d = self.path / "logs"
        d.mkdir(exist_ok=True)
        with open(d / f"worker-{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")

    def read_logs(self) -> list[dict]:
        out = []
        for p in sorted((self.path / "logs").glob("*.jsonl")):
            for line in p.read_text().splitlines():
                if line.strip():
                    out.append(json.loads(line))
        return out

    @contextmanager
    def lock(self):
        """Exclusive driver lock: a second `datamodels train` on the same run is refused."""
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StoreError(f"{self.path} is being written by {holder}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
