"""Where a run lives: a local directory or an fsspec URL (``s3://``, ``gs://``, ``file://``,
``memory://``), opened through Zarr's own stores.

A :class:`Location` is resolved once, by the driver: a local path is made absolute (so a
relative ``--out`` means the driver's working directory, never an actor's), ``file://`` URLs
become local paths, and any other URL goes to fsspec (credentials and endpoints come from the
usual environment, e.g. ``AWS_ENDPOINT_URL`` or ``FSSPEC_S3_ENDPOINT_URL`` for an
S3-compatible server). Nothing else in the package handles run paths as strings.

Besides the Zarr hierarchy, a location holds a few plain objects written whole: the driver's
claim (:mod:`datamodels.claim`) and reports written next to the run (CDF plots).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from datamodels.errors import StoreError

__all__ = ["Location", "is_url", "ray_job_workdir", "replace_file", "save_figure", "write_file"]

_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_url(where: str | os.PathLike) -> bool:
    return isinstance(where, str) and "://" in where


def ray_job_workdir() -> Path | None:
    """The temporary copy of ``--working-dir`` this process runs in under ``ray job submit``
    (Ray deletes it with the job), or None."""
    cwd = Path.cwd()
    if "runtime_resources" in cwd.parts and any(p.startswith("_ray_pkg_") for p in cwd.parts):
        return cwd
    return None


class Location:
    """A run's address: ``url`` is an absolute local path or a URL; picklable."""

    def __init__(self, where: str | os.PathLike | "Location"):
        if isinstance(where, Location):
            self.url, self.local = where.url, where.local
            return
        text = os.fspath(where)
        if not text:
            raise StoreError("run location: expected a directory or a URL, got an empty string")
        if is_url(text):
            scheme = text.split("://", 1)[0].lower()
            if scheme == "file":
                text = text.split("://", 1)[1]
            else:
                self.url, self.local = text.rstrip("/"), False
                self._check_protocol(scheme)
                return
        self.url, self.local = str(Path(text).expanduser().absolute()), True

    @classmethod
    def for_output(cls, where: str | os.PathLike) -> "Location":
        """Like ``Location(where)``, refusing a relative local path inside a ``ray job submit``
        working directory (Ray's temporary copy, deleted with the job)."""
        text = os.fspath(where)
        job = ray_job_workdir()
        if job is not None and not is_url(text) and not Path(text).expanduser().is_absolute():
            raise StoreError(
                f"--out {text!r} is relative, and this driver runs inside Ray's temporary copy of "
                f"--working-dir ({job}), which Ray deletes after the job: pass an absolute path on "
                "storage the head node keeps, or a URL (s3://bucket/run)")
        return cls(text)

    def _check_protocol(self, scheme: str) -> None:
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except ValueError:
            raise StoreError(f"{self.url}: unknown storage protocol {scheme!r} "
                             f"(expected a local path or one of s3://, gs://, file://, memory://)") from None
        except ImportError:
            pkg = _EXTRAS.get(scheme, f"the fsspec package for {scheme}://")
            raise StoreError(f"{self.url}: {scheme}:// storage needs {pkg}: pip install {pkg}") from None

    # ------------------------------------------------------------------ identity
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def path(self) -> Path:
        """The local directory (StoreError for a URL)."""
        if not self.local:
            raise StoreError(f"{self.url} is not on the local filesystem")
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def sibling(self, name: str) -> "Location":
        """The location ``name`` next to this one (same parent directory or prefix)."""
        parent = self.url.rstrip("/").rsplit("/", 1)[0]
        return Location(f"{parent}/{name}") if not self.local else Location(Path(self.url).parent / name)

    def child(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, *, read_only: bool = False):
        """A Zarr store rooted here, wrapped in :class:`~datamodels.integrity.CheckedStore` (every
        chunk's checksum verified on read; a failed write named in one line)."""
        from datamodels.integrity import CheckedStore

        return CheckedStore(self._raw_zarr_store(read_only=read_only), self.url)

    def _raw_zarr_store(self, *, read_only: bool = False):
        """LocalStore for a directory, FsspecStore for a URL."""
        import zarr

        if self.local:
            return zarr.storage.LocalStore(self.url, read_only=read_only)
        try:
            return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)
        except ImportError as e:
            raise StoreError(f"{self.url}: {e}") from None

    # ------------------------------------------------------------------ plain objects
    def _fs(self):
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root

    def exists(self, key: str = "") -> bool:
        if self.local:
            return Path(self.child(key)).exists()
        fs, root = self._fs()
        return fs.exists(f"{root}/{key}" if key else root)

    def is_empty(self) -> bool:
        """True when nothing is stored here (a missing directory or prefix counts as empty)."""
        if self.local:
            p = Path(self.url)
            return not p.exists() or (p.is_dir() and not any(p.iterdir()))
        fs, root = self._fs()
        try:
            return not fs.ls(root, detail=False)
        except FileNotFoundError:
            return True

    def read_bytes(self, key: str) -> bytes | None:
        """The object ``key`` (relative to this location), or None when it does not exist."""
        try:
            if self.local:
                return Path(self.child(key)).read_bytes()
            fs, root = self._fs()
            return fs.cat_file(f"{root}/{key}")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise _storage_error(self.url, key, e, "reading") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` whole: readers see the old or the new object, never a part (local files
        are written to a temporary name and renamed; an object store PUT is atomic)."""
        try:
            if self.local:
                replace_file(Path(self.child(key)), data)
                return
            fs, root = self._fs()
            fs.pipe_file(f"{root}/{key}", data)
        except OSError as e:
            raise _storage_error(self.url, key, e, "writing") from None

    def delete(self, key: str, *, recursive: bool = False) -> None:
        """Remove ``key`` (a missing one is fine)."""
        try:
            if self.local:
                import shutil

                p = Path(self.child(key))
                if p.is_dir() and recursive:
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
                return
            fs, root = self._fs()
            fs.rm(f"{root}/{key}" if key else root, recursive=recursive)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _storage_error(self.url, key, e, "deleting") from None

    def check_writable(self) -> None:
        """Fail early, before anything is written, if a store cannot be created here."""
        if not self.local:
            return  # an object store answers on the first write; the claim is that write
        path = Path(self.url)
        if path.exists() and not path.is_dir():
            raise StoreError(f"cannot create run store at {path}: a file of that name exists")
        parent = path
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise StoreError(f"cannot create run store at {path}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(f"cannot create run store at {path}: {parent} is not writable")
        try:
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            raise StoreError(f"cannot create run store at {path}: {parent} is on a read-only file system; "
                             "choose a writable --out")
        if parent != path and parent.resolve().parts[1:2] in (("proc",), ("sys",), ("dev",)):
            raise StoreError(f"cannot create run store at {path}: {parent} is a kernel file system "
                             f"(/{parent.resolve().parts[1]}), not storage; choose another --out")


def _storage_error(where: str, key: str, exc: OSError, doing: str):
    from datamodels.integrity import storage_error

    return storage_error(where, key, exc, doing)


def replace_file(path: Path, data: bytes) -> None:
    """Write a local file whole (temporary file, then rename): a full disk or a kill leaves the
    old file, never a part of the new one. Object stores' PUTs are whole already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, where: str | os.PathLike, *, dpi: int = 100) -> str:
    """Write a matplotlib figure as PNG at a local path or URL, close it; return where it went."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_file(where, buf.getvalue())


def write_file(where: str | os.PathLike, data: bytes) -> str:
    """Write a whole file at a local path or URL (a report next to a run); return where it went."""
    loc = Location(where)
    parent, _, name = loc.url.rstrip("/").rpartition("/")
    Location(parent if not loc.local else Path(loc.url).parent).write_bytes(name, data)
    return loc.url
