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

RUN_COMPLETE = "run_complete.json"  # written last into a training run's folder: the run finished


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


def fsync(path: Path) -> None:
    """Flush a written file to the disk (a rename after it then never publishes lost data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and flush it to the disk before returning."""
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def tree_size(folder: Path) -> int:
    """The bytes of the files under `folder`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some file systems refuse to fsync a folder, which is fine."""
    try:
        fsync(path)
    except OSError:
        pass


def unfinished_run(folder: Path) -> bool:
    """Is `folder` (or the run folder it is the ``merged/`` model of) a dpokit training run that did
    not finish? Its model files may be missing, partial or from an older save: only a run with
    `RUN_COMPLETE` is read as a model."""
    for run in (folder, folder.parent) if folder.name == "merged" else (folder,):
        if (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file() and not (run / RUN_COMPLETE).is_file():
            return True
    return False
