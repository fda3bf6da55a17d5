"""Preference data: files -> rows -> `RawPair` -> `TokenizedPair` (+ a `DataSummary`).

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
    A UTF-8 BOM is stripped and CRLF line ends are accepted everywhere.

Row formats (`normalize_row`, detected per row unless ``data.format`` forces one)
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  "chosen"/"rejected" are message lists [{"role", "content"}]. Without "prompt", the
                    prompt is every turn before the final assistant turn (identical in both). With a
                    "prompt" message list, chosen/rejected are its continuation (TRL style) or full
                    conversations that start with it.
    implicit        only "chosen"/"rejected" strings sharing a prefix (Anthropic HH): the prompt is the
                    common prefix cut after the last "\\n\\nAssistant:" marker, else before the last
                    whitespace run so no word is split (the response keeps its leading space).

Tokenization (`tokenize_pair`) follows docs/design.md: prompt and responses are tokenized separately
and concatenated, so the prompt/response boundary is exact by construction.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpokit.collate import TokenizedPair
from dpokit.errors import ConfigError, DataError, ModelError

__all__ = [
    "RawPair",
    "DataSummary",
    "expand_files",
    "read_rows",
    "normalize_row",
    "split_implicit_prompt",
    "tokenize_pair",
    "tokenize_pairs",
    "load_pairs",
    "describe_row",
    "DATA_SUFFIXES",
    "FORMATS",
    "TRUNCATION_MODES",
]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("auto", "standard", "conversational", "implicit")
TRUNCATION_MODES = ("keep_end", "keep_start")
ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"
_PARTS = ("prompt", "chosen", "rejected")

Messages = list[dict[str, Any]]


@dataclass
class RawPair:
    """A validated preference pair before tokenization.

    For conversational pairs `prompt` is the list of prompt turns and `chosen` / `rejected` are the
    response turns only (normally the single final assistant turn); otherwise all three are text.
    """

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    kind: str  # "standard" | "conversational" | "implicit"
    source: str  # the file (or save_to_disk folder) the row came from
    row: int  # line number (1-based) for JSONL/CSV, else 0-based index; see describe_row()


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


def _row_error(path: str | Path, row: int, message: str, field: str | None = None) -> DataError:
    return _located_error(path, describe_row(path, row), message, row, field)


def _line_error(path: str | Path, line: int, message: str) -> DataError:
    return _located_error(path, f"line {line}", message, line, None)


def _type_name(value: Any) -> str:
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
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: list[Path] = []
    for spec in map(str, specs):
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
            raise DataError(
                str(path), f"folder has no data files ({', '.join(DATA_SUFFIXES)}) and is not a save_to_disk folder"
            )
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(str(path), f"unsupported file type '{path.suffix}'; use one of {', '.join(DATA_SUFFIXES)}")
    return [path]


def _is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, row) for every record of one file; see the module docstring for numbering."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(str(path), f"unsupported file type '{path.suffix}'; use one of {', '.join(DATA_SUFFIXES)}")
    if not path.is_file():
        raise DataError(str(path), "no such file")
    yield from reader(path)


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
        raise _located_error(path, where, f"expected a JSON object, got {_type_name(value)}", row, None)
    return value


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as f:
        # Split on b"\n" only (not str.splitlines): U+2028 etc. may legally sit inside JSON strings.
        for lineno, raw in enumerate(f, start=1):
            text = _decode(path, raw, first_line=lineno).strip()  # strip() also drops the CR of CRLF
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise _line_error(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            yield lineno, _as_object(path, f"line {lineno}", lineno, value)


@lru_cache(maxsize=256)
def _json_is_lines(path: str) -> bool:
    """True if a .json file holds JSON Lines (several top-level values) rather than one document."""
    try:
        json.loads(_decode(Path(path), Path(path).read_bytes()))
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"
    except (OSError, DataError):
        return False
    return False


def _read_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file, as Dataset.to_json writes by default
            yield from _read_jsonl(path)
            return
        raise _line_error(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and "chosen" in data:
        data = [data]  # a single row
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        raise DataError(
            str(path),
            f"expected a list of rows or an object with one key holding that list, got {_type_name(data)}{keys}",
        )
    for i, value in enumerate(data):
        yield i, _as_object(path, f"row {i} (0-based)", i, value)


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long responses exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        header = [name.strip() for name in next(reader, [])]
        start = reader.line_num + 1
        for record in reader:
            if record:  # csv yields [] for blank lines
                if len(record) != len(header):
                    raise _line_error(
                        path, start, f"expected {len(header)} columns ({', '.join(header)}), got {len(record)}"
                    )
                yield start, dict(zip(header, record))
            start = reader.line_num + 1
    except csv.Error as e:
        raise _line_error(path, start, f"invalid CSV: {e}") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(str(path), f"cannot read Parquet file: {e}") from None
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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
    yield from enumerate(dataset)


# ----------------------------------------------------------------------------------------------
# Row validation and normalisation


def normalize_row(row: dict[str, Any], path: str | Path, rownum: int, fmt: str = "auto") -> RawPair:
    """Validate one row and turn it into a `RawPair`; any problem raises DataError naming file, row, field."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(row, dict):
        raise _row_error(path, rownum, f"expected an object with chosen/rejected fields, got {_type_name(row)}")
    for name in ("chosen", "rejected"):
        if name not in row:
            raise _row_error(path, rownum, f"missing field '{name}' (fields present: {', '.join(map(str, row))})", name)
    kind = _detect_kind(row)
    if fmt != "auto" and kind != fmt:
        field_name, message = _format_mismatch(row, fmt)
        raise _row_error(path, rownum, message, field_name)

    if kind == "conversational":
        prompt, chosen, rejected = _normalize_conversation(row, path, rownum)
    else:
        texts = {name: _text(row[name], path, rownum, name) for name in ("chosen", "rejected")}
        if texts["chosen"] == texts["rejected"]:
            raise _row_error(
                path, rownum, "chosen and rejected are identical, so the pair expresses no preference", "rejected"
            )
        if kind == "standard":
            prompt, chosen, rejected = _text(row["prompt"], path, rownum, "prompt"), texts["chosen"], texts["rejected"]
        else:
            prompt, chosen, rejected = split_implicit_prompt(texts["chosen"], texts["rejected"])
            for name, response in (("chosen", chosen), ("rejected", rejected)):
                if not response.strip():
                    raise _row_error(
                        path,
                        rownum,
                        "response is empty once the prompt shared with the other response is removed",
                        name,
                    )
    return RawPair(prompt, chosen, rejected, kind, str(path), rownum)


def _detect_kind(row: dict[str, Any]) -> str:
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        return "conversational"
    return "standard" if "prompt" in row else "implicit"


def _format_mismatch(row: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(field, message) explaining why a row does not match the format forced by data.format."""
    forced = f"data.format is '{fmt}'"
    if fmt == "conversational":
        bad = "chosen" if not isinstance(row["chosen"], list) else "rejected"
        return bad, f"expected a list of messages ({forced}), got {_type_name(row[bad])}"
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        bad = "chosen" if isinstance(row["chosen"], list) else "rejected"
        return bad, f"expected text ({forced}), got a list of messages"
    if fmt == "standard":
        return "prompt", f"missing field 'prompt' ({forced})"
    return "prompt", f"unexpected field 'prompt' ({forced}: the prompt is the shared prefix of chosen and rejected)"


def _text(value: Any, path: str | Path, rownum: int, name: str) -> str:
    if not isinstance(value, str):
        raise _row_error(path, rownum, f"expected text, got {_type_name(value)}", name)
    if not value.strip():
        raise _row_error(path, rownum, "text is empty or only whitespace", name)
    return value


def _messages(value: Any, path: str | Path, rownum: int, name: str) -> Messages:
    """Validate a message list; returns copies without null-valued keys (Arrow structs add them)."""
    if not isinstance(value, list):
        raise _row_error(path, rownum, f"expected a list of messages, got {_type_name(value)}", name)
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise _row_error(
                path, rownum, f"expected a message object with role and content, got {_type_name(message)}", where
            )
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message:
            raise _row_error(path, rownum, "message without a role", f"{where}.role")
        if message["role"] not in ROLES:
            raise _row_error(
                path, rownum, f"unknown role {message['role']!r}; expected one of {', '.join(ROLES)}", f"{where}.role"
            )
        if "content" not in message:
            raise _row_error(path, rownum, "message without content", f"{where}.content")
        _text(message["content"], path, rownum, f"{where}.content")
        out.append(message)
    return out


def _normalize_conversation(row: dict[str, Any], path: str | Path, rownum: int) -> tuple[Messages, Messages, Messages]:
    chosen = _messages(row["chosen"], path, rownum, "chosen")
    rejected = _messages(row["rejected"], path, rownum, "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise _row_error(path, rownum, "empty message list", name)
        if turns[-1]["role"] != "assistant":
            last = f"{name}[{len(turns) - 1}].role"
            raise _row_error(path, rownum, f"the last turn must be the assistant's, got '{turns[-1]['role']}'", last)
    if "prompt" in row:
        prompt = _messages(row["prompt"], path, rownum, "prompt")
        # Accept full conversations that repeat the prompt as well as TRL-style continuations.
        n = len(prompt)
        chosen = chosen[n:] if n and chosen[:n] == prompt else chosen
        rejected = rejected[n:] if n and rejected[:n] == prompt else rejected
    else:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            turn = next(
                (i for i, (a, b) in enumerate(zip(prompt, rejected[:-1])) if a != b),
                min(len(prompt), len(rejected) - 1),
            )
            raise _row_error(
                path,
                rownum,
                f"chosen and rejected must share every turn before the final assistant turn; they differ at turn {turn}",
                "rejected",
            )
        chosen, rejected = chosen[-1:], rejected[-1:]
    if chosen == rejected:
        raise _row_error(
            path, rownum, "chosen and rejected are identical, so the pair expresses no preference", "rejected"
        )
    return prompt, chosen, rejected


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts sharing a prefix into (prompt, chosen response, rejected response).

    The prompt ends right after the last "\\n\\nAssistant:" marker inside the common prefix; without
    one it ends before the last whitespace run of the prefix, so a word is never split and the
    response keeps its leading space (" word" is one token for byte-level BPE tokenizers).
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(HH_ASSISTANT)
    if marker >= 0:
        cut = marker + len(HH_ASSISTANT)
    else:
        cut = max((i for i, ch in enumerate(common) if ch.isspace()), default=0)
        while cut > 0 and common[cut - 1].isspace():
            cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ----------------------------------------------------------------------------------------------
# Tokenization and truncation


@dataclass
class _Encoded:
    """One pair's tokenization outcome, with what the summary needs."""

    pair: TokenizedPair | None
    reason: str | None  # why the pair is dropped (pair is None)
    lengths: tuple[int, int, int]  # prompt/chosen/rejected tokens before truncation
    truncated: tuple[bool, bool, bool]


def tokenize_pair(
    pair: RawPair,
    tokenizer: Any,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> TokenizedPair | str:
    """Tokenize one pair (see `tokenize_pairs`); returns the reason as a str if the pair is dropped."""
    return tokenize_pairs([pair], tokenizer, max_length, max_prompt_length, truncation_mode)[0]


def tokenize_pairs(
    pairs: Sequence[RawPair],
    tokenizer: Any,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> list[TokenizedPair | str]:
    """Tokenize pairs with batched tokenizer calls; each result is a TokenizedPair or a drop reason.

    Plain text: prompt with add_special_tokens=True (BOS if the tokenizer adds one), responses without
    special tokens plus EOS. Chat: rendered prompt (add_generation_prompt=True) and the remainder of
    each rendered conversation, all without special tokens (the template holds them).
    """
    encoded = _encode(pairs, tokenizer, max_length, max_prompt_length, truncation_mode)
    return [e.pair if e.pair is not None else e.reason for e in encoded]


def _encode(
    pairs: Sequence[RawPair], tokenizer: Any, max_length: int | None, max_prompt_length: int | None, mode: str
) -> list[_Encoded]:
    if mode not in TRUNCATION_MODES:
        raise ConfigError(f"data.truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    texts = [_render(pair, tokenizer) for pair in pairs]  # (prompt, chosen, rejected) strings
    plain = [i for i, p in enumerate(pairs) if p.kind != "conversational"]
    chat = [i for i, p in enumerate(pairs) if p.kind == "conversational"]
    eos = None
    if plain:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelError("the tokenizer has no eos_token, which plain-text responses must end with; set one")

    prompts: list[list[int]] = [[] for _ in pairs]
    for group, special in ((plain, True), (chat, False)):
        for i, ids in zip(group, _batch_ids(tokenizer, [texts[i][0] for i in group], special)):
            prompts[i] = ids
    responses = _batch_ids(tokenizer, [t[k] for t in texts for k in (1, 2)], False)  # chosen, rejected interleaved

    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for i, pair in enumerate(pairs):
        suffix = [eos] if pair.kind != "conversational" else []
        chosen, rejected = responses[2 * i] + suffix, responses[2 * i + 1] + suffix
        out.append(_truncate(prompts[i], chosen, rejected, max_length, max_prompt_length, mode, bos))
    return out


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _render(pair: RawPair, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text to tokenize; chat pairs are rendered with the chat template."""
    if pair.kind != "conversational":
        return pair.prompt, pair.chosen, pair.rejected  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{pair.source} holds conversational rows (message lists) but the tokenizer has no chat_template; "
            "use a tokenizer with one, or convert the data to prompt/chosen/rejected text"
        )
    try:  # templates are arbitrary Jinja and may raise anything (e.g. "roles must alternate")
        prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        fulls = [
            tokenizer.apply_chat_template(pair.prompt + turns, tokenize=False) for turns in (pair.chosen, pair.rejected)
        ]
    except Exception as e:
        raise _row_error(pair.source, pair.row, f"the chat template failed on this conversation: {e}") from None
    for name, full in zip(("chosen", "rejected"), fulls):
        if not full.startswith(prompt):
            raise _row_error(
                pair.source,
                pair.row,
                "the chat template is not prefix-consistent: the full conversation does not start with the prompt "
                "rendered with add_generation_prompt=True, so the response cannot be split off exactly "
                "(templates that rewrite earlier turns, e.g. strip reasoning, do this); use another template",
                name,
            )
    return prompt, fulls[0][len(prompt) :], fulls[1][len(prompt) :]


def _truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int | None,
    max_prompt_length: int | None,
    mode: str,
    bos: int | None,
) -> _Encoded:
    """Cut the prompt to max_prompt_length, then each response so prompt + response <= max_length."""
    lengths = (len(prompt), len(chosen), len(rejected))
    if not prompt:
        return _Encoded(None, "empty prompt", lengths, (False, False, False))
    if not chosen or not rejected:
        return _Encoded(None, "empty response", lengths, (False, False, False))
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos is not None and prompt[0] == bos and max_prompt_length > 1:
            prompt = [bos] + prompt[len(prompt) - max_prompt_length + 1 :]  # keep BOS: models rely on it
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    if max_length is not None:
        budget = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:budget], rejected[:budget]  # responses always keep their start
    truncated = (len(prompt) < lengths[0], len(chosen) < lengths[1], len(rejected) < lengths[2])
    if not chosen or not rejected:
        return _Encoded(None, "response empty after truncation", lengths, truncated)
    if chosen == rejected:
        return _Encoded(None, "chosen and rejected identical after truncation", lengths, truncated)
    return _Encoded(TokenizedPair(prompt, chosen, rejected), None, lengths, truncated)


# ----------------------------------------------------------------------------------------------
# Summary and the top-level loader


@dataclass
class DataSummary:
    """What `load_pairs` read, kept and dropped, for a one-screen report."""

    files: list[str] = field(default_factory=list)
    n_read: int = 0
    n_kept: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # row format -> pairs read
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs
    truncated: dict[str, int] = field(default_factory=dict)  # "prompt"/"chosen"/"rejected" -> kept pairs cut
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> p50/p90/p99/max, before truncation

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def render(self) -> str:
        """A few lines of plain text for the console / log."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        lines = [f"data: {self.n_read} pairs read from {files} ({kinds}); {self.n_kept} kept, {self.n_dropped} dropped"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped ({reason}): {n}")
        if any(self.truncated.values()):
            cut = ", ".join(f"{part} {self.truncated.get(part, 0)}" for part in _PARTS)
            lines.append(f"  truncated among kept pairs: {cut}")
        if self.lengths:
            lines.append(f"  {'tokens (before truncation)':<28}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
            for part in _PARTS:
                stats = self.lengths.get(part, {})
                lines.append(f"  {part:<28}" + "".join(f"{stats.get(k, 0):>7}" for k in ("p50", "p90", "p99", "max")))
        return "\n".join(lines)


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (always an observed length)."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    xs = sorted(values)
    rank = {p: xs[max(math.ceil(p / 100 * len(xs)) - 1, 0)] for p in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": xs[-1]}


def _summarize(files: list[Path], raw: list[RawPair], encoded: list[_Encoded]) -> DataSummary:
    kept = [e for e in encoded if e.pair is not None]
    return DataSummary(
        files=[str(f) for f in files],
        n_read=len(raw),
        n_kept=len(kept),
        kinds=dict(Counter(p.kind for p in raw)),
        dropped=dict(Counter(e.reason for e in encoded if e.reason is not None)),
        truncated={part: sum(e.truncated[k] for e in kept) for k, part in enumerate(_PARTS)},
        lengths={part: _percentiles([e.lengths[k] for e in encoded]) for k, part in enumerate(_PARTS)},
    )


def load_pairs(
    files: str | Path | Sequence[str | Path], tokenizer: Any, data_cfg: Any
) -> tuple[list[TokenizedPair], DataSummary]:
    """Read, validate, normalise and tokenize every pair of `files`.

    `data_cfg` needs `format`, `max_length`, `max_prompt_length` and `truncation_mode` attributes.
    Invalid rows raise DataError (fail fast: a silently skipped row hides a broken file); pairs that
    tokenization cannot keep are dropped and counted in the summary. TokenizedPair.index is the
    pair's position in the returned list.
    """
    fmt = getattr(data_cfg, "format", "auto")
    paths = expand_files(files)
    raw = [normalize_row(row, path, rownum, fmt) for path in paths for rownum, row in read_rows(path)]
    if not raw:
        raise DataError(", ".join(map(str, paths)), "no rows found")
    encoded = _encode(
        raw,
        tokenizer,
        getattr(data_cfg, "max_length", None),
        getattr(data_cfg, "max_prompt_length", None),
        getattr(data_cfg, "truncation_mode", "keep_end"),
    )
    pairs = [e.pair for e in encoded if e.pair is not None]
    for index, pair in enumerate(pairs):
        pair.index = index
    summary = _summarize(paths, raw, encoded)
    if not pairs:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in summary.dropped.items())
        raise DataError(
            ", ".join(map(str, paths)),
            f"all {len(raw)} pairs were dropped ({reasons}); check data.max_length / max_prompt_length",
        )
    return pairs, summary
