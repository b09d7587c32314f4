"""A table of trained models in a run store: one row per spec, written by the driver alone.

Layout of a table group (R rows, B = rows per chunk, N/T/K/D the dataset's dims)::

    <table>/   attrs: table {key_names, outputs, labels, rows_per_chunk, dims}
      keys      (R, len(key_names)) int64   the spec's key; rows are appended, never moved
      digests   (R,) int64                  ModelSpec.digest() of the spec the row was planned for
      seeds     (R,) int64                  training seed
      masks     (R, N) bool                 the training subset actually used
      labels    (R, N) int16                new training labels, -1 = unchanged (only with labels=True)
      <output>  (R, ...)                    e.g. test_margins (R, T) float32 -- see specs.OUTPUTS
      <partial> (R, ...)                    an output only some rows record (e.g. collect's logits,
                                            only for the first collect.logit_models models)
      has_<partial> (R,) bool               row r holds <partial> (written after it, before complete)
      seconds   (R,) float32                training wall time
      complete  (R,) bool                   written LAST: a row counts only once whole

The rules (the same for every table, so for every stage):

- **Completion.** ``complete`` is written after every other array of the row; a crash in
  between leaves the row incomplete and it is trained again. A row counts for a spec once it
  is complete and holds every *partial* output the spec asks for (``has_<output>``).
- **Resume.** :meth:`ModelTable.plan` appends rows for new keys and returns the rows to
  train: those not complete, and those whose digest differs from the spec's (the spec under
  that key changed, e.g. a re-fit moved a verification set: the row is stale). A complete row
  whose spec now asks for a partial output it lacks (collect.logit_models grew, or the store
  predates the output) is trained again, and only that output is written: its other arrays
  are kept as they are, and the row stays complete throughout.
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

    def __init__(self, group: zarr.Group, meta: dict | None = None):
        self.group = group
        meta = meta or group.attrs.get("table")
        if not meta:
            raise StoreError(f"{group.store}/{group.path}: not a model table (no 'table' attribute)")
        self.key_names: list[str] = list(meta["key_names"])
        self.outputs: list[str] = list(meta["outputs"])
        self.partial: list[str] = list(meta.get("partial", []))
        self.dtypes: dict[str, str] = dict(meta.get("dtypes", {}))
        self.has_labels: bool = bool(meta["labels"])
        self.rows_per_chunk: int = int(meta["rows_per_chunk"])
        self.dims: dict[str, int] = {k: int(v) for k, v in meta["dims"].items()}
        self._index: dict[tuple[int, ...], int] | None = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def require(cls, parent: zarr.Group, name: str, *, key_names: Iterable[str], outputs: Iterable[str],
                dims: dict[str, int], rows_per_chunk: int, labels: bool = False, partial: Iterable[str] = (),
                dtypes: dict[str, str] | None = None) -> "ModelTable":
        """Open table ``name`` under ``parent``, creating it (empty) if missing.

        ``outputs`` are recorded by every row, ``partial`` outputs only by rows whose spec asks
        for them; ``dtypes`` overrides :data:`~datamodels.specs.OUTPUTS`' dtype of an output in
        this table (e.g. float16 logits). An existing table must record the same outputs and keys
        (StoreError names the difference); partial outputs it lacks are added (empty: no row
        holds them yet), so a store made before an output existed gains it.
        """
        key_names, outputs, partial = list(key_names), list(outputs), list(partial)
        dtypes = {k: str(v) for k, v in (dtypes or {}).items()}
        if name in parent:
            table = cls(parent[name])
            want = {"key_names": key_names, "outputs": outputs, "labels": bool(labels)}
            have = {"key_names": table.key_names, "outputs": table.outputs, "labels": table.has_labels}
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if diff:
                lines = "; ".join(f"{k}: store has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
                raise StoreError(f"table {parent.path}/{name} was made for other specs ({lines})")
            missing = [o for o in partial if o not in table.partial]
            if missing:
                table._add_partial(missing, dtypes)
            return table
        g = parent.require_group(name)
        b = int(rows_per_chunk)
        create_array(g, "keys", shape=(0, len(key_names)), chunks=(b, len(key_names)), dtype="int64", fill_value=-1)
        meta = {"key_names": key_names, "outputs": outputs, "labels": bool(labels), "rows_per_chunk": b,
                "dims": {k: int(v) for k, v in dims.items()}, "partial": partial, "dtypes": dtypes}
        table = cls(g, meta)
        for arr in table.array_names():
            if arr != "keys":
                table.recreate(arr, 0)
        g.attrs["table"] = meta  # last: a group without it is not (yet) a table
        return table

    def _add_partial(self, names: list[str], dtypes: dict[str, str]) -> None:
        """Give the table partial outputs ``names`` (arrays first, held by no row; the table's
        attribute last, so an interrupted call is simply done again)."""
        log.info("%s: adding the partial outputs %s (no row holds them yet)", self.where, names)
        self.partial += names
        self.dtypes.update({o: dtypes[o] for o in names if o in dtypes})
        rows = int(self.array("keys").shape[0])
        for o in names:
            self.recreate(o, rows)
            self.recreate(f"has_{o}", rows)
        meta = dict(self.group.attrs["table"])
        meta.update({"partial": self.partial, "dtypes": self.dtypes})
        self.group.attrs["table"] = meta

    # ------------------------------------------------------------------ reading
    def array_names(self) -> list[str]:
        """Every array a table of this kind has (keys, digests, seeds, masks, [labels], outputs, ...)."""
        return (["keys", "digests", "seeds", "masks"] + (["labels"] if self.has_labels else []) + self.outputs
                + self.partial + [f"has_{o}" for o in self.partial] + ["seconds", "complete"])

    def array_spec(self, name: str) -> tuple[tuple[int, ...], str, object]:
        """(row shape, dtype, fill value) of array ``name`` -- how :meth:`require` makes it."""
        if name == "keys":
            return (len(self.key_names),), "int64", -1
        if name in ("masks", "labels"):
            return (self.dims["N"],), *_META[name]
        if name in _META:
            return (), *_META[name]
        if name.startswith("has_") and name[4:] in self.partial:
            return (), "bool", False
        _, dtype, fill = OUTPUTS[name]
        return output_shape(name, self.dims), self.dtypes.get(name, dtype), fill

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

    def holds(self, output: str) -> np.ndarray:
        """(R,) bool: the rows whose ``output`` is written (complete, and for a partial output,
        holding it). Readers still leave out non-finite rows (diverged training)."""
        done = self.complete_mask()
        if output in self.outputs:
            return done
        if output not in self.partial:
            return np.zeros(len(done), dtype=bool)
        has = np.asarray(self._decoded(self.array(f"has_{output}"), slice(None), f"has_{output}"), dtype=bool)
        n = min(len(done), len(has))
        return np.concatenate([done[:n] & has[:n], np.zeros(len(done) - n, dtype=bool)])

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
            extra = [o for o in s.outputs if o not in self.outputs and o not in self.partial]
            if extra:
                raise ValueError(f"spec {s.key} records {extra}, which {self.where} has no array for "
                                 f"(outputs {self.outputs}, partial {self.partial})")
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
        for o in self.partial:  # a complete row lacking a partial output its spec asks for
            asks = np.asarray([o in s.outputs for s in specs], dtype=bool)
            if (asks & done).any():
                done &= ~asks | self.holds(o)[rows]
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
        are not all finite (diverged training: see the module docstring).

        A row that is complete already (it was trained again for a partial output it lacked)
        gets only its spec's partial outputs and their ``has_`` flags: its other arrays are kept.
        """
        rows_a = np.asarray(rows, dtype=np.int64)
        done = self.complete_mask()[rows_a] if self.partial else np.zeros(len(rows_a), dtype=bool)
        if done.any():
            self._note_reproduction(rows_a[done], [r for r, d in zip(results, done) if d])
        new = ~done
        if new.any():
            nr = [r for r, d in zip(results, new) if d]
            values = [("masks", np.stack([r["mask"] for r in nr]))]
            if self.has_labels:
                values.append(("labels", np.stack([s.label_row(self.dims["N"]) for s, d in zip(specs, new) if d])))
            values += [(out, np.stack([r[out] for r in nr])) for out in self.outputs]
            for name, v in values:
                self._put(name, _selection(rows_a[new]), v)
        for o in self.partial:
            asks = np.asarray([o in s.outputs for s in specs], dtype=bool)
            if asks.any():
                sel = _selection(rows_a[asks])
                self._put(o, sel, np.stack([r[o] for r, a in zip(results, asks) if a]))
                self._put(f"has_{o}", sel, np.ones(int(asks.sum()), dtype=bool))
        if new.any():
            sel = _selection(rows_a[new])
            self._put("seconds", sel, [r["seconds"] for r, d in zip(results, new) if d])
            self._put("complete", sel, np.ones(int(new.sum()), dtype=bool))
        return [int(r) for r, res, s in zip(rows_a, results, specs)
                if not all_finite(res, [o for o in s.outputs if o in self.outputs or o in self.partial])]

    def _note_reproduction(self, rows: np.ndarray, results: list[dict]) -> None:
        """Log how closely models trained again reproduce the stored outputs they keep."""
        diffs = []
        for o in self.outputs:
            have = self.read(o, rows)
            new = np.stack([r[o] for r in results]).astype(have.dtype)
            d = np.abs(have.astype(np.float64) - new)
            diffs.append(float(np.nanmax(d)) if d.size and np.isfinite(d).any() else 0.0)
        log.info("%s: rows %s trained again for partial outputs they lacked; their stored %s are kept (the "
                 "retrained values differ by at most %.3g)", self.where, rows.tolist()[:6], self.outputs,
                 max(diffs, default=0.0))

    def _put(self, name: str, sel: slice | np.ndarray, values) -> None:
        arr = self.array(name)
        values = np.asarray(values, dtype=arr.dtype)
        if isinstance(sel, slice):
            arr[sel] = values
        else:
            arr.set_orthogonal_selection((sel,), values)


def _selection(rows: np.ndarray) -> slice | np.ndarray:
    """A slice when ``rows`` are contiguous (one plain write), else the rows themselves."""
    contiguous = bool(len(rows)) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
    return slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows


def all_finite(result: dict, outputs: Iterable[str]) -> bool:
    """Whether every float output of one trained model is finite (no NaN, no infinity)."""
    for o in outputs:
        v = np.asarray(result[o])
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            return False
    return True
