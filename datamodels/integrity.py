"""Nothing lost, nothing silently wrong: checksummed arrays and a store that names what failed.

- :func:`create_array` is the one way the product creates an array: Zarr v3's ``crc32c``
  codec closes every chunk's codec chain, so a truncated or altered chunk no longer decodes
  to garbage (or to a bare "Zstd decompression error").
- :class:`CheckedStore` wraps every Zarr store a run is opened with
  (:meth:`datamodels.storage.Location.zarr_store`). On reads it verifies each chunk's checksum
  and that metadata documents are JSON, and raises :class:`~datamodels.errors.DamagedStoreError`
  naming the array, the chunk and its model rows -- the same error for every stage, since every
  stage reads through it. On a local disk it writes every metadata document (``zarr.json``)
  whole, through a temporary file and a rename, so a full disk never leaves half a document
  (an array's document is rewritten on every append). On writes it turns an ``OSError`` into
  one line naming the object:
  :class:`~datamodels.errors.StorageError` (disk full, I/O error: exit 1) or
  :class:`~datamodels.errors.StoreError` (read-only: exit 2).

``datamodels check RUN [--repair]`` (:mod:`datamodels.check`) reads every chunk through it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

from datamodels.errors import NOT_WRITABLE, DamagedStoreError, StorageError, StoreError
from datamodels.storage import replace_file

__all__ = ["create_array", "checksum_codecs", "CheckedStore", "storage_error", "chunk_rows", "fix_for"]

log = logging.getLogger(__name__)


def checksum_codecs() -> tuple:
    """The compressors of every array the product creates: zstd (Zarr's default), then crc32c."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=0, checksum=False), Crc32cCodec())


def whole_chunks(items: int, chunk: int) -> int:
    """``items`` rounded down to whole chunks of ``chunk``, at least one chunk: how many columns
    (targets) to read or solve at once so that no chunk is decoded twice."""
    chunk = max(1, int(chunk))
    return max(chunk, int(items) // chunk * chunk)


def create_array(group: zarr.Group, name: str, **kw: Any) -> zarr.Array:
    """``group.create_array(name, **kw)`` with checksummed chunks (the one creation helper)."""
    kw.setdefault("compressors", checksum_codecs())
    return group.create_array(name, **kw)


# --------------------------------------------------------------------------- messages


def fix_for(path: str, where: str) -> str:
    """The command that rewrites what lives at array/group ``path`` of the run at ``where``."""
    top = path.strip("/").split("/", 1)[0]
    return {
        "models": f"`datamodels check {where} --repair` (marks those models incomplete), then re-run "
                  f"`datamodels train CONFIG --out {where}` to retrain them",
        "eval": f"`datamodels check {where} --repair`, then re-run `datamodels evaluate {where}`",
        "full": f"`datamodels check {where} --repair`, then re-run `datamodels brittleness {where}`",
        "verify": f"`datamodels check {where} --repair`, then re-run the `datamodels verify {where} ...` command",
        "datamodels": f"`datamodels check {where} --repair` (removes the fit), then `datamodels fit {where}`",
        "brittleness": f"`datamodels check {where} --repair` (removes the estimates), then "
                       f"`datamodels brittleness {where}`",
        "train_labels": f"`datamodels check {where} --repair` (rewrites the labels from the dataset)",
        "test_labels": f"`datamodels check {where} --repair` (rewrites the labels from the dataset)",
        "label_issues": f"`datamodels check {where} --repair`, then re-run `datamodels label-issues {where} "
                        "--benchmark`",
    }.get(top, f"`datamodels check {where} --repair`")


def chunk_rows(coords: tuple[int, ...], chunk_shape: list[int], shape: list[int]) -> tuple[int, int] | None:
    """First and last row (axis 0) held by the chunk at ``coords``; None for a 0-d array."""
    if not coords or not chunk_shape:
        return None
    b = int(chunk_shape[0])
    first = int(coords[0]) * b
    last = min(first + b, int(shape[0]) if shape else first + b) - 1
    return first, max(first, last)


def storage_error(where: str, key: str, exc: OSError, doing: str = "writing") -> Exception:
    """One-line error for an ``OSError`` raised while ``doing`` object ``key`` of ``where``."""
    obj = f"{where.rstrip('/')}/{key}" if key else where
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on the device while {doing} {obj} ({code}): free space (or use "
                            "another --out) and re-run the same command; everything written before is kept")
    if exc.errno in NOT_WRITABLE:
        return StoreError(f"cannot write {obj}: {reason} ({code}); this command writes into the run: make it "
                          "writable, or copy the run to storage you can write")
    return StorageError(f"{doing} {obj} failed: {reason}{f' ({code})' if code else ''}; re-run the same command "
                        "once the storage works again; everything written before is kept")


# --------------------------------------------------------------------------- the store wrapper


def _split_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """("models/masks", (1, 0)) for "models/masks/c/1/0" (Zarr v3's default chunk keys)."""
    head, sep, tail = key.rpartition("/c/")
    if not sep:
        if key.startswith("c/"):
            head, tail = "", key[2:]
        else:
            return None
    try:
        return head, tuple(int(p) for p in tail.split("/"))
    except ValueError:
        return None


class CheckedStore(WrapperStore):
    """A Zarr store that verifies what it reads and names what fails (see the module docstring).

    ``where`` is the run's address, used in messages.
    """

    def __init__(self, store, where: str = ""):
        super().__init__(store)
        self.where = where or str(store)
        self._arrays: dict[str, dict | None] = {}

    def _with_store(self, store):
        return type(self)(store, self.where)

    def __repr__(self) -> str:
        return f"CheckedStore({self.where!r})"

    def __str__(self) -> str:
        return self.where

    # ------------------------------------------------------------------ reading
    async def get(self, key, prototype, byte_range=None):
        try:
            buf = await self._store.get(key, prototype, byte_range)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise storage_error(self.where, key, e, "reading") from None
        if buf is None:
            return None
        if key.endswith("zarr.json"):
            self._check_json(key, buf.to_bytes())
        elif byte_range is None:
            await self._check_chunk(key, buf)
        return buf

    def _check_json(self, key: str, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            node = key[: -len("zarr.json")].rstrip("/") or "the run's root group"
            raise DamagedStoreError(
                f"{self.where}/{key}: the metadata of {node} is not valid JSON ({str(e).splitlines()[0]}; "
                f"{len(raw)} bytes); it cannot be rebuilt from the run: restore that file from a backup, or "
                f"train into a new --out") from None

    async def _array_meta(self, path: str, *, fresh: bool = False) -> dict | None:
        if fresh or path not in self._arrays:
            from zarr.core.buffer import default_buffer_prototype

            buf = await self._store.get(f"{path}/zarr.json" if path else "zarr.json", default_buffer_prototype())
            meta = None
            if buf is not None:
                try:
                    doc = json.loads(buf.to_bytes())
                    if doc.get("node_type") == "array":
                        meta = {"crc": bool(doc.get("codecs")) and doc["codecs"][-1].get("name") == "crc32c",
                                "chunks": list(doc["chunk_grid"]["configuration"]["chunk_shape"]),
                                "shape": list(doc["shape"])}
                except (ValueError, KeyError, TypeError, AttributeError):
                    meta = None
            self._arrays[path] = meta
        return self._arrays[path]

    async def _check_chunk(self, key: str, buf) -> None:
        parsed = _split_chunk_key(key)
        if parsed is None:
            return
        path, coords = parsed
        meta = await self._array_meta(path)
        if meta is None or not meta["crc"]:
            return
        data = buf.as_numpy_array().view(np.uint8).reshape(-1)
        if len(data) >= 4:
            import google_crc32c

            if np.uint32(google_crc32c.value(data[:-4].tobytes())).tobytes() == data[-4:].tobytes():
                return
            why = "checksum mismatch: the file was changed or cut short after it was written"
        else:
            why = f"{len(data)} bytes, shorter than its checksum: the file was cut short"
        meta = await self._array_meta(path, fresh=True)  # the array may have been made again since
        if meta is None or not meta["crc"]:
            return
        raise damaged_chunk(self.where, path, coords, meta["chunks"], meta["shape"], why)

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, rng) for key, rng in key_ranges]

    async def exists(self, key: str) -> bool:
        try:
            return await self._store.exists(key)
        except OSError as e:
            raise storage_error(self.where, key, e, "reading") from None

    # ------------------------------------------------------------------ writing
    def _forget(self, key: str) -> None:
        if key.endswith("zarr.json"):
            self._arrays.pop(key[: -len("zarr.json")].rstrip("/"), None)
        else:
            self._arrays.clear()  # a directory delete: anything under it may be gone

    async def set(self, key, value) -> None:
        self._forget(key)
        try:
            if key.endswith("zarr.json") and isinstance(self._store, LocalStore) and not self._store.read_only:
                await asyncio.to_thread(replace_file, Path(self._store.root) / key, value.to_bytes())
            else:
                await self._store.set(key, value)
        except OSError as e:
            raise storage_error(self.where, key, e) from None

    async def set_if_not_exists(self, key, value) -> None:
        self._forget(key)
        try:
            await self._store.set_if_not_exists(key, value)
        except OSError as e:
            raise storage_error(self.where, key, e) from None

    async def _set_many(self, values) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key) -> None:
        self._forget(key)
        try:
            await self._store.delete(key)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise storage_error(self.where, key, e, "deleting") from None

    async def delete_dir(self, prefix) -> None:
        self._arrays.clear()
        try:
            await self._store.delete_dir(prefix)
        except OSError as e:
            raise storage_error(self.where, prefix, e, "deleting") from None


def damaged_chunk(where: str, path: str, coords: tuple[int, ...], chunks: list[int], shape: list[int],
                  why: str) -> DamagedStoreError:
    """The one message for a chunk that does not decode: array, chunk, rows, cause, fix."""
    rows = chunk_rows(coords, chunks, shape)
    key = "c/" + "/".join(str(c) for c in coords)
    table = path.endswith(("/masks", "/labels", "/seconds", "/complete", "/keys", "/digests", "/seeds")) or \
        path.rsplit("/", 1)[-1] in ("test_margins", "train_margins", "test_logits", "train_logits",
                                    "test_features", "train_features")
    what = ("" if rows is None else
            f" ({'model rows' if table and '/' in path else 'rows'} {rows[0]}-{rows[1]})")
    return DamagedStoreError(f"{where}/{path}: chunk {key}{what} is damaged ({why}); fix: {fix_for(path, where)}")
