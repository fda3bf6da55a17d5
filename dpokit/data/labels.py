"""Human feedback on disk: the candidates file people label, and the labels file they write.

Candidates (`dpokit sample` writes them, `dpokit label` shows them), one JSON object per line::

    {"id": "c0007", "prompt": "Write a review of ..." | [{"role": "user", "content": "..."}],
     "responses": ["first sampled response", "second sampled response", ...],
     "model": "smollm2-135m-instruct"}                      # optional, free-form provenance

``id`` is unique in the file (a string; `dpokit sample` numbers prompts); ``responses`` holds at
least one string (binary mode labels one response) and at least two for pair mode.

Labels (`dpokit label` appends them, `dpokit agreement` reads them), one JSON object per line,
append-only: a label is never rewritten; an undo is a row of its own::

    {"type": "label", "id": "ann-1f3a9c", "item": "c0007", "annotator": "ann", "mode": "pair",
     "shown": [1, 0], "choice": "A", "preferred": 1, "confidence": 2, "reason": "...", "time": 1764570000.0}
    {"type": "label", "id": "bob-77d01e", "item": "c0007", "annotator": "bob", "mode": "binary",
     "shown": [0], "choice": "down", "label": false, "confidence": null, "reason": "", "time": ...}
    {"type": "undo", "id": "ann-1f3a9c", "annotator": "ann", "time": 1764570009.5}

- ``shown`` is the display order, response indexes into the candidate's ``responses``: in pair
  mode A (left) is ``shown[0]`` and B (right) ``shown[1]``; the order is randomised per item and
  kept, which is what measures position bias.
- ``choice``: pair mode ``A | B | tie | skip``; binary mode ``up | down | skip``.
- ``preferred`` (pair mode) is the response index the person chose (null for tie / skip);
  ``label`` (binary mode) is true for up, false for down, null for skip.
- ``confidence`` is 1 (unsure) .. 3 (sure) or null; ``reason`` a short free text.
- An undo withdraws the label with that ``id``; the annotator may then label the item again.

`read_labels` resolves undos and returns the labels in force, oldest first. A torn last line (the
writer was killed mid-row) is ignored with a warning, not an error: the row was never acknowledged.

`LabelsWriter` appends rows: one JSON line each, flushed and fsynced, under a process-wide lock and
an exclusive ``fcntl.flock`` on the file (where there is fcntl), so that threads and processes
writing one file never interleave; a torn last line is cut off before the next row goes after it.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

try:
    import fcntl
except ImportError:  # Windows: the process-wide lock only
    fcntl = None  # type: ignore[assignment]

from dpokit.data.files import read_rows, row_error, shown

PAIR_CHOICES = ("A", "B", "tie", "skip")
BINARY_CHOICES = ("up", "down", "skip")
Mode = Literal["pair", "binary"]


@dataclass(frozen=True)
class Candidate:
    """One prompt and the sampled responses a person compares (pair mode) or rates (binary mode)."""

    id: str
    prompt: str | list[dict[str, str]]
    responses: tuple[str, ...]
    model: str = ""

    def prompt_text(self) -> str:
        """The prompt as plain text: the last user turn of a conversation, or the string itself."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


@dataclass(frozen=True)
class Label:
    """One person's judgement of one candidate, as in force after undos."""

    id: str
    item: str
    annotator: str
    mode: Mode
    shown: tuple[int, ...]
    choice: str
    preferred: int | None = None  # pair mode: index into responses; None for tie / skip
    label: bool | None = None  # binary mode: True = up, False = down, None = skip
    confidence: int | None = None
    reason: str = ""
    time: float = 0.0

    def as_row(self) -> dict[str, Any]:
        """The labels-file row for this label."""
        row: dict[str, Any] = {"type": "label", "id": self.id, "item": self.item, "annotator": self.annotator,
                               "mode": self.mode, "shown": list(self.shown), "choice": self.choice}  # fmt: skip
        if self.mode == "pair":
            row["preferred"] = self.preferred
        else:
            row["label"] = self.label
        row.update(confidence=self.confidence, reason=self.reason, time=self.time)
        return row


def make_label(
    *, id: str, item: Candidate, annotator: str, mode: Mode, shown: Sequence[int], choice: str,
    confidence: int | None = None, reason: str = "", time: float = 0.0,
) -> Label:  # fmt: skip
    """A checked `Label` for `item` (raises ValueError on a choice, order or confidence that cannot be)."""
    n = len(item.responses)
    shown = tuple(int(i) for i in shown)
    want = 2 if mode == "pair" else 1
    if len(shown) != want or len(set(shown)) != want or not all(0 <= i < n for i in shown):
        raise ValueError(f"shown must hold {want} distinct response indexes of item {item.id!r} (0..{n - 1})")
    choices = PAIR_CHOICES if mode == "pair" else BINARY_CHOICES
    if choice not in choices:
        raise ValueError(f"choice {choice!r} is not one of {', '.join(choices)}")
    if confidence is not None and confidence not in (1, 2, 3):
        raise ValueError("confidence must be 1, 2, 3 or null")
    preferred = {"A": shown[0], "B": shown[-1]}.get(choice) if mode == "pair" else None
    label = {"up": True, "down": False}.get(choice) if mode == "binary" else None
    return Label(id=id, item=item.id, annotator=annotator, mode=mode, shown=shown, choice=choice,
                 preferred=preferred, label=label, confidence=confidence, reason=reason, time=time)  # fmt: skip


def read_candidates(path: str | Path) -> list[Candidate]:
    """The candidates of a JSONL file, in file order; a malformed row raises DataError naming file and row."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for row_no, row in read_rows(path):
        cid, prompt, responses = row.get("id"), row.get("prompt"), row.get("responses")
        if not isinstance(cid, str) or not cid:
            raise row_error(path, row_no, "needs a non-empty string 'id'", "id")
        if cid in seen:
            raise row_error(path, row_no, f"id {cid!r} appears twice", "id")
        if not (isinstance(prompt, str) or _is_messages(prompt)):
            raise row_error(path, row_no, "'prompt' must be a string or a list of {role, content} messages", "prompt")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise row_error(path, row_no, "'responses' must be a non-empty list of strings", "responses")
        seen.add(cid)
        out.append(Candidate(cid, prompt, tuple(responses), str(row.get("model") or "")))
    if not out:
        raise row_error(path, 0, "holds no candidates")
    return out


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value))  # fmt: skip


def read_labels(paths: str | Path | Iterable[str | Path]) -> list[Label]:
    """The labels in force in one or more labels files (undos applied), oldest first.

    A row that is not valid JSON is an error naming file and row, except a torn final line (a
    writer killed mid-row), which is skipped with a warning.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    labels: dict[str, Label] = {}
    for path in paths:
        for row in _label_rows(Path(path)):
            if row.get("type") == "undo":
                labels.pop(str(row.get("id")), None)
            else:
                lab = _label_of(path, row)
                labels[lab.id] = lab
    return sorted(labels.values(), key=lambda lab: lab.time)


def _label_rows(path: Path) -> list[dict[str, Any]]:
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the writer stopped mid-row
                warnings.warn(f"{shown(path)}: ignoring a torn last line (row {i}, never completed)", stacklevel=3)
                continue
            raise row_error(path, i, f"is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or row.get("type") not in ("label", "undo"):
            raise row_error(path, i, "must be an object with type 'label' or 'undo'", "type")
        row["_row"] = i
        rows.append(row)
    return rows


def _label_of(path: Path, row: dict[str, Any]) -> Label:
    i = row["_row"]
    for key in ("id", "item", "annotator"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise row_error(path, i, f"needs a non-empty string {key!r}", key)
    mode = row.get("mode")
    choices = {"pair": PAIR_CHOICES, "binary": BINARY_CHOICES}.get(mode)  # type: ignore[arg-type]
    if choices is None or row.get("choice") not in choices:
        raise row_error(path, i, f"mode {mode!r} / choice {row.get('choice')!r} is not a valid pair or binary label")
    shown_ = row.get("shown")
    if not isinstance(shown_, list) or not all(isinstance(s, int) for s in shown_):
        raise row_error(path, i, "'shown' must be a list of response indexes", "shown")
    return Label(id=row["id"], item=row["item"], annotator=row["annotator"], mode=mode, shown=tuple(shown_),
                 choice=row["choice"], preferred=row.get("preferred"), label=row.get("label"),
                 confidence=row.get("confidence"), reason=str(row.get("reason") or ""),
                 time=float(row.get("time") or 0.0))  # fmt: skip


_APPEND_LOCK = threading.Lock()  # one writer at a time in this process (flock alone does not order threads)


class LabelsWriter:
    """The labels file held for appending: ``with LabelsWriter(path) as w: w.read(); w.append(rows)``.

    While it is held no other `LabelsWriter` (thread or process) can write the file, so a caller may
    read the labels in force, decide, and append, without a row slipping in between. Creates the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None

    def __enter__(self) -> LabelsWriter:
        _APPEND_LOCK.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+b")  # noqa: SIM115 -- closed in __exit__
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        try:
            if self._file is not None:
                if fcntl is not None:
                    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._file.close()
        finally:
            self._file = None
            _APPEND_LOCK.release()

    def read(self) -> list[Label]:
        """The labels in force in the file (`read_labels`), as this writer holds it."""
        return read_labels(self.path) if self.path.stat().st_size else []

    def append(self, rows: Iterable[Label | dict[str, Any]]) -> None:
        """Append `rows` (labels or undo rows), one JSON line each, then flush and fsync."""
        if self._file is None:
            raise RuntimeError("LabelsWriter.append outside its `with` block")
        data = b"".join(json.dumps(r.as_row() if isinstance(r, Label) else r, ensure_ascii=False).encode() + b"\n"
                        for r in rows)  # fmt: skip
        self._end_cleanly(self._file)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _end_cleanly(self, f: IO[bytes]) -> None:
        """Make the file end with a newline: complete a last row that only lacks one, cut off a torn one."""
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        start = size
        while start > 0:  # back to the newline before the last line
            step = min(start, 65536)
            f.seek(start - step)
            block = f.read(step)
            at = block.rfind(b"\n")
            if at >= 0:
                start = start - step + at + 1
                break
            start -= step
        f.seek(start)
        tail = f.read()
        if not tail:
            return
        try:
            json.loads(tail)
        except ValueError:
            warnings.warn(f"{shown(self.path)}: cutting off a torn last line (never completed)", stacklevel=3)
            f.truncate(start)
        else:
            f.write(b"\n")


def append_labels(path: str | Path, rows: Iterable[Label | dict[str, Any]]) -> None:
    """Append `rows` to the labels file `path` under its locks (see `LabelsWriter`)."""
    with LabelsWriter(path) as writer:
        writer.append(rows)
