"""User-facing errors.

Everything a user can fix (a bad row, a bad config value, a missing file) raises a subclass of
`DpokitError`. The CLI prints its message and exits with status 2, without a traceback unless
`--debug` is given. A failed write (disk full, I/O error, read-only file system) is a `WriteError`,
exit status 74. Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


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


class WriteError(DpokitError):
    """Writing a file failed for a reason outside dpokit: the disk is full, the device reports an
    I/O error, the file system went read-only. The CLI exits with `WriteError.exit_code`.

    `path` is the file (or folder) being written, `reason` the system's words for what went wrong;
    `what` (the checkpoint of step 10, the final save) and `then` (what is kept, how to go on) are
    filled in by the layer that knows them (`elaborate`)."""

    exit_code = 74  # EX_IOERR of sysexits.h: an error while doing I/O on some file

    def __init__(self, path: str, reason: str, what: str = "", then: str = ""):
        self.path, self.reason, self.what, self.then = str(path), reason, what, then
        head = f"could not write {what} ({self.path})" if what else f"could not write {self.path}"
        super().__init__(f"{head}: {reason}" + (f". {then}" if then else ""))

    def elaborate(self, what: str | None = None, then: str | None = None) -> WriteError:
        """The same failure with the context of a higher layer."""
        return WriteError(self.path, self.reason, self.what if what is None else what, self.then if then is None else then)


# How torch (its zip writer), safetensors (Rust's io::Error) and tokenizers word a failed write,
# where they raise RuntimeError or their own exception type instead of OSError.
_IO_WORDS = (
    "No space left on device", "Input/output error", "Read-only file system", "Disk quota exceeded",
    "StorageFull", "ReadOnlyFilesystem", "unexpected pos", "iostream error", "file write failed",
    "inline_container",
)  # fmt: skip


def io_reason(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str | None:
    """The reason an exception raised while writing a file is an I/O failure (the system's words,
    e.g. "No space left on device"), or None when it is some other error (a bug: not hidden).

    torch's zip writer reports a full disk only as "unexpected pos ..."; given the `path` written,
    the free space of its disk tells whether that is what happened."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    text = str(exc)
    for words in _IO_WORDS[:4]:
        if words in text:
            return words
    if not any(words in text for words in _IO_WORDS[4:]):
        return None
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    free = _free_bytes(path) if path is not None else None
    if free is not None and free < _NEARLY_FULL:
        return f"No space left on device ({free / 2**20:.1f} MiB free; the writer said: {first})"
    return f"{first} (the disk may be full or failing)"


_NEARLY_FULL = 64 * 2**20  # bytes: less than this free after a failed write is a full disk


def _free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the disk of `path` (or of its nearest existing parent); None if unknown."""
    folder = os.path.abspath(path)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Run a block that writes `what` (e.g. "metrics.jsonl") at `path`: an I/O failure inside it
    becomes a `WriteError` naming both; any other exception passes through untouched."""
    try:
        yield
    except WriteError as exc:
        raise exc.elaborate(what=exc.what or what) from None
    except Exception as exc:
        reason = io_reason(exc, path)
        if reason is None:
            raise
        raise WriteError(str(getattr(exc, "filename", None) or path), reason, what) from None
