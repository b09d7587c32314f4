"""Typed errors raised at the boundaries (config, data, store). Each message says what was
expected, what was found, and where."""


class DatamodelsError(Exception):
    """Base class for every error this package raises on bad input."""


class ConfigError(DatamodelsError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(DatamodelsError, FileNotFoundError):
    """A dataset could not be found or read."""


class StoreError(DatamodelsError):
    """A run store cannot be created or opened as asked (incompatible config, unwritable, locked)."""
