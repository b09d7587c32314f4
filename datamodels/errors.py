"""Typed errors raised at the boundaries (config, data, store, cluster). Each message says what
was expected, what was found, where, and how to fix it.

Bad input (ConfigError, DataError, StoreError) makes the command exit 2; a failure while
running (ClusterError: lost nodes, missing resources, a dead local Ray) exits 1.
"""


class DatamodelsError(Exception):
    """Base class for every error this package raises on bad input."""


class ConfigError(DatamodelsError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(DatamodelsError, FileNotFoundError):
    """A dataset could not be found or read."""


class StoreError(DatamodelsError):
    """A run store cannot be created or opened as asked (incompatible config, unwritable, claimed)."""


class ClusterError(DatamodelsError):
    """The work could not run: the cluster is unreachable, lost, or lacks the resources asked for.

    Nothing written is lost: re-running the same command continues where it stopped.
    """
