"""``datamodels check RUN [--repair]``: prove a run store whole, or name (and mend) what is not.

Every array the product made is read chunk by chunk through the run's
:class:`~datamodels.integrity.CheckedStore`, so each chunk's crc32c checksum is verified and
a failure names the array, the chunk and the model rows. For every model table (``models/``,
``eval/models``, ``full/models``, ``verify/models``) the outputs of every complete row must
also be finite; non-finite ones are *diverged* models (training wrote them, retraining
reproduces them, every reader leaves them out) and are reported, not "repaired".

``--repair`` (under the driver's claim) makes a damaged store usable again without losing
anything that is whole:

- a damaged chunk of a table's data arrays (masks, labels, outputs, seconds, complete) is
  removed and every row it held is marked incomplete, so the stage that made the table
  (``train``, ``evaluate``, ``brittleness``, ``verify``) retrains exactly those rows;
- a damaged chunk of a table's row identity (keys, digests, seeds) cannot be rebuilt, so the
  table is cut back to the rows before it; the stage appends and retrains the rest;
- damaged ``train_labels``/``test_labels`` are rewritten from the dataset;
- a damaged fit (``datamodels/``), brittleness result or LDS array is removed; the check
  names the command that makes it again.

Damaged metadata (``zarr.json``) cannot be rebuilt from the run: the check names the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import zarr

from datamodels.errors import DamagedStoreError, StoreError
from datamodels.integrity import create_array, fix_for, whole_chunks
from datamodels.store import RunStore
from datamodels.table import ModelTable

__all__ = ["check_run", "CheckReport", "Damage"]

log = logging.getLogger(__name__)

_IDENTITY = ("keys", "digests", "seeds")
_READ_BYTES = 2**28  # at most this much of an array is read at once


@dataclass
class Damage:
    """One damaged chunk (or array): where, which rows, why, and what --repair did about it."""

    array: str
    chunk: int | None
    rows: tuple[int, int] | None
    message: str
    repaired: str | None = None

    def to_dict(self) -> dict:
        return {"array": self.array, "chunk": self.chunk, "rows": list(self.rows) if self.rows else None,
                "message": self.message, "repaired": self.repaired}


@dataclass
class CheckReport:
    """What :func:`check_run` found: damaged chunks, diverged rows per table, arrays read."""

    run: str
    damaged: list[Damage] = field(default_factory=list)
    diverged: dict[str, list[int]] = field(default_factory=dict)
    arrays: int = 0
    chunks: int = 0
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged or (self.repaired and all(d.repaired for d in self.damaged))

    def to_dict(self) -> dict:
        return {"run": self.run, "ok": self.ok, "repaired": self.repaired, "arrays": self.arrays,
                "chunks": self.chunks, "damaged": [d.to_dict() for d in self.damaged],
                "diverged": {k: v for k, v in self.diverged.items()}}


def _tables(group: zarr.Group) -> list[str]:
    """Paths of every model table under ``group`` (a group with a ``table`` attribute)."""
    out = []
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Group) and node.attrs.get("table"):
            out.append(name)
    return sorted(out)


def _column_slices(arr: zarr.Array, rows: int) -> list[slice | None]:
    """Column ranges (whole chunks, ~256 MiB) to read a chunk-row of ``arr`` in (None: all at
    once): a fit's weight (N, T') is one chunk-row of all N rows, read a few targets' chunks at
    a time."""
    if arr.ndim < 2 or int(arr.chunks[1]) >= int(arr.shape[1]):
        return [None]
    row_bytes = max(1, rows) * arr.dtype.itemsize * int(np.prod(arr.shape[2:], dtype=np.int64))
    step = whole_chunks(_READ_BYTES // row_bytes, int(arr.chunks[1]))
    return [slice(c, c + step) for c in range(0, int(arr.shape[1]), step)]


def _scan_array(arr: zarr.Array, report: CheckReport, path: str, bar=None) -> list[Damage]:
    """Read ``arr`` one chunk-row at a time (big chunk-rows a few column chunks at a time); the
    damaged ones."""
    found = []
    n = int(arr.shape[0]) if arr.ndim else 0
    b = max(1, int(arr.chunks[0])) if arr.ndim else 1
    blocks = range(0, max(n, 1), b) if arr.ndim else [None]
    cols = _column_slices(arr, min(b, n)) if arr.ndim else [None]
    for r0 in blocks:
        report.chunks += 1
        if bar is not None:
            bar.update(1)
        try:
            if r0 is None:
                _ = arr[...]
            for c in cols if r0 is not None else ():
                rows = slice(r0, min(n, r0 + b))
                _ = np.asarray(arr[rows] if c is None else arr[rows, c])
        except DamagedStoreError as e:
            rows = None if r0 is None else (r0, min(n, r0 + b) - 1)
            found.append(Damage(path, None if r0 is None else r0 // b, rows, str(e)))
        except StoreError:
            raise
        except Exception as e:  # a store written before chunks had checksums: the codec's own error
            rows = None if r0 is None else (r0, min(n, r0 + b) - 1)
            cause = " ".join(str(e).split()) or type(e).__name__
            found.append(Damage(path, None if r0 is None else r0 // b, rows,
                                f"{report.run}/{path}: chunk c/{'' if r0 is None else r0 // b} does not decode "
                                f"({type(e).__name__}: {cause}); fix: {fix_for(path, report.run)}"))
    return found


def _scan(store: RunStore, report: CheckReport, progress: bool = False) -> dict[str, list[Damage]]:
    """{array path: damage} over every array of the run; diverged rows per table in ``report``."""
    by_array: dict[str, list[Damage]] = {}
    try:
        members = list(store.group.members(max_depth=None))
    except DamagedStoreError as e:
        report.damaged.append(Damage("zarr.json", None, None, str(e)))
        return by_array
    from tqdm.auto import tqdm

    arrays = [(p, a) for p, a in members if isinstance(a, zarr.Array)]
    total = sum(max(1, -(-int(a.shape[0]) // max(1, int(a.chunks[0])))) if a.ndim else 1 for _, a in arrays)
    with tqdm(total=total, unit="chunk", desc="check", disable=not progress) as bar:
        for path, node in arrays:
            report.arrays += 1
            dmg = _scan_array(node, report, path, bar)
            if dmg:
                by_array[path] = dmg
                report.damaged.extend(dmg)
    for tpath in _tables(store.group):
        try:
            diverged = _diverged(ModelTable(store.group[tpath]), tpath, by_array)
        except DamagedStoreError:
            continue  # its keys or complete flags are damaged: reported above
        if diverged:
            report.diverged[tpath] = diverged
    return by_array


def _diverged(table: ModelTable, tpath: str, by_array: dict[str, list[Damage]]) -> list[int]:
    """Complete, undamaged rows of ``table`` with a non-finite output."""
    n = len(table)
    damaged_rows = np.zeros(n, dtype=bool)
    for p, ds in by_array.items():
        if p.startswith(tpath + "/"):
            for d in ds:
                if d.rows is not None:
                    damaged_rows[d.rows[0]: d.rows[1] + 1] = True
    done = np.flatnonzero(table.complete_mask()[:n] & ~damaged_rows)
    finite = np.ones(len(done), dtype=bool)
    b = table.rows_per_chunk
    for out in table.outputs + table.partial:
        if table.array(out).dtype.kind != "f":
            continue
        held = np.ones(len(done), dtype=bool) if out in table.outputs else table.holds(out)[done]
        for i in range(0, len(done), b):
            sel = np.flatnonzero(held[i: i + b]) + i  # a partial output: only the rows that hold it
            if len(sel):
                v = table.read(out, done[sel])
                finite[sel] &= np.isfinite(v.reshape(len(v), -1)).all(axis=1)
    return [int(r) for r in done[~finite]]


def check_run(run, *, repair: bool = False, takeover: bool = False, dataset=None,
              progress: bool = False) -> CheckReport:
    """Verify every chunk of the run at ``run`` (and that complete rows are finite); with
    ``repair``, mend what can be mended (see the module docstring). Returns the report."""
    store = RunStore.open(run)
    report = CheckReport(run=str(store.loc))
    by_array = _scan(store, report, progress)
    if not repair or not report.damaged:
        return report
    if any(d.array == "zarr.json" or d.array.endswith("zarr.json") for d in report.damaged):
        return report  # metadata cannot be rebuilt: the message says so
    with store.writing(takeover=takeover):
        _repair(store, by_array, dataset)
    report.repaired = True
    return report


def _repair(store: RunStore, by_array: dict[str, list[Damage]], dataset) -> None:
    tables = _tables(store.group)
    cut: dict[str, int] = {}
    for path, damage in by_array.items():
        tpath = next((t for t in tables if path.startswith(t + "/")), None)
        if tpath is not None:
            name = path[len(tpath) + 1:]
            if name in _IDENTITY:
                first = min(d.rows[0] for d in damage if d.rows)
                cut[tpath] = min(cut.get(tpath, first), first)
                for d in damage:
                    d.repaired = f"the table {tpath} was cut back to its first {first} rows; re-run the stage"
                continue
            table = ModelTable(store.group[tpath])
            for d in damage:
                r0, r1 = d.rows
                _delete_chunk(store, path, d.chunk)
                store.check_claim()
                complete = table.array("complete")
                if name != "complete":  # a removed `complete` chunk reads as False already
                    complete[r0: r1 + 1] = False
                d.repaired = f"rows {r0}-{r1} of {tpath} marked incomplete; {fix_for(tpath, str(store.loc))}"
                log.warning("%s: removed chunk %s of %s; rows %d-%d marked incomplete", store.loc, d.chunk, path,
                            r0, r1)
        elif path in ("train_labels", "test_labels"):
            ds = store.dataset(dataset)
            data = (ds.train_y if path == "train_labels" else ds.test_y).numpy()
            store.check_claim()
            create_array(store.group, path, data=data, overwrite=True)
            for d in damage:
                d.repaired = f"{path} rewritten from the dataset"
        else:
            top = path.split("/", 1)[0]
            target = _removable(store, path)
            store.check_claim()
            _remove(store, target)
            for d in damage:
                d.repaired = f"{target} removed; {fix_for(top, str(store.loc)).split(', then ')[-1]}"
    for tpath, n in cut.items():
        table = ModelTable(store.group[tpath])
        store.check_claim()
        for name in table.array_names():  # n is a chunk boundary: the damaged chunks go whole
            arr = table.array(name)
            arr.resize((min(n, arr.shape[0]), *arr.shape[1:]))


def _delete_chunk(store: RunStore, path: str, chunk: int | None) -> None:
    """Remove every stored object of chunk-row ``chunk`` of array ``path`` (it then reads as fill)."""
    key = f"{path}/c/{chunk}" if chunk is not None else f"{path}/c"
    store.loc.delete(key, recursive=True)


def _removable(store: RunStore, path: str) -> str:
    """The group a damaged non-table array makes unusable: its fit, the brittleness result, or
    the array itself (eval/per_target_lds)."""
    parts = path.split("/")
    if parts[0] == "datamodels" and len(parts) > 2:
        return "/".join(parts[:2])
    if parts[0] == "brittleness":
        return "brittleness"
    return path


def _remove(store: RunStore, path: str) -> None:
    parts = path.split("/")
    parent = store.group["/".join(parts[:-1])] if len(parts) > 1 else store.group
    if parts[0] == "datamodels" and len(parts) == 2:
        fits = {k: v for k, v in parent.attrs.get("fits", {}).items() if v != parts[1]}
        current = parent.attrs.get("current")
        if current not in fits:
            current = next(iter(sorted(fits)), None)
        parent.attrs.update({"fits": fits, **({"current": current} if current else {})})
        if current is None and "current" in parent.attrs:
            del parent.attrs["current"]
    if path == "eval/per_target_lds" and "report" in parent.attrs:
        del parent.attrs["report"]
    del parent[parts[-1]]
