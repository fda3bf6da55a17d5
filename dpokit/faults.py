"""Fault points: named places in dpokit's writers and loop where a test can kill the process or make
a write fail, to prove that nothing is lost when the real fault happens there.

A fault is armed by the environment variable ``DPOKIT_FAULT`` (read once, at import) or by `arm`
(tests in one process). Its form is ``POINT[#HIT][:ACTION][@RANK]``, several joined by ``;``:

* POINT: a name `reach` is called with, e.g. ``step.optimizer``, ``checkpoint.file:optimizer.pt``,
  ``checkpoint.publish``, ``final.file:model.safetensors``, ``final.publish``, ``metrics.write``
  (`POINTS` lists them all; a name ending in ``*`` matches every name that starts with the rest);
* HIT: fire the HIT-th time the point is reached (1-based; default 1), e.g. ``step.optimizer#7``
  kills inside the 7th optimizer step of this process;
* ACTION: ``kill`` (default: SIGKILL, no handler runs), ``torn`` (cut the file just written to
  half of what this call wrote, then SIGKILL: a kill in the middle of writing it), or an I/O
  error raised as `OSError`: ``enospc`` (disk full), ``eio`` (I/O error), ``erofs`` (read-only
  file system);
* RANK: fire only in the process of that rank (``RANK`` of torchrun / accelerate launch).

Unset, `reach` costs one test of an empty tuple. Imports only the standard library.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV = "DPOKIT_FAULT"

# Every point dpokit reaches, for the test matrix and for a helpful error on a misspelt one.
POINTS = (
    "step.optimizer",  # after optimizer.step(), before the scheduler steps and the step is counted
    "checkpoint.file:",  # + a file name: after that file of a checkpoint is written (before the next one)
    "checkpoint.publish",  # a checkpoint fully written in .tmp-step-N, before it is renamed to step-N
    "final.file:",  # + a path under the run folder: after that file of the final save is staged
    "final.publish",  # the final save staged; after its first file was renamed into place
    "final.marker",  # everything in place, before run_complete.json is written
    "metrics.write",  # after one row of metrics.jsonl is written
)

_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}
_ACTIONS = ("kill", "torn", *_ERRORS)


@dataclass
class Fault:
    point: str
    hit: int = 1
    action: str = "kill"
    rank: int | None = None
    seen: int = 0

    def matches(self, point: str) -> bool:
        return point.startswith(self.point[:-1]) if self.point.endswith("*") else point == self.point


def parse(spec: str) -> tuple[Fault, ...]:
    """The faults of a DPOKIT_FAULT value; a malformed one raises ValueError naming it."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        text, rank = part, None
        if "@" in text:
            text, _, r = text.rpartition("@")
            rank = int(r)
        action = "kill"
        if text.rsplit(":", 1)[-1] in _ACTIONS and ":" in text:
            text, _, action = text.rpartition(":")
        point, _, hit = text.partition("#")
        known = any(point == p or (p.endswith(":") and point.startswith(p)) for p in POINTS) or point.endswith("*")
        if not known or (hit and not hit.isdigit()):
            raise ValueError(f"{ENV}: cannot read '{part}' (POINT[#HIT][:ACTION][@RANK]; points: {', '.join(POINTS)})")
        faults.append(Fault(point, int(hit or 1), action, rank))
    return tuple(faults)


ARMED: tuple[Fault, ...] = parse(os.environ.get(ENV, ""))


def arm(spec: str) -> None:
    """Replace the armed faults (tests); an empty string disarms them."""
    global ARMED
    ARMED = parse(spec)


def reach(point: str, path: Path | str | None = None, written: int = 0) -> None:
    """Called by dpokit where a fault may strike; `path` / `written`: the file just written and the
    bytes this call wrote to it (for ``torn``)."""
    if not ARMED:
        return
    for fault in ARMED:
        if fault.matches(point) and (fault.rank is None or fault.rank == _rank()):
            fault.seen += 1
            if fault.seen == fault.hit:
                _strike(fault, point, path, written)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _strike(fault: Fault, point: str, path: Path | str | None, written: int) -> None:
    if fault.action in _ERRORS:
        code = _ERRORS[fault.action]
        raise OSError(code, os.strerror(code), str(path) if path is not None else point)
    if fault.action == "torn" and path is not None and Path(path).is_file():
        size = Path(path).stat().st_size
        os.truncate(path, size - (written or size) // 2)  # half of what this call wrote is lost
    os.kill(os.getpid(), signal.SIGKILL)
