"""User-facing errors.

Everything a user can fix (a bad row, a bad config value, a missing file) raises a subclass of
`DpokitError`. The CLI prints its message and exits with status 2, without a traceback unless
`--debug` is given. Imports only the standard library.
"""

from __future__ import annotations


class DpokitError(Exception):
    """An error the user can act on; its message is shown verbatim."""


class ConfigError(DpokitError):
    """A config key, type or value is wrong."""


class DataError(DpokitError):
    """A data file or row is unusable. The message names the file, the row and the field."""

    def __init__(self, path: str, message: str, row: int | None = None, field: str | None = None):
        self.path = path
        self.row = row
        self.field = field
        self.detail = message
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ModelError(DpokitError):
    """A model or tokenizer cannot be loaded or used as asked."""
