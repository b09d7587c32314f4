"""A table of trained models in a run store: one row per spec, written by the driver alone.

Layout of a table group (R rows, B = rows per chunk, N/T/K/D the dataset's dims)::

    <table>/   attrs: table {key_names, outputs, labels, rows_per_chunk, dims}
      keys      (R, len(key_names)) int64   the spec's key; rows are appended, never moved
      digests   (R,) int64                  ModelSpec.digest() of the spec the row was planned for
      seeds     (R,) int64                  training seed
      masks     (R, N) bool                 the training subset actually used
      labels    (R, N) int16                new training labels, -1 = unchanged (only with labels=True)
      <output>  (R, ...)                    e.g. test_margins (R, T) float32 -- see specs.OUTPUTS
      seconds   (R,) float32                training wall time
      complete  (R,) bool                   written LAST: a row counts only once whole

The rules (the same for every table, so for every stage):

- **Completion.** ``complete`` is written after every other array of the row; a crash in
  between leaves the row incomplete and it is trained again.
- **Resume.** :meth:`ModelTable.plan` appends rows for new keys and returns the rows to
  train: those not complete, and those whose digest differs from the spec's (the spec under
  that key changed, e.g. a re-fit moved a verification set: the row is stale).
- **One writer.** Only the driver writes, so rows can be written in any order; chunks of B rows
  are still the unit of work handed out so that a block's results land in one chunk write.
- **Rows are keyed last.** New rows are appended by growing every other array first and
  ``keys`` last, so a write interrupted in between (disk full, a killed driver) leaves rows
  without a key: they do not count (``len(table)``), and the next :meth:`ModelTable.plan`
  trims every array back to the keyed rows before appending again. A resumed run therefore
  ends with every key in exactly one row.
- **Diverged models** (an output with NaN or infinity) are written like any other -- training
  reproduces them -- and :meth:`ModelTable.write` returns their rows, so the one caller
  (:func:`datamodels.runner.run_specs`) reports them and stops a run where most diverge.
  Readers leave non-finite rows out.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import zarr

from datamodels.errors import DamagedStoreError, DatamodelsError, StoreError
from datamodels.integrity import create_array, fix_for
from datamodels.specs import OUTPUTS, ModelSpec, output_shape

__all__ = ["ModelTable", "all_finite"]

log = logging.getLogger(__name__)

_META = {  # name -> (dtype, fill)
    "digests": ("int64", 0),
    "seeds": ("int64", 0),
    "masks": ("bool", False),
    "labels": ("int16", -1),
    "seconds": ("float32", np.nan),
    "complete": ("bool", False),
}


class ModelTable:
    """Rows of trained models in ``group`` (see the module docstring)."""

    def __init__(self, group: zarr.Group):
        self.group = group
        meta = group.attrs.get("table")
        if not meta:
            raise StoreError(f"{group.store}/{group.path}: not a model table (no 'table' attribute)")
        self.key_names: list[str] = list(meta["key_names"])
        self.outputs: list[str] = list(meta["outputs"])
        self.has_labels: bool = bool(meta["labels"])
        self.rows_per_chunk: int = int(meta["rows_per_chunk"])
        self.dims: dict[str, int] = {k: int(v) for k, v in meta["dims"].items()}
        self._index: dict[tuple[int, ...], int] | None = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def require(cls, parent: zarr.Group, name: str, *, key_names: Iterable[str], outputs: Iterable[str],
                dims: dict[str, int], rows_per_chunk: int, labels: bool = False) -> "ModelTable":
        """Open table ``name`` under ``parent``, creating it (empty) if missing.

        An existing table must record the same outputs and keys; StoreError names the difference.
        """
        key_names, outputs = list(key_names), list(outputs)
        if name in parent:
            table = cls(parent[name])
            want = {"key_names": key_names, "outputs": outputs, "labels": bool(labels)}
            have = {"key_names": table.key_names, "outputs": table.outputs, "labels": table.has_labels}
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if diff:
                lines = "; ".join(f"{k}: store has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
                raise StoreError(f"table {parent.path}/{name} was made for other specs ({lines})")
            return table
        g = parent.require_group(name)
        b = int(rows_per_chunk)
        n = int(dims["N"])
        create_array(g, "keys", shape=(0, len(key_names)), chunks=(b, len(key_names)), dtype="int64", fill_value=-1)
        arrays = {name: ((), *_META[name]) for name in ("digests", "seeds", "seconds", "complete")}
        arrays["masks"] = ((n,), *_META["masks"])
        if labels:
            arrays["labels"] = ((n,), *_META["labels"])
        for out in outputs:
            _, dtype, fill = OUTPUTS[out]
            arrays[out] = (output_shape(out, dims), dtype, fill)
        for arr, (row, dtype, fill) in arrays.items():
            create_array(g, arr, shape=(0, *row), chunks=(b, *row), dtype=dtype, fill_value=fill)
        g.attrs["table"] = {"key_names": key_names, "outputs": outputs, "labels": bool(labels),
                            "rows_per_chunk": b, "dims": {k: int(v) for k, v in dims.items()}}
        return cls(g)

    # ------------------------------------------------------------------ reading
    def array_names(self) -> list[str]:
        """Every array a table of this kind has (keys, digests, seeds, masks, [labels], outputs, ...)."""
        return (["keys", "digests", "seeds", "masks"] + (["labels"] if self.has_labels else []) + self.outputs
                + ["seconds", "complete"])

    def array_spec(self, name: str) -> tuple[tuple[int, ...], str, object]:
        """(row shape, dtype, fill value) of array ``name`` -- how :meth:`require` makes it."""
        if name == "keys":
            return (len(self.key_names),), "int64", -1
        if name in ("masks", "labels"):
            return (self.dims["N"],), *_META[name]
        if name in _META:
            return (), *_META[name]
        _, dtype, fill = OUTPUTS[name]
        return output_shape(name, self.dims), dtype, fill

    def recreate(self, name: str, rows: int) -> zarr.Array:
        """Make array ``name`` again, ``rows`` long and unwritten (``datamodels check --repair``)."""
        row, dtype, fill = self.array_spec(name)
        b = self.rows_per_chunk
        return create_array(self.group, name, shape=(rows, *row), chunks=(b, *row), dtype=dtype, fill_value=fill,
                            overwrite=True)

    def array(self, name: str) -> zarr.Array:
        """The table's array ``name``; StoreError naming it and the repair when it is missing."""
        try:
            return self.group[name]
        except KeyError:
            where = str(self.group.store).rstrip("/")
            raise StoreError(
                f"{where}/{self.group.path}: array '{name}' is missing (expected {self.array_names()}); the "
                f"table is damaged; fix: {fix_for(self.group.path, where)}") from None

    @property
    def where(self) -> str:
        return f"{str(self.group.store).rstrip('/')}/{self.group.path}"

    def __len__(self) -> int:
        """Rows with a key (rows grown by an interrupted append, without a key, do not count)."""
        keys = self.array("keys")
        n = int(keys.shape[0])
        b = max(1, int(keys.chunks[0]))
        while n > 0:
            tail = self._decoded(keys, slice(max(0, n - b), n), "keys")
            keyed = np.flatnonzero((tail != -1).any(axis=1))
            if len(keyed):
                return n - len(tail) + int(keyed[-1]) + 1
            n -= len(tail)
        return 0

    def keys(self) -> np.ndarray:
        """(R, len(key_names)) int64: the key of every keyed row."""
        return self._decoded(self.array("keys"), slice(0, len(self)), "keys")

    def _decoded(self, arr: zarr.Array, sel, name: str) -> np.ndarray:
        """``arr[sel]``, with a decode failure named (stores written before chunks had checksums)."""
        try:
            if isinstance(sel, np.ndarray):
                return np.asarray(arr.get_orthogonal_selection((sel,)))
            return np.asarray(arr[sel])
        except (DatamodelsError, OSError, KeyboardInterrupt):
            raise
        except Exception as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedStoreError(f"{self.where}/{name}: does not decode ({type(e).__name__}: {cause}); "
                                    f"fix: {fix_for(self.group.path, str(self.group.store).rstrip('/'))}") from e

    def index(self) -> dict[tuple[int, ...], int]:
        """{key: row}."""
        if self._index is None:
            self._index = {tuple(int(v) for v in k): r for r, k in enumerate(self.keys())}
        return self._index

    def rows_of(self, keys: Iterable[tuple[int, ...]]) -> np.ndarray:
        """Rows of ``keys`` (KeyError for a key the table does not have)."""
        idx = self.index()
        return np.asarray([idx[tuple(int(v) for v in k)] for k in keys], dtype=np.int64)

    def complete_mask(self) -> np.ndarray:
        """(R,) bool."""
        return np.asarray(self._decoded(self.array("complete"), slice(None), "complete"), dtype=bool)

    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        arr = self.array(name)
        if rows is None:
            return self._decoded(arr, slice(None), name)
        if isinstance(rows, slice):
            return self._decoded(arr, rows, name)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        return self._decoded(arr, rows, name)

    # ------------------------------------------------------------------ planning
    def plan(self, specs: list[ModelSpec]) -> list[int]:
        """Give every spec a row; return the rows that must be trained (in spec order).

        New keys are appended in the order given; a complete row whose digest differs from
        its spec's is stale and is marked incomplete here, before anything is retrained.
        """
        for s in specs:
            if len(s.key) != len(self.key_names):
                raise ValueError(f"spec key {s.key}: expected {len(self.key_names)} values ({self.key_names})")
            missing = [o for o in self.outputs if o not in s.outputs]
            if missing:
                raise ValueError(f"spec {s.key} records {list(s.outputs)}; the table needs {missing}")
        if len({tuple(s.key) for s in specs}) != len(specs):
            raise ValueError("specs: every key must be unique")
        self._trim()
        idx = self.index()
        new = [s for s in specs if tuple(s.key) not in idx]
        if new:
            self._append(new)
            idx = self.index()
        rows = np.asarray([idx[tuple(s.key)] for s in specs], dtype=np.int64)
        digests = np.asarray([s.digest() for s in specs], dtype=np.int64)
        have = self.read("digests", rows)
        done = self.complete_mask()[rows]
        stale = have != digests
        if stale.any():
            srows = rows[stale]
            log.warning("%s: %d rows were trained from other specs under the same keys (e.g. key %s); "
                        "retraining them", self.group.path, int(stale.sum()), self.keys()[srows[0]].tolist())
            self.array("complete").set_orthogonal_selection((srows,), False)
            self.array("digests").set_orthogonal_selection((srows,), digests[stale])
            self.array("seeds").set_orthogonal_selection((srows,), np.asarray(
                [s.seed for s, st in zip(specs, stale) if st], dtype=np.int64))
            done = done & ~stale
        return [int(r) for r in rows[~done]]

    def _trim(self) -> None:
        """Make every array exactly as long as the keyed rows (undo an interrupted append)."""
        n = len(self)
        for name in self.array_names():
            arr = self.array(name)
            if arr.shape[0] != n:
                log.warning("%s: %s has %d rows, the table %d (an append was interrupted); trimming it",
                            self.where, name, arr.shape[0], n)
                arr.resize((n, *arr.shape[1:]))
        self._index = None

    def _append(self, specs: list[ModelSpec]) -> None:
        r0, r1 = len(self), len(self) + len(specs)
        for name in self.array_names():  # keys last: a row counts only once it has its key
            if name != "keys":
                arr = self.array(name)
                arr.resize((r1, *arr.shape[1:]))
        self.array("digests")[r0:r1] = np.asarray([s.digest() for s in specs], dtype=np.int64)
        self.array("seeds")[r0:r1] = np.asarray([s.seed for s in specs], dtype=np.int64)
        keys = self.array("keys")
        keys.resize((r1, *keys.shape[1:]))
        keys[r0:r1] = np.asarray([s.key for s in specs], dtype=np.int64).reshape(r1 - r0, -1)
        self._index = None

    def chunks_of(self, rows: list[int]) -> list[list[int]]:
        """``rows`` grouped by row chunk (each group is one unit of work), in first-seen order."""
        out: dict[int, list[int]] = {}
        for r in rows:
            out.setdefault(r // self.rows_per_chunk, []).append(r)
        return list(out.values())

    # ------------------------------------------------------------------ writing
    def write(self, rows: list[int], results: list[dict], specs: list[ModelSpec]) -> list[int]:
        """Write finished models into ``rows`` (``complete`` last); return the rows whose outputs
        are not all finite (diverged training: see the module docstring)."""
        rows_a = np.asarray(rows, dtype=np.int64)
        contiguous = bool(len(rows_a)) and np.array_equal(rows_a, np.arange(rows_a[0], rows_a[0] + len(rows_a)))
        sel = slice(int(rows_a[0]), int(rows_a[-1]) + 1) if contiguous else rows_a
        values = [("masks", np.stack([r["mask"] for r in results]))]
        if self.has_labels:
            values.append(("labels", np.stack([s.label_row(self.dims["N"]) for s in specs])))
        values += [(out, np.stack([r[out] for r in results])) for out in self.outputs]
        values += [("seconds", [r["seconds"] for r in results]), ("complete", np.ones(len(rows_a), dtype=bool))]
        for name, v in values:
            self._put(name, sel, v)
        return [int(r) for r, res in zip(rows_a, results) if not all_finite(res, self.outputs)]

    def _put(self, name: str, sel: slice | np.ndarray, values) -> None:
        arr = self.array(name)
        values = np.asarray(values, dtype=arr.dtype)
        if isinstance(sel, slice):
            arr[sel] = values
        else:
            arr.set_orthogonal_selection((sel,), values)


def all_finite(result: dict, outputs: Iterable[str]) -> bool:
    """Whether every float output of one trained model is finite (no NaN, no infinity)."""
    for o in outputs:
        v = np.asarray(result[o])
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            return False
    return True
