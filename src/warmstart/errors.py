"""One home for user-facing errors.

The library raises a `WarmstartError` subclass whenever the *input* is wrong
(a file, a flag, a dataset, a plan). The CLI turns each into one line on stderr
and exit code 1; a traceback appears only with ``--debug`` or
``WARMSTART_DEBUG=1``. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class WarmstartError(Exception):
    """An error caused by the user's input, with a hint on what to do next."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        tail = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{tail}"


class CheckpointError(WarmstartError):
    """A checkpoint cannot be found, recognised or read."""


class IncompatibleError(WarmstartError):
    """Checkpoints that cannot be combined (architecture, base, shapes)."""


class LibraryError(WarmstartError):
    """The catalog database is missing, locked, corrupt or too new."""


class DataError(WarmstartError):
    """A target dataset is missing, empty or malformed."""


class ConfigError(WarmstartError):
    """A plan, config file or set of flags is invalid."""


class OutputExistsError(WarmstartError):
    """An output is already there and --force was not given."""


__all__ = [
    "WarmstartError",
    "CheckpointError",
    "IncompatibleError",
    "LibraryError",
    "DataError",
    "ConfigError",
    "OutputExistsError",
]
