"""Writing files so that a reader sees the old file or the new one, never half of one.

`atomic_write` is the one way dpokit's caches write a file: into a temporary file in the same
folder (so the rename cannot cross file systems), then `os.replace` onto the final name; a failure
at any point removes the temporary file and re-raises. Imports the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Create `path` by calling `write(temporary_path)` and renaming the result into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
