"""Typed errors raised at the boundaries (config, data, store, cluster). Each message says what
was expected, what was found, where, and how to fix it -- on one line.

Bad input (ConfigError, DataError, StoreError and their subclasses) makes the command exit 2;
a failure while running (RunError: ClusterError, StorageError) exits 1. Either way nothing
already written is lost: re-running the same command continues where it stopped.
"""

import errno as _errno


class DatamodelsError(Exception):
    """Base class for every error this package raises on bad input."""


class ConfigError(DatamodelsError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, out of range)."""


class DivergenceError(ConfigError):
    """Most models of a run trained to non-finite outputs: the recipe diverges (names the setting)."""


class DataError(DatamodelsError, FileNotFoundError):
    """A dataset could not be found or read."""


class StoreError(DatamodelsError):
    """A run store cannot be created or opened as asked (incompatible config, unwritable, claimed)."""


class DamagedStoreError(StoreError):
    """Part of a run store does not decode (checksum mismatch, truncated file, unreadable
    metadata) or a whole row holds values no training writes; names the array, the chunk and
    the model rows, and the repair (`datamodels check RUN --repair`)."""


class RunError(DatamodelsError):
    """The work could not finish for a reason outside its input (exit 1).

    Nothing written is lost: re-running the same command continues where it stopped.
    """


class ClusterError(RunError):
    """The work could not run: the cluster is unreachable, lost, or lacks the resources asked for.

    Nothing written is lost: re-running the same command continues where it stopped.
    """


class StorageError(RunError):
    """Reading or writing the run's storage failed (disk full, I/O error, lost connection)."""


# errno values that mean "this place is not writable" (bad input: choose another place), as
# opposed to "the write failed" (disk full, I/O error: a runtime failure).
NOT_WRITABLE = {_errno.EACCES, _errno.EPERM, _errno.EROFS}
