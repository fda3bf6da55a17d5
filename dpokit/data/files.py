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
    Hub dataset     ``org/name[@revision]`` (no such local path) or ``hub:org/name``: the files of one split,
                    fetched into the Hugging Face cache (`dpokit.data.hub`) and read as above; messages
                    name them ``org/name@<commit12>:data/train-00000-of-00001.parquet``.
    A UTF-8 BOM is stripped and CRLF line ends are accepted everywhere. Compressed, binary or UTF-16
    files and files without a single row are refused with a message saying so.

Which rows (`DataFiles`, built by `data_files` from the data config and train.seed)
    the Hub split and subset of Hub ids (data.train_split / eval_split / subset); one side of a seeded
    per-row split holding out data.eval_fraction of the training rows as the eval split; mixture
    weights (data.train_weights: entry i contributes round(w_i * n_i) rows, seeded). Row choices hash
    (seed, row number), so they are the same on every platform and Python version.

What a row must hold is the business of the row kind that reads it (`dpokit.data.pairs` for
preference pairs).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpokit import resources
from dpokit.config import DataConfig
from dpokit.data import hub
from dpokit.errors import DataError, DpokitError

__all__ = ["expand_files", "expand_sources", "shown", "DataFiles", "data_files", "read_rows", "read_prompts", "records", "describe_row", "row_error", "type_name", "Unreadable", "DATA_SUFFIXES"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# ----------------------------------------------------------------------------------------------
# Locating rows in error messages


def describe_row(path: str | Path, row: int) -> str:
    """How a row number reads to a user: "line 7" for line-oriented files, else "row 6 (0-based)"."""
    return f"line {row}" if _is_line_oriented(_REAL.get(str(path), Path(path))) else f"row {row} (0-based)"


# Files of Hub datasets live in the Hub cache under commit-sha folders; messages name them as
# "org/name@<sha12>:data/train-00000-of-00001.parquet" instead. expand_files registers the names.
_SHOWN: dict[str, str] = {}  # real path -> shown name
_REAL: dict[str, Path] = {}  # shown name -> real path (describe_row looks at the real file)


def shown(path: str | Path) -> str:
    """The name a data file has in messages: its path, or a Hub dataset's ``org/name@rev:file``."""
    return _SHOWN.get(str(path), str(path))


def _register(path: Path, name: str) -> None:
    _SHOWN[str(path)] = name
    _REAL[name] = path


def _is_line_oriented(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in (".jsonl", ".csv") or (suffix == ".json" and _json_is_lines(str(path)))


def _located_error(path: str | Path, where: str, message: str, row: int | None, field: str | None) -> DataError:
    name = shown(path)
    err = DataError(name, message, row=row, field=field)
    # DataError renders "row N"; re-render so JSONL/CSV say "line N" (what an editor jumps to) and
    # index-based files say their index is 0-based. path/row/field attributes stay structured.
    err.args = (f"{name}, {where}" + (f", field '{field}'" if field else "") + f": {message}",)
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


def expand_files(specs: str | Path | Sequence[str | Path], split: str | None = None, subset: str | None = None) -> list[Path]:
    """Resolve files, globs, folders and Hub dataset ids to the data files / save_to_disk folders to
    read, in order; see `expand_sources` (this is its flat list, duplicates removed)."""
    return [path for paths in expand_sources(specs, split, subset) for path in paths]


def expand_sources(
    specs: str | Path | Sequence[str | Path], split: str | None = None, subset: str | None = None
) -> list[list[Path]]:
    """The files of each spec (one list per entry, for mixture weights), in order.

    A folder written by `datasets.Dataset.save_to_disk` is returned as is; any other folder expands
    to its data files (sorted, not recursive). ``builtin:toy/train.jsonl`` names data shipped in the
    package (`dpokit.resources`). A spec that is no local path but reads ``org/name[@revision]`` or
    ``hub:org/name[@revision]`` is a Hugging Face Hub dataset: the files of its `split` (and
    `subset`) are fetched into the Hub cache (`dpokit.data.hub`); local paths win. `split` and
    `subset` default to those of a `DataFiles` list, else "train" and none. A file named by two
    entries is read once, by the first.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    split = split or getattr(specs, "split", "train")
    subset = subset if subset is not None else getattr(specs, "subset", None)
    seen: set[Path] = set()
    out: list[list[Path]] = []
    for spec in map(str, specs):
        entry: list[Path] = []
        for path in _spec_paths(spec, split, subset):
            for found in _expand_path(path):
                if found not in seen:
                    seen.add(found)
                    entry.append(found)
        out.append(entry)
    if not any(out):
        raise DataError("data", "no data files given")
    return out


def _spec_paths(spec: str, split: str, subset: str | None) -> list[Path]:
    if resources.is_builtin(spec):
        spec = str(resources.resolve_builtin(spec))
    if Path(spec).exists():
        return [Path(spec)]
    if any(ch in spec for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
        if not found:
            raise DataError(spec, "no file matches this pattern")
        return found
    if hub.is_dataset_spec(spec):
        try:
            files = hub.dataset_files(spec, split, subset)
        except hub.HubError as e:
            local = "" if spec.startswith("hub:") else "not a local file or folder; "
            raise DataError(spec, f"{local}{e}") from None
        for path, name in files:
            _register(path, name)
        return [path for path, _ in files]
    raise DataError(spec, "no such file or folder")


def _expand_path(path: Path) -> list[Path]:
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        files = [p for p in children if (p.is_file() and p.suffix.lower() in DATA_SUFFIXES) or _is_saved_dataset(p)]
        if not files:
            names = [p.name + ("/" if p.is_dir() else "") for p in children]
            listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise DataError(
                shown(path),
                f"folder has no data files (expected {', '.join(DATA_SUFFIXES)} files or a save_to_disk folder; "
                f"it holds {listed or 'nothing'})",
            )
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(shown(path), _unsupported(path))
    return [path]


def _unsupported(path: Path) -> str:
    what = f"'{path.suffix}'" if path.suffix else "(no extension)"
    return f"unsupported file type {what}; expected one of {', '.join(DATA_SUFFIXES)} (the extension picks the reader)"


def _is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


# ----------------------------------------------------------------------------------------------
# Which rows of the files: an eval split carved from the training rows, mixture weights


class DataFiles(list):  # type: ignore[type-arg]  # a list[str] of specs, so objectives pass it on unchanged
    """File specs plus how to read them: the Hub split and subset for Hub dataset ids, and which
    rows to use (a seeded eval carve of data.eval_fraction, data.train_weights). Built by
    `data_files`; a plain list of specs means every row, split "train", no subset."""

    def __init__(
        self,
        specs: Sequence[str] = (),
        *,
        split: str = "train",
        subset: str | None = None,
        part: str = "all",  # all | train | eval: which side of the eval carve
        eval_fraction: float = 0.0,
        seed: int = 0,
        weights: Sequence[float] = (),
    ) -> None:
        super().__init__(map(str, specs))
        self.split, self.subset, self.part = split, subset, part
        self.eval_fraction, self.seed, self.weights = eval_fraction, seed, list(weights)

    def eval_rows(self, n: int) -> int:
        """How many of n rows the eval carve holds out: round(eval_fraction * n), at least 1, and at
        least one row left to train on."""
        if n < 2:
            raise DataError("data.eval_fraction", f"needs at least 2 training rows to hold some out, got {n}")
        return min(max(math.floor(self.eval_fraction * n + 0.5), 1), n - 1)

    def select(self, counts: Sequence[int]) -> list[int]:
        """Indices (into the concatenated rows of all entries; entry i holds counts[i] rows) of the
        rows to use, ascending, with repeats for weights > 1. Deterministic in `seed` alone."""
        chosen = list(range(sum(counts)))
        if self.eval_fraction > 0 and self.part != "all":
            held = set(sorted(chosen, key=lambda i: _rank(self.seed, "eval", i))[: self.eval_rows(len(chosen))])
            chosen = [i for i in chosen if (i in held) == (self.part == "eval")]
        if self.weights and self.part != "eval":
            chosen = _weigh(chosen, counts, self.weights, self.seed)
        return chosen


def data_files(data_cfg: DataConfig, seed: int) -> tuple[DataFiles, DataFiles]:
    """(train files, eval files) of a run's data config, each a `DataFiles` that knows its Hub split.

    With data.eval_fraction > 0 and no data.eval_files, both are data.train_files: the train side
    keeps the rows the seeded carve does not hold out, the eval side the held-out ones.
    """
    split, subset, weights, fraction = data_cfg.train_split, data_cfg.subset, data_cfg.train_weights, data_cfg.eval_fraction
    if fraction > 0 and not data_cfg.eval_files:
        carve = {"split": split, "subset": subset, "eval_fraction": fraction, "seed": seed}
        return (DataFiles(data_cfg.train_files, part="train", weights=weights, **carve),
                DataFiles(data_cfg.train_files, part="eval", **carve))  # fmt: skip
    return (
        DataFiles(data_cfg.train_files, split=split, subset=subset, seed=seed, weights=weights),
        DataFiles(data_cfg.eval_files, split=data_cfg.eval_split, subset=subset),
    )


def _rank(seed: int, salt: str, index: int) -> int:
    # A hash, not random.Random: the same rows are chosen on every platform and Python version.
    return int.from_bytes(hashlib.blake2b(f"{seed}:{salt}:{index}".encode(), digest_size=8).digest(), "big")


def _weigh(rows: list[int], counts: Sequence[int], weights: Sequence[float], seed: int) -> list[int]:
    """Mixture weights: entry i contributes round(w_i * n_i) of its n_i rows, every row floor(w_i)
    times and a seeded sample of the rest once more (w < 1 subsamples, w = 0 leaves it out)."""
    if len(weights) != len(counts):
        raise DataError("data.train_weights", f"{len(weights)} weights for {len(counts)} data.train_files entries")
    starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
    out: list[int] = []
    for i, weight in enumerate(weights):
        mine = [r for r in rows if starts[i] <= r < starts[i + 1]]
        if not mine:
            continue
        repeats, extra = divmod(math.floor(weight * len(mine) + 0.5), len(mine))
        sample = sorted(mine, key=lambda r: _rank(seed, f"weight{i}", r))[:extra]
        out.extend(mine * repeats + sample)
    return sorted(out)


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


def records(path: Path, required: tuple[str, str] = ("chosen", "rejected")) -> Iterator[_Record]:
    """Like `read_rows`, but a record that cannot be parsed is yielded as `Unreadable`, not raised.

    File-level problems (missing, binary, not a JSON document, no chosen/rejected columns) still raise:
    no row of such a file can be trusted, so there is nothing to skip. `required`: the names of the
    chosen and rejected columns in the file (data.columns may rename them).
    """
    if path.is_dir():
        yield from _read_saved_dataset(path, required)
        return
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(shown(path), _unsupported(path))
    if not path.is_file():
        raise DataError(shown(path), "no such file")
    if suffix == ".parquet":
        yield from _read_parquet(path, required)
        return
    _refuse_binary(path)
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path, required)
    else:
        yield from _read_csv(path, required)


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
            raise DataError(shown(path), f"expected UTF-8 text, but the file is {what}")
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


def _read_json(path: Path, required: tuple[str, str] = ("chosen", "rejected")) -> Iterator[_Record]:
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
    if isinstance(data, dict) and required[0] in data:
        data = [data]  # a single row
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        raise DataError(
            shown(path),
            f"expected a list of rows or an object with one key holding that list, got {type_name(data)}{keys}",
        )
    for i, value in enumerate(data):
        if isinstance(value, dict):
            yield i, value
        else:
            yield i, Unreadable(_not_object(path, f"row {i} (0-based)", i, value), json.dumps(value)[:1000])


def _require_columns(
    path: Path, columns: Sequence[str], required: tuple[str, str], header_line: int | None = None
) -> None:
    """A table without chosen/rejected columns is the wrong file (or needs renaming), not N bad rows."""
    for name in required:
        if name not in columns:
            found = ", ".join(map(str, columns)) or "none"
            expected = (
                "expected prompt/chosen/rejected columns" if required == ("chosen", "rejected")
                else f"data.columns names '{required[0]}' and '{required[1]}' as chosen and rejected"
            )  # fmt: skip
            message = f"no '{name}' column; {expected}, found: {found}"
            if header_line is None:
                raise DataError(shown(path), message, field=name)
            raise _located_error(path, f"line {header_line} (header)", message, header_line, name)


def _read_csv(path: Path, required: tuple[str, str]) -> Iterator[_Record]:
    text = _decode(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long responses exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        header = [name.strip() for name in next(reader, [])]
        if header:
            _require_columns(path, header, required, header_line=1)
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


def _read_parquet(path: Path, required: tuple[str, str]) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    index = 0
    try:  # a truncated file fails on open (no footer) or on a row group; both are file-level problems
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet.schema_arrow.names, required)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        where = f" (after {index} rows)" if index else ""
        raise DataError(shown(path), f"cannot read Parquet file{where}: {e}") from None


def _read_saved_dataset(path: Path, required: tuple[str, str]) -> Iterator[_Record]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataError(shown(path), f"folder holds a DatasetDict with splits {splits}; pass one split's folder instead")
    if not _is_saved_dataset(path):
        raise DataError(shown(path), "folder is not a datasets.save_to_disk folder; pass its data files instead")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(shown(path), f"cannot load save_to_disk folder: {e}") from None
    _require_columns(path, dataset.column_names, required)
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


# ----------------------------------------------------------------------------------------------
# Rows given in memory (the Python API's train(cfg, train_data=...))


def write_rows(rows: Iterable[Any], path: Path, name: str) -> Path:
    """Write rows given in memory (a list of dicts, a `datasets.Dataset`, any iterable of mappings)
    as JSON Lines at `path`, atomically, so they are read, checked and cached exactly like a file
    (errors then name that file and line) and the run keeps the data it was trained on.

    `name` is what the caller called them (train_data / eval_data), for the error when a row is
    not a mapping. Numpy / torch scalars and arrays become plain numbers and lists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: several may write it
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                tmp.unlink()
                raise DataError(name, f"row {i} (0-based): expected a mapping of fields, got {type_name(row)}", row=i)
            f.write(json.dumps(dict(row), ensure_ascii=False, default=_plain) + "\n")
            n += 1
    if n == 0:
        tmp.unlink()
        raise DataError(name, "no rows given")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """JSON for what datasets / numpy / torch rows hold: scalars as numbers, arrays as lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
