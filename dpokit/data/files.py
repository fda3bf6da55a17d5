"""Data files -> rows: the file formats dpokit reads and the errors that name file and row.

Files (`expand_files`, `read_rows`)
    ``.jsonl``      one JSON object per line; blank lines skipped. Rows are numbered by line (1-based).
    ``.json``       a list of objects, or an object with one key holding that list ({"train": [...]});
                    a ``.json`` file holding JSON Lines (what ``Dataset.to_json`` writes) is read as JSONL.
                    Rows are numbered by list index (0-based).
    ``.csv``        header row + text columns (prompt, chosen, rejected). Rows are numbered by the line
                    the record starts on (1-based, header = line 1). Text only: no message lists.
    ``.parquet``    rows numbered by index (0-based).
    folder          written by ``datasets.Dataset.save_to_disk`` (has dataset_info.json / state.json),
                    rows numbered by index (0-based); any other folder = its data files (not recursive).
    A UTF-8 BOM is stripped and CRLF line ends are accepted everywhere. Compressed, binary or UTF-16
    files and files without a single row are refused with a message saying so.

What a row must hold is the business of the row kind that reads it (`dpokit.data.pairs` for
preference pairs).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpokit import resources
from dpokit.errors import DataError, DpokitError

__all__ = ["expand_files", "read_rows", "read_prompts", "records", "describe_row", "row_error", "type_name", "Unreadable", "DATA_SUFFIXES"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# ----------------------------------------------------------------------------------------------
# Locating rows in error messages


def describe_row(path: str | Path, row: int) -> str:
    """How a row number reads to a user: "line 7" for line-oriented files, else "row 6 (0-based)"."""
    return f"line {row}" if _is_line_oriented(Path(path)) else f"row {row} (0-based)"


def _is_line_oriented(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in (".jsonl", ".csv") or (suffix == ".json" and _json_is_lines(str(path)))


def _located_error(path: str | Path, where: str, message: str, row: int | None, field: str | None) -> DataError:
    err = DataError(str(path), message, row=row, field=field)
    # DataError renders "row N"; re-render so JSONL/CSV say "line N" (what an editor jumps to) and
    # index-based files say their index is 0-based. path/row/field attributes stay structured.
    err.args = (f"{path}, {where}" + (f", field '{field}'" if field else "") + f": {message}",)
    return err


def row_error(path: str | Path, row: int, message: str, field: str | None = None) -> DataError:
    return _located_error(path, describe_row(path, row), message, row, field)


def _line_error(path: str | Path, line: int, message: str) -> DataError:
    return _located_error(path, f"line {line}", message, line, None)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------
# Files


def expand_files(specs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve files, globs and folders to the data files / save_to_disk folders to read, in order.

    A folder written by `datasets.Dataset.save_to_disk` is returned as is; any other folder expands
    to its data files (sorted, not recursive). Duplicates are removed, keeping the first.
    ``builtin:toy/train.jsonl`` names data shipped in the package (`dpokit.resources`).
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: list[Path] = []
    for spec in map(str, specs):
        if resources.is_builtin(spec):
            spec = str(resources.resolve_builtin(spec))
        if Path(spec).exists():
            candidates = [Path(spec)]
        elif any(ch in spec for ch in "*?["):
            candidates = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            if not candidates:
                raise DataError(spec, "no file matches this pattern")
        else:
            raise DataError(spec, "no such file or folder")
        for path in candidates:
            found.extend(_expand_path(path))
    if not found:
        raise DataError("data", "no data files given")
    return list(dict.fromkeys(found))


def _expand_path(path: Path) -> list[Path]:
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        files = [p for p in children if (p.is_file() and p.suffix.lower() in DATA_SUFFIXES) or _is_saved_dataset(p)]
        if not files:
            names = [p.name + ("/" if p.is_dir() else "") for p in children]
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise DataError(
                str(path),
                f"folder has no data files (expected {', '.join(DATA_SUFFIXES)} files or a save_to_disk folder; "
                f"it holds {shown or 'nothing'})",
            )
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(str(path), _unsupported(path))
    return [path]


def _unsupported(path: Path) -> str:
    what = f"'{path.suffix}'" if path.suffix else "(no extension)"
    return f"unsupported file type {what}; expected one of {', '.join(DATA_SUFFIXES)} (the extension picks the reader)"


def _is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


@dataclass
class Unreadable:
    """A record that could not be parsed into a row: skippable under data.on_bad_row=skip."""

    error: DataError
    text: str | None  # the record's raw text (lossily decoded), for skipped.jsonl


_Record = tuple[int, "dict[str, Any] | Unreadable"]


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, row) for every record of one file; see the module docstring for numbering."""
    for rownum, value in records(Path(path)):
        if isinstance(value, Unreadable):
            raise value.error
        yield rownum, value


def records(path: Path) -> Iterator[_Record]:
    """Like `read_rows`, but a record that cannot be parsed is yielded as `Unreadable`, not raised.

    File-level problems (missing, binary, not a JSON document, no chosen/rejected columns) still raise:
    no row of such a file can be trusted, so there is nothing to skip.
    """
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(str(path), _unsupported(path))
    if not path.is_file():
        raise DataError(str(path), "no such file")
    if reader is not _read_parquet:
        _refuse_binary(path)
    yield from reader(path)


# Leading bytes of files that are not UTF-8 text: a clear message beats "invalid UTF-8 at line 1".
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive; extract it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first (zstd -d)"),
    (b"BZh", "bzip2-compressed; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it first (unxz)"),
    (b"PAR1", "a Parquet file; give it the .parquet extension"),
    (b"\xff\xfe", "UTF-16 text; re-save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text; re-save it as UTF-8"),
)


def _refuse_binary(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8192)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(str(path), f"expected UTF-8 text, but the file is {what}")
    if b"\x00" in head:  # never in UTF-8 JSON or CSV text
        line = 1 + head.count(b"\n", 0, head.index(b"\x00"))
        raise _line_error(path, line, "expected UTF-8 text, but the file is binary (it holds NUL bytes)")


def _decode(path: Path, raw: bytes, first_line: int = 1) -> str:
    """UTF-8 decode with the BOM stripped; a bad byte is reported with its line number."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise _line_error(
            path, line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _as_object(path: Path, where: str, row: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _not_object(path, where, row, value)
    return value


def _not_object(path: Path, where: str, row: int, value: Any) -> DataError:
    return _located_error(path, where, f"expected a JSON object, got {type_name(value)}", row, None)


def _read_jsonl(path: Path) -> Iterator[_Record]:
    first = True
    with path.open("rb") as f:
        # Split on b"\n" only (not str.splitlines): U+2028 etc. may legally sit inside JSON strings.
        for lineno, raw in enumerate(f, start=1):
            try:
                text = _decode(path, raw, first_line=lineno).strip()  # strip() also drops the CR of CRLF
            except DataError as e:
                yield lineno, Unreadable(e, raw.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            if not text:
                continue
            # A pretty-printed JSON document saved as .jsonl fails on its first line; say what it is.
            hint = "; the file looks like one JSON document: name it .json" if first and text[0] == "[" else ""
            first = False
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n"):  # only the last line lacks a line end
                    hint += "; the last line has no line end, so the file looks truncated"
                error = _line_error(path, lineno, f"invalid JSON ({_json_problem(e)}){hint}")
                yield lineno, Unreadable(error, text)
                continue
            if isinstance(value, dict):
                yield lineno, value
            else:
                error = _not_object(path, f"line {lineno}", lineno, value)
                error.args = (error.args[0] + hint,)
                yield lineno, Unreadable(error, text)


def _json_problem(e: json.JSONDecodeError) -> str:
    """json's message with its column: "expecting ',' delimiter at column 34"."""
    message = e.msg[:1].lower() + e.msg[1:]
    at = " column" if message.endswith(" at") else " at column"  # "Unterminated string starting at"
    return f"{message}{at} {e.colno}"


def _json_is_lines(path: str) -> bool:
    """True if a .json file holds JSON Lines (several top-level values) rather than one document."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _json_is_lines_cached(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=256)
def _json_is_lines_cached(path: str, mtime_ns: int, size: int) -> bool:
    # Keyed on mtime and size too, so a file rewritten in place is classified afresh.
    try:
        json.loads(_decode(Path(path), Path(path).read_bytes()))
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"
    except (OSError, DataError):
        return False
    return False


def _read_json(path: Path) -> Iterator[_Record]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file, as Dataset.to_json writes by default
            yield from _read_jsonl(path)
            return
        # An unterminated string runs to the end of the file; other errors at the very end mean it stops early.
        ends_early = e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
        truncated = "; the document ends early, so the file looks truncated" if ends_early else ""
        raise _line_error(path, e.lineno, f"invalid JSON ({_json_problem(e)}){truncated}") from None
    if isinstance(data, dict) and "chosen" in data:
        data = [data]  # a single row
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        raise DataError(
            str(path),
            f"expected a list of rows or an object with one key holding that list, got {type_name(data)}{keys}",
        )
    for i, value in enumerate(data):
        if isinstance(value, dict):
            yield i, value
        else:
            yield i, Unreadable(_not_object(path, f"row {i} (0-based)", i, value), json.dumps(value)[:1000])


def _require_columns(path: Path, columns: Sequence[str], header_line: int | None = None) -> None:
    """A table without chosen/rejected columns is the wrong file (or needs renaming), not N bad rows."""
    for name in ("chosen", "rejected"):
        if name not in columns:
            found = ", ".join(map(str, columns)) or "none"
            message = f"no '{name}' column; expected prompt/chosen/rejected columns, found: {found}"
            if header_line is None:
                raise DataError(str(path), message, field=name)
            raise _located_error(path, f"line {header_line} (header)", message, header_line, name)


def _read_csv(path: Path) -> Iterator[_Record]:
    text = _decode(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long responses exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        header = [name.strip() for name in next(reader, [])]
        if header:
            _require_columns(path, header, header_line=1)
        start = reader.line_num + 1
        for record in reader:
            if record:  # csv yields [] for blank lines
                if len(record) != len(header):
                    error = _line_error(
                        path, start, f"expected {len(header)} columns ({', '.join(header)}), got {len(record)}"
                    )
                    yield start, Unreadable(error, ",".join(record)[:1000])
                else:
                    yield start, dict(zip(header, record))
            start = reader.line_num + 1
    except csv.Error as e:
        raise _line_error(path, start, f"invalid CSV: {e}") from None


def _read_parquet(path: Path) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    index = 0
    try:  # a truncated file fails on open (no footer) or on a row group; both are file-level problems
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        where = f" (after {index} rows)" if index else ""
        raise DataError(str(path), f"cannot read Parquet file{where}: {e}") from None


def _read_saved_dataset(path: Path) -> Iterator[_Record]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataError(str(path), f"folder holds a DatasetDict with splits {splits}; pass one split's folder instead")
    if not _is_saved_dataset(path):
        raise DataError(str(path), "folder is not a datasets.save_to_disk folder; pass its data files instead")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(str(path), f"cannot load save_to_disk folder: {e}") from None
    _require_columns(path, dataset.column_names)
    yield from enumerate(dataset)


# ----------------------------------------------------------------------------------------------
# Prompt files (sampling, evaluation by generation, pair building)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (``{"prompt": "..."}`` per line) or a text file (one per line);
    ``builtin:...`` names a packaged file (`dpokit.resources`)."""
    p = resources.resolve_builtin(str(path)) if resources.is_builtin(str(path)) else Path(path)
    if not p.is_file():
        raise DpokitError(f"prompts file '{p}' does not exist")
    prompts: list[str] = []
    with p.open(encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if p.suffix.lower() not in (".jsonl", ".json"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(str(p), f"not valid JSON ({exc.msg})", row=row) from exc
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(str(p), "expected a non-empty string", row=row, field="prompt")
            prompts.append(prompt)
    if not prompts:
        raise DpokitError(f"prompts file '{p}' has no prompts")
    return prompts
