"""The run store: one Zarr v3 group per run, on a local path or any fsspec URL.

Layout (M models, N training examples, T targets; every ``.../models`` group is a
:class:`~datamodels.table.ModelTable`)::

    RUN/                 attrs: schema_version, config, dataset, provenance, requested
      claim/             the driver's claim (datamodels.claim), present while one works
      train_labels (N,)  test_labels (T,)  int64
      models/            collect: key (i,), masks (M, N), test_margins (M, T), train_margins (M, N);
                         test_logits (M, T, K), train_logits (M, N, K) float16, held by the first
                         collect.logit_models rows only (has_test_logits, has_train_logits)
      datamodels/        fitted datamodels (datamodels.fit)
      eval/models/       held-out evaluation models, key (e, r)    (datamodels.evaluate)
      full/models/       full-set reference models, key (f,)       (datamodels.fullset)
      brittleness/       estimates                                  (datamodels.brittleness)
      verify/models/     verification models, key (target, mode, method, k, j)  (datamodels.verify)

Only the driver writes, and only while it holds the run's claim: workers return their results.
Row i of ``models`` is model i, whose mask and seed derive from (run seed, i).
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import sys
import time
import uuid
from contextlib import contextmanager

import numpy as np
import zarr

from datamodels.claim import DriverClaim
from datamodels.config import RunConfig, config_from_dict, diff_identity
from datamodels.data import Dataset
from datamodels.errors import StoreError
from datamodels.integrity import create_array
from datamodels.storage import Location
from datamodels.table import ModelTable

__all__ = ["RunStore", "SCHEMA_VERSION", "versions", "COLLECT_OUTPUTS", "COLLECT_LOGITS"]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2
COLLECT_OUTPUTS = ("test_margins", "train_margins")
# Recorded by the first collect.logit_models models only (partial outputs of the collect table),
# as float16: (N + T) K * 2 bytes per model (docs/label_issues.md measures that float16 is enough).
COLLECT_LOGITS = ("test_logits", "train_logits")
LOGIT_DTYPES = {"test_logits": "float16", "train_logits": "float16"}


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


def dims_of(dataset_attrs: dict, cfg: RunConfig) -> dict[str, int]:
    """Table dims: N, T, K (classes), D (penultimate width) and P (model state, output "params")."""
    from datamodels.model import state_size

    k = len(dataset_attrs["classes"])
    return {"N": int(dataset_attrs["num_train"]), "T": int(dataset_attrs["num_test"]), "K": k,
            "D": int(cfg.model.widths[3]), "W": state_size(cfg.model.widths, int(dataset_attrs["image_shape"][0]), k)}


def _half_created(loc: Location) -> bool:
    """A store whose creation stopped before its attributes (written last) were written."""
    raw = loc.read_bytes("zarr.json")
    if raw is None:
        return any(loc.exists(k) for k in ("models/zarr.json", "train_labels/zarr.json", "test_labels/zarr.json"))
    try:
        doc = json.loads(raw)
        return doc.get("node_type") == "group" and "schema_version" not in doc.get("attributes", {})
    except (ValueError, AttributeError):
        # A damaged root document (e.g. cut short by a full disk while written): half-created
        # only while no model has been trained into the store (making it again loses nothing);
        # otherwise RunStore.open names it and nothing is ever deleted.
        return _no_models_yet(loc)


def _no_models_yet(loc: Location) -> bool:
    keys = loc.read_bytes("models/keys/zarr.json")
    if keys is None:
        return not loc.exists("models/complete/c/0")
    try:
        return int(json.loads(keys)["shape"][0]) == 0
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def _command_line() -> str | None:
    """This process's `datamodels ...` command line, when it is one (for the exact fix in messages)."""
    if sys.argv and sys.argv[0].endswith(("datamodels", "cli.py")):
        import shlex

        return " ".join(["datamodels"] + [shlex.quote(a) for a in sys.argv[1:]])
    return None


def _half_created_error(loc: Location) -> StoreError:
    raw = loc.read_bytes("zarr.json")
    command = None
    try:
        command = json.loads(raw)["attributes"]["creating"]["command"] if raw else None
    except (ValueError, KeyError, TypeError):
        pass
    again = f"`{command}`" if command else f"the same `datamodels train CONFIG --out {loc}`"
    return StoreError(f"{loc} is a half-created run store (its creation stopped before it was whole, e.g. the disk "
                      f"filled up; no model was trained into it): re-run {again} to create it again, or delete {loc}")


class RunStore:
    """A run's Zarr group. Open with :meth:`open` (existing) or :meth:`create` (new/extend)."""

    def __init__(self, loc: Location, group: zarr.Group):
        self.loc = loc
        self.group = group
        self.claim: DriverClaim | None = None

    def __repr__(self) -> str:
        return f"RunStore({self.loc.url!r})"

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, where: str | Location, mode: str = "r") -> "RunStore":
        loc = Location(where)
        if not loc.exists("zarr.json"):
            if _half_created(loc):
                raise _half_created_error(loc)
            if loc.local and loc.exists() and not loc.path.is_dir():
                raise StoreError(f"{loc} is a file, not a run store (expected the directory a `datamodels train "
                                 "--out` made)")
            raise StoreError(f"no run store at {loc} (expected a run made by `datamodels train`)")
        if _half_created(loc):
            raise _half_created_error(loc)
        group = zarr.open_group(store=loc.zarr_store(read_only=mode == "r"), mode="r" if mode == "r" else "r+")
        version = group.attrs.get("schema_version")
        if version is None:
            if _half_created(loc):
                raise _half_created_error(loc)
            raise StoreError(f"{loc}/zarr.json is a Zarr group but not a run store (no schema_version); "
                             "expected a run made by `datamodels train`")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{loc}: store schema version {version}, this datamodels reads {SCHEMA_VERSION}"
                             + ("; train into a new --out" if isinstance(version, int) and version < SCHEMA_VERSION
                                else ""))
        return cls(loc, group)

    @classmethod
    def prepare(cls, where: str | Location, cfg: RunConfig, dataset: Dataset) -> None:
        """Check, without writing, that ``cfg`` may create or extend a store at ``where``.

        Raises StoreError naming the differing keys when an existing store was made with an
        incompatible config or other data.
        """
        loc = Location(where)
        loc.check_writable()
        if loc.is_empty():
            return
        if not loc.exists("zarr.json"):
            if not (loc.exists("claim") or _half_created(loc)):
                raise StoreError(f"{loc} exists and is not a run store; choose another --out")
            return
        if _half_created(loc):
            return
        existing = cls.open(loc)
        diff = diff_identity(existing.config, cfg)
        if diff:
            lines = "; ".join(f"{k}: store has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
            raise StoreError(
                f"{loc} was created with another config ({lines}). "
                "Use another --out, or the store's own config (`datamodels status RUN --json`)."
            )
        fp = existing.group.attrs["dataset"]["fingerprint"]
        if fp != dataset.fingerprint():
            raise StoreError(
                f"{loc} was trained on other data (dataset fingerprint {fp[:12]}..., "
                f"now {dataset.fingerprint()[:12]}...)"
            )

    @classmethod
    def create(cls, where: str | Location, cfg: RunConfig, dataset: Dataset, *, claim: DriverClaim) -> "RunStore":
        """Create the store, or open it and record ``cfg.collect.models`` as requested.

        Needs the run's ``claim`` (nothing is changed before it is held); checks again under
        it (:meth:`prepare`). The collect table's rows are added by the collect stage.
        """
        loc = Location(where)
        cls.prepare(loc, cfg, dataset)
        claim.check()
        m = cfg.collect.models
        if _half_created(loc):
            log.warning("%s: creating again a store whose creation was interrupted", loc)
            for key in ("models", "train_labels", "test_labels", "zarr.json"):
                loc.delete(key, recursive=True)
        if loc.exists("zarr.json"):
            store = cls.open(loc, mode="r+")
            store.claim = claim
            store._collect_table()  # a store made before the logits existed gains their (empty) arrays
            raw = dict(store.group.attrs["config"])
            logit_models = raw["collect"].get("logit_models")
            if m > store.requested or logit_models != cfg.collect.logit_models:
                if m > store.requested:
                    log.info("extending %s from %d to %d models", loc, store.requested, m)
                raw["collect"] = {**raw["collect"], "models": max(m, store.requested),
                                  "logit_models": cfg.collect.logit_models}
                store.group.attrs.update({"requested": max(m, store.requested), "config": raw})  # one write
            return store
        # The root's first document says what is being created (and by which command); the
        # attributes that make it a run store come last.
        group = zarr.open_group(store=loc.zarr_store(), mode="a", attributes={"creating": {
            "command": _command_line(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})
        create_array(group, "train_labels", data=dataset.train_y.numpy())
        create_array(group, "test_labels", data=dataset.test_y.numpy())
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "config": cfg.to_dict(),
            "dataset": dataset.describe(),
            "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                           "versions": versions()},
            "requested": m,
        }
        store = cls(loc, group)
        store._collect_table(dims=dims_of(attrs["dataset"], cfg), rows_per_chunk=cfg.collect.block_size)
        group.attrs.put(attrs)  # last, in one write: a store without them is recognised as half-created
        store.claim = claim
        return store

    def _collect_table(self, *, dims: dict[str, int] | None = None, rows_per_chunk: int | None = None) -> ModelTable:
        """The collect table ``models/``, made if missing (new store) and given the partial logit
        outputs if it lacks them (a store made before they existed)."""
        if "models" in self.group:
            t = self.models_table()
            dims, rows_per_chunk = t.dims, t.rows_per_chunk
        return ModelTable.require(self.group, "models", key_names=["i"], outputs=COLLECT_OUTPUTS, dims=dims,
                                  rows_per_chunk=rows_per_chunk, partial=COLLECT_LOGITS, dtypes=LOGIT_DTYPES)

    # ------------------------------------------------------------------ the driver's claim
    @contextmanager
    def writing(self, *, takeover: bool = False):
        """Hold the run's claim while writing: ``with store.writing(): ...`` (see datamodels.claim)."""
        with DriverClaim(self.loc, takeover=takeover) as claim:
            self.claim = claim
            if self.group.read_only:
                self.group = zarr.open_group(store=self.loc.zarr_store(), mode="r+")
            try:
                yield self
            finally:
                self.claim = None

    def check_writable(self, path: str) -> None:
        """Prove, before computing, that this driver can write group ``path`` (e.g. "datamodels"):
        write and remove a small probe object there. StoreError (read-only) or StorageError."""
        self.check_claim()
        key = f"{path.strip('/')}/.write-probe-{uuid.uuid4().hex[:8]}" if path else f".write-probe-{uuid.uuid4().hex[:8]}"
        made_dir = self.loc.local and path and not self.loc.exists(path)
        self.loc.write_bytes(key, b"probe")
        self.loc.delete(key)
        if made_dir:
            try:
                (self.loc.path / path).rmdir()
            except OSError:
                pass

    def check_claim(self) -> None:
        """Raise StoreError unless this driver holds the run's claim (call before writing)."""
        if self.claim is None:
            raise StoreError(f"{self.loc}: writing needs the run's claim (internal error: no claim held)")
        self.claim.check()

    # ------------------------------------------------------------------ tables
    @property
    def dims(self) -> dict[str, int]:
        return dims_of(self.group.attrs["dataset"], self.config)

    def table(self, path: str, *, key_names, outputs, rows_per_chunk: int, labels: bool = False) -> ModelTable:
        """The model table at ``path`` (e.g. "eval/models"), created if missing."""
        parent, _, name = path.rpartition("/")
        g = self.group.require_group(parent) if parent else self.group
        return ModelTable.require(g, name, key_names=key_names, outputs=outputs, dims=self.dims,
                                  rows_per_chunk=rows_per_chunk, labels=labels)

    def models_table(self) -> ModelTable:
        """The collect table ``models/`` (key (i,); row i is model i)."""
        return ModelTable(self.group["models"])

    # ------------------------------------------------------------------ reading
    @property
    def config(self) -> RunConfig:
        return config_from_dict(RunConfig, self.group.attrs["config"], source=f"{self.loc} (attrs)")

    @property
    def requested(self) -> int:
        return int(self.group.attrs["requested"])

    @property
    def block_size(self) -> int:
        return self.models_table().rows_per_chunk

    def complete_mask(self) -> np.ndarray:
        """(M,) bool over the collect table's rows."""
        return self.models_table().complete_mask()

    def missing(self, upto: int | None = None) -> list[int]:
        done = self.complete_mask()
        upto = self.requested if upto is None else upto
        return [i for i in range(upto) if i >= len(done) or not done[i]]

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A collect-table array (masks, test_margins, train_margins, seconds, complete, ...) or a
        root array (train_labels, test_labels); ``rows`` selects models."""
        if name in ("train_labels", "test_labels"):
            return np.asarray(self.group[name][:])
        return self.models_table().read(name, rows)

    def dataset(self, given: Dataset | None = None) -> Dataset:
        """The data the run was trained on: ``given`` (hand-made data, e.g. in tests) or the
        configured dataset, checked against the store's fingerprint (StoreError if other)."""
        from datamodels.data import load_dataset

        dataset = given if given is not None else load_dataset(self.config.data)
        fp = self.group.attrs["dataset"]["fingerprint"]
        if fp != dataset.fingerprint():
            raise StoreError(f"{self.loc} was trained on other data (dataset fingerprint {fp[:12]}..., "
                             f"the data given has {dataset.fingerprint()[:12]}...)")
        return dataset

    def status(self) -> dict:
        done = self.complete_mask()
        idx = np.flatnonzero(done)
        acc, diverged = None, 0
        if len(idx):
            tm = self.read("test_margins", idx)
            finite = np.isfinite(tm).all(axis=1)
            diverged = int((~finite).sum())
            acc = float(np.mean(tm[finite] > 0)) if finite.any() else None
        seconds = self.read("seconds", idx) if len(idx) else np.array([])
        cfg = self.group.attrs["config"]
        ds = self.group.attrs["dataset"]
        return {
            "path": str(self.loc),
            "config_name": cfg.get("name"),
            "dataset": ds["name"],
            "num_train": ds["num_train"],
            "num_targets": ds["num_test"],
            "alpha": cfg["collect"]["alpha"],
            "requested": self.requested,
            "completed": int(done.sum()),
            "with_logits": int(self.models_table().holds("test_logits").sum()),  # label-issues' models
            "diverged": diverged,
            "missing": int(self.requested - done[: self.requested].sum()),
            "mean_test_accuracy": acc,
            "mean_train_seconds": float(np.mean(seconds)) if len(seconds) else None,
            "created": self.group.attrs["provenance"]["created"],
        }
