"""Completions for supervised fine-tuning (`dpokit sft`): rows -> `RawCompletion` -> `TokenizedCompletion`
(+ a `CompletionSummary`), and their two batch layouts (padded, packed).

Rows come from `dpokit.data.files` (the same files, Hub datasets, data.columns, eval carve and
mixture weights as preference pairs). Row kinds, detected per row:

    completion        {"prompt": str, "completion": str}: the completion is scored, the prompt is context
    chat completion   {"prompt": [messages], "completion": [messages]} (TRL's conversational prompt-completion):
                      the assistant turns of the completion are scored
    messages          {"messages": [messages]}: the assistant turns are scored, all of them
                      (data.sft_loss_on=all_assistant, the default) or only the last (last_assistant); the
                      last turn must be the assistant's
    labelled          `dpokit kto` (``labels=True``): a completion or chat completion row with a boolean
                      ``label`` (true: desirable, false: undesirable); messages rows are refused there
    preference pair   with data.sft_target=chosen (the DPO paper's "Preferred-FT"): any row `dpokit.data.pairs`
                      reads (standard, conversational, implicit; data.format applies); prompt + chosen, the
                      chosen response scored. A pair row without data.sft_target is refused for the whole file.

Tokenisation follows `dpokit.data.pairs`: plain text is the prompt tokenised with special tokens (BOS)
then the completion without them plus EOS; chat rows are rendered with the tokenizer's chat template.
The loss mask is exact by construction: the rendered conversation is cut at every scored turn's
boundaries (the turn starts after the rendering of the turns before it with add_generation_prompt=True
and ends where the rendering of the turns up to it ends; both checked to be prefixes of the full
rendering), and each piece is tokenised on its own, so no token straddles a boundary.

Truncation (data.max_length / max_prompt_length / truncation_mode, as for pairs): the tokens before
the first scored token are the prompt, cut to max_prompt_length (keep_end keeps a leading BOS); the
rest (completion, and with multi-turn rows the later turns) is cut to fit max_length, keeping its start.
An example with no scored token left is dropped and counted.

Bad rows: as `dpokit.data.pairs.load_pairs` (data.on_bad_row error / skip, skipped.jsonl), with
this module's messages. data.cache_tokenized and data.num_proc apply to pairs only: completions are
tokenised in one process on every run.

Batch layouts (`CompletionCollator`, `PackedCompletionCollator`), N examples::

    input_ids        (N, T) long   right-padded sequences (packed: (R, T), sequences back to back)
    attention_mask   (N, T) long   1 on real tokens (counting only: the model never gets it)
    completion_mask  (N, T) bool   padded only: True on scored tokens
    position_ids     (R, T) long   packed only: restart at 0 per sequence (see `dpokit.data.packing`)
    segment_ids      (R, T) long   packed only: the example of each token, -1 on row padding
    score_index      (4, M) long   rows (row, col, target, example): the logits at (row, col) predict
                                   `target`, a scored token of `example` (as `dpokit.data.packing`)
    example_index    (N,)   long   TokenizedCompletion.index
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Row selection, skip records and the tokenisation window are the pair loader's; completions reuse
# them so both row kinds are read, selected, skipped and cut the same way.
from dpokit.data.files import Unreadable, describe_row, expand_sources, records, row_error, shown, type_name
from dpokit.data.packing import PROMPT, PackedCollator, balanced_rows, first_fit_decreasing
from dpokit.data.pairs import (
    SKIP_HINT,
    TRUNCATION_MODES,
    finish_summary,
    normalize_mapped_row,
    parse_messages,
    percentiles,
    plan_files,
    selection_notes,
    skip_record,
    text_field,
    tokenize_window,
    write_skipped,
)
from dpokit.errors import ConfigError, DataError, ModelError

__all__ = [
    "RawCompletion", "TokenizedCompletion", "CompletionSummary", "normalize_completion_row",
    "load_completions", "check_completions", "CompletionCollator", "PackedCompletionCollator", "PAIRS_NEED_TARGET",
]  # fmt: skip

Messages = list[dict[str, Any]]
LOSS_ON = ("all_assistant", "last_assistant")
PAIRS_NEED_TARGET = "this file holds preference pairs; set data.sft_target=chosen to train on the chosen responses"


@dataclass
class RawCompletion:
    """A validated row before tokenisation: plain text (`prompt`, `completion`) or a conversation
    (`messages`, with `scored` the indices of the turns whose rendering is scored)."""

    kind: str  # "completion" | "chat completion" | "messages" | "chosen of <pair kind> pairs"
    source: str  # the file the row came from
    row: int  # its line (1-based) or index (0-based); see files.describe_row
    prompt: str = ""
    completion: str = ""
    messages: Messages = field(default_factory=list)
    scored: tuple[int, ...] = ()
    scored_field: str = "completion"  # the row's field that errors about the scored part name
    label: bool | None = None  # `dpokit kto`: desirable (True) or not; None for SFT rows

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass
class TokenizedCompletion:
    """One example: a token sequence and which of its tokens the loss scores."""

    input_ids: list[int]  # context then completion tokens (BOS / chat template included), never empty
    spans: list[tuple[int, int]]  # [start, end) positions of scored tokens, 1 <= start < end <= len(input_ids)
    index: int = -1  # position of the example in its split
    label: bool | None = None  # `dpokit kto`: desirable (True) or not; None for SFT examples

    @property
    def n_scored(self) -> int:
        return sum(end - start for start, end in self.spans)

    def scores(self) -> Iterator[tuple[int, int]]:
        """(predicting position, target token) of every scored token: token t is predicted at t - 1."""
        for start, end in self.spans:
            for t in range(start, end):
                yield t - 1, self.input_ids[t]


# ----------------------------------------------------------------------------------------------
# Rows


def _is_pair_row(row: Any, columns: dict[str, str]) -> bool:
    keys = (columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    own = (columns.get("completion", "completion"), columns.get("messages", "messages"))
    return isinstance(row, dict) and all(k in row for k in keys) and not any(k in row for k in own)


def _renamed(row: dict[str, Any], columns: dict[str, str], path: str, rownum: int) -> dict[str, Any]:
    """The row with data.columns applied (dpokit name <- dataset column), as `pairs` does."""
    if not columns:
        return row
    for key, column in columns.items():
        if column not in row:
            present = ", ".join(map(str, row))
            raise row_error(
                path,
                rownum,
                f"missing column '{column}' (data.columns maps it to {key}; columns present: {present})",
                column,
            )
    renamed = {k: v for k, v in row.items() if k not in columns and k not in columns.values()}
    renamed.update({key: row[column] for key, column in columns.items()})
    return renamed


def normalize_completion_row(row: Any, path: str, rownum: int, data_cfg: Any, labels: bool = False) -> RawCompletion:
    """Validate one row into a `RawCompletion`; a problem raises DataError naming file, row and field.

    `data_cfg` needs `sft_target` and `sft_loss_on` and may have `columns` and `format` (pairs only).
    `labels` (`dpokit kto`): the row is prompt/completion (text or messages) with a boolean `label`.
    """
    columns = dict(getattr(data_cfg, "columns", None) or {})
    target = getattr(data_cfg, "sft_target", None)
    if target is not None:
        return _from_pair(row, path, rownum, data_cfg, columns)
    if not isinstance(row, dict):
        raise row_error(
            path, rownum, f"expected an object with prompt/completion or messages fields, got {type_name(row)}"
        )
    own = ("prompt", "completion", "messages", "label") if labels else ("prompt", "completion", "messages")
    row = _renamed(row, {k: v for k, v in columns.items() if k in own}, path, rownum)
    if labels:
        return _labelled(row, path, rownum)
    if "messages" in row:
        return _from_messages(row["messages"], path, rownum, getattr(data_cfg, "sft_loss_on", "all_assistant"))
    if "completion" not in row:
        fields = ", ".join(map(str, row)) or "none"
        if "prompt" in row:
            raise row_error(path, rownum, f"missing field 'completion' (fields present: {fields})", "completion")
        raise row_error(
            path, rownum, f"expected prompt/completion fields or a messages list (fields present: {fields})"
        )
    if "prompt" not in row:
        raise row_error(path, rownum, f"missing field 'prompt' (fields present: {', '.join(map(str, row))})", "prompt")
    if isinstance(row["prompt"], list) or isinstance(row["completion"], list):
        prompt = parse_messages(row["prompt"], path, rownum, "prompt")
        completion = parse_messages(row["completion"], path, rownum, "completion")
        return _chat(prompt, completion, path, rownum, "chat completion", "completion")
    return RawCompletion("completion", path, rownum, text_field(row["prompt"], path, rownum, "prompt"),
                         text_field(row["completion"], path, rownum, "completion"))  # fmt: skip


def _labelled(row: dict[str, Any], path: str, rownum: int) -> RawCompletion:
    """A `dpokit kto` row: prompt + completion (text or message lists) and a boolean `label`. CSV cells
    are text, so there (only) the strings true / false are read as booleans."""
    if "messages" in row and "completion" not in row:
        raise row_error(path, rownum, "dpokit kto reads prompt/completion rows with a label; split the "
                        "conversation into prompt (the turns before the last assistant turn) and completion (that "
                        "turn)", "messages")  # fmt: skip
    # the prompt/completion row as SFT reads it (data.columns applied already, so no data config)
    raw = normalize_completion_row({k: v for k, v in row.items() if k not in ("label", "messages")}, path, rownum, None)
    if "label" not in row:
        fields = ", ".join(map(str, row))
        raise row_error(path, rownum, f"missing field 'label' (true: desirable, false: undesirable; fields present: "
                        f"{fields})", "label")  # fmt: skip
    label = row["label"]
    if isinstance(label, str) and path.lower().endswith(".csv") and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise row_error(path, rownum, f"expected true (desirable) or false (undesirable), got {type_name(label)} "
                        f"{label!r}"[:200], "label")  # fmt: skip
    raw.label = label
    return raw


def _from_messages(value: Any, path: str, rownum: int, loss_on: str) -> RawCompletion:
    turns = parse_messages(value, path, rownum, "messages")
    if not turns:
        raise row_error(path, rownum, "empty message list", "messages")
    if turns[-1]["role"] != "assistant":
        last = f"messages[{len(turns) - 1}].role"
        raise row_error(path, rownum, f"the last turn must be the assistant's, got '{turns[-1]['role']}'", last)
    scored = tuple(i for i, t in enumerate(turns) if t["role"] == "assistant")
    if loss_on == "last_assistant":
        scored = scored[-1:]
    return RawCompletion("messages", path, rownum, messages=turns, scored=scored, scored_field="messages")


def _chat(prompt: Messages, completion: Messages, path: str, rownum: int, kind: str, name: str) -> RawCompletion:
    """prompt + completion turns, the completion's assistant turns scored."""
    if not completion:
        raise row_error(path, rownum, "empty message list", name)
    scored = tuple(len(prompt) + i for i, t in enumerate(completion) if t["role"] == "assistant")
    if not scored:
        raise row_error(path, rownum, "no assistant turn to train on", name)
    return RawCompletion(kind, path, rownum, messages=prompt + completion, scored=scored, scored_field=name)


def _from_pair(row: Any, path: str, rownum: int, data_cfg: Any, columns: dict[str, str]) -> RawCompletion:
    """Preferred-FT: a preference row as `pairs` reads it, then prompt + chosen."""
    if isinstance(row, dict) and "chosen" not in row and ("completion" in row or "messages" in row):
        raise row_error(path, rownum, "data.sft_target=chosen reads preference pairs, but this row holds "
                        f"{'messages' if 'messages' in row else 'prompt/completion'}; unset data.sft_target")  # fmt: skip
    pair_columns = {k: v for k, v in columns.items() if k in ("prompt", "chosen", "rejected")}
    pair = normalize_mapped_row(row, Path(path), rownum, getattr(data_cfg, "format", "auto"), pair_columns)
    kind = f"chosen of {pair.kind} pairs"
    if pair.kind == "conversational":
        return _chat(list(pair.prompt), list(pair.chosen), path, rownum, kind, "chosen")  # type: ignore[arg-type]
    return RawCompletion(kind, path, rownum, str(pair.prompt), str(pair.chosen), scored_field="chosen")


# ----------------------------------------------------------------------------------------------
# Tokenisation and truncation


@dataclass
class _Encoded:
    example: TokenizedCompletion | None
    reason: str | None  # why the row is dropped (example is None)
    lengths: tuple[int, int]  # prompt tokens, tokens after the prompt, before truncation
    truncated: tuple[bool, bool] = (False, False)
    error: DataError | None = None  # the chat template failed on the row (only under on_bad_row=skip)


def _render_chat(raw: RawCompletion, tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, scored) pieces: turn k spans from the end of
    render(turns[:k], add_generation_prompt=True) to the end of render(turns[:k + 1])."""
    turns = raw.messages
    try:  # templates are arbitrary Jinja and may raise anything ("roles must alternate")
        full = tokenizer.apply_chat_template(turns, tokenize=False)
        bounds = [(tokenizer.apply_chat_template(turns[:k], tokenize=False, add_generation_prompt=True),
                   tokenizer.apply_chat_template(turns[: k + 1], tokenize=False)) for k in raw.scored]  # fmt: skip
    except Exception as e:
        raise row_error(raw.source, raw.row, f"the chat template failed on this conversation: {e}") from None
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for k, (start, end) in zip(raw.scored, bounds):
        if not (full.startswith(end) and end.startswith(start) and len(start) >= pos):
            raise row_error(
                raw.source, raw.row,
                f"the chat template is not prefix-consistent at turn {k}: the conversation rendered up to that turn "
                "does not start with the turns before it rendered with add_generation_prompt=True, so the assistant "
                "tokens cannot be cut out exactly (templates that rewrite earlier turns, e.g. strip reasoning, do "
                "this); use another template", raw.scored_field,
            )  # fmt: skip
        pieces += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
        pos = len(end)
    return [*pieces, (full[pos:], False)]


def _check_tokenizer(raw: Sequence[RawCompletion], tokenizer: Any) -> None:
    """Problems of the tokenizer, not of rows: never skipped, located at the first row they hit."""
    chat = [r for r in raw if r.is_chat]
    plain = [r for r in raw if not r.is_chat]
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{chat[0].source}, {describe_row(chat[0].source, chat[0].row)}: conversational row "
                         f"({len(chat)} such rows) but {name} has no chat_template to render it")  # fmt: skip
    if plain and tokenizer.eos_token_id is None:
        raise ModelError(f"{plain[0].source}, {describe_row(plain[0].source, plain[0].row)}: plain-text completions "
                         f"must end with an EOS token, but {name} has no eos_token; set one")  # fmt: skip


def _pieces(
    raw: Sequence[RawCompletion], tokenizer: Any, skip: bool
) -> tuple[list[list[tuple[str, bool]]], dict[int, DataError]]:
    """Each row's (text, scored) pieces; rows the chat template fails on go to the errors (skip) or raise."""
    pieces: list[list[tuple[str, bool]]] = []
    errors: dict[int, DataError] = {}
    for i, r in enumerate(raw):
        try:
            pieces.append(_render_chat(r, tokenizer) if r.is_chat else [(r.prompt, False), (r.completion, True)])
        except DataError as e:
            if not skip:
                raise
            errors[i] = e
            pieces.append([])
    return pieces, errors


def _encode_all(raw: Sequence[RawCompletion], tokenizer: Any, data_cfg: Any, skip: bool = False) -> list[_Encoded]:
    """Tokenise and truncate every row (see the module docstring); one batched tokenizer call per kind of piece."""
    mode = getattr(data_cfg, "truncation_mode", "keep_end")
    if mode not in TRUNCATION_MODES:
        raise ConfigError(f"data.truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    max_length, max_prompt = data_cfg.max_length, data_cfg.max_prompt_length
    _check_tokenizer(raw, tokenizer)
    pieces, errors = _pieces(raw, tokenizer, skip)
    # Plain prompts get special tokens (BOS) and a window sized for what truncation keeps; plain
    # completions and chat pieces none (the template holds them).
    groups: dict[tuple[bool, int | None, bool], list[tuple[int, int]]] = {}  # (special, keep, keep_start) -> pieces
    for i, (r, ps) in enumerate(zip(raw, pieces)):
        for j in range(len(ps)):
            if r.is_chat:
                key = (False, None, True)
            else:
                key = (True, max_prompt, mode == "keep_start") if j == 0 else (False, max_length, True)
            groups.setdefault(key, []).append((i, j))
    ids: dict[tuple[int, int], list[int]] = {}
    for (special, keep, keep_start), where in groups.items():
        got, _ = tokenize_window([pieces[i][j][0] for i, j in where], tokenizer, special, keep, keep_start)
        ids.update(zip(where, got))
    eos, bos = tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)
    out = []
    for i, (r, ps) in enumerate(zip(raw, pieces)):
        if i in errors:
            out.append(_Encoded(None, None, (0, 0), error=errors[i]))
            continue
        parts = [(ids[i, j], scored) for j, (_, scored) in enumerate(ps)]
        if not r.is_chat and not (parts[1][0] and parts[1][0][-1] == eos):
            parts[1] = (parts[1][0] + [eos], True)  # plain text ends with EOS, unless the text has it already
        out.append(_truncate(parts, max_length, max_prompt, mode, bos))
    return out


def _truncate(
    parts: list[tuple[list[int], bool]], max_length: int | None, max_prompt: int | None, mode: str, bos: int | None
) -> _Encoded:
    """Join the pieces; cut the prompt (tokens before the first scored one) to max_prompt, then the rest to fit."""
    ids = [t for piece, _ in parts for t in piece]
    mask = [scored for piece, scored in parts for _ in piece]
    first = mask.index(True) if True in mask else len(mask)
    prompt, rest, rest_mask = ids[:first], ids[first:], mask[first:]
    lengths = (len(prompt), len(rest))
    if not prompt:
        return _Encoded(None, "empty prompt", lengths)
    if not rest:
        return _Encoded(None, "empty completion", lengths)
    if max_prompt is not None and len(prompt) > max_prompt:
        if mode == "keep_start":
            prompt = prompt[:max_prompt]
        elif bos is not None and prompt[0] == bos and max_prompt > 1:
            prompt = [bos] + prompt[len(prompt) - max_prompt + 1 :]  # keep BOS: models rely on it
        else:
            prompt = prompt[len(prompt) - max_prompt :]
    if max_length is not None:
        budget = max(max_length - len(prompt), 0)
        rest, rest_mask = rest[:budget], rest_mask[:budget]  # the completion keeps its start
    truncated = (len(prompt) < lengths[0], len(rest) < lengths[1])
    if True not in rest_mask:
        return _Encoded(None, "completion empty after truncation", lengths, truncated)
    # tokens after the last scored one change no loss (attention is causal): leave them out
    end = len(rest_mask) - rest_mask[::-1].index(True)
    rest, rest_mask = rest[:end], rest_mask[:end]
    spans, start = [], None
    for k, scored in enumerate([*rest_mask, False]):
        if scored and start is None:
            start = k
        elif not scored and start is not None:
            spans.append((len(prompt) + start, len(prompt) + k))
            start = None
    return _Encoded(TokenizedCompletion(prompt + rest, spans), None, lengths, truncated)


# ----------------------------------------------------------------------------------------------
# Summary


@dataclass
class CompletionSummary:
    """What `load_completions` read, kept, dropped and skipped, for a one-screen report (and the model card)."""

    files: list[str] = field(default_factory=list)
    n_read: int = 0  # valid rows read (skipped rows not included)
    n_kept: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # row kind -> rows read
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: dict[str, int] = field(default_factory=dict)  # "prompt" / "completion" -> kept examples cut
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> p50/p90/p99/max, before truncation
    n_skipped: int = 0  # malformed rows skipped under data.on_bad_row=skip
    skipped_examples: list[str] = field(default_factory=list)
    skipped_path: str | None = None
    notes: list[str] = field(default_factory=list)  # row selection (eval carve, weights)
    unit: str = "examples"  # what the model card calls a row

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def render(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        skipped = f", {self.n_skipped} malformed rows skipped" if self.n_skipped else ""
        lines = [
            f"data: {self.n_read} examples read from {files} ({kinds}); {self.n_kept} kept, {self.n_dropped} dropped{skipped}"
        ]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  dropped ({reason}): {n}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        if self.n_skipped:
            where = f"; all listed in {self.skipped_path}" if self.skipped_path else ""
            lines.append(f"  skipped (data.on_bad_row=skip): {self.n_skipped} rows{where}")
            lines += [f"    {message}" for message in self.skipped_examples]
        if any(self.truncated.values()):
            lines.append(f"  truncated among kept examples: prompt {self.truncated.get('prompt', 0)}, "
                         f"completion {self.truncated.get('completion', 0)}")  # fmt: skip
        if self.lengths:
            lines.append(f"  {'tokens (before truncation)':<28}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
            for part in ("prompt", "completion"):
                stats = self.lengths.get(part, {})
                lines.append(f"  {part:<28}" + "".join(f"{stats.get(k, 0):>7}" for k in ("p50", "p90", "p99", "max")))
        return "\n".join(lines)


def _summarize(paths: list[Path], raw: list[RawCompletion], encoded: list[_Encoded]) -> CompletionSummary:
    valid = [(r, e) for r, e in zip(raw, encoded) if e.error is None]
    kept = [e for _, e in valid if e.example is not None]
    return CompletionSummary(
        files=[shown(p) for p in paths], n_read=len(valid), n_kept=len(kept),
        kinds=dict(Counter(r.kind for r, _ in valid)),
        dropped=dict(Counter(e.reason for _, e in valid if e.reason is not None)),
        truncated={part: sum(e.truncated[k] for e in kept) for k, part in enumerate(("prompt", "completion"))},
        lengths={part: percentiles([e.lengths[k] for _, e in valid]) for k, part in enumerate(("prompt", "completion"))},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Reading rows and the loader

_Rec = tuple[Path, int, "dict[str, Any] | Unreadable"]


def _column(data_cfg: Any, name: str) -> str:
    return dict(getattr(data_cfg, "columns", None) or {}).get(name, name)


def _first_and_rest(path: Path, required: tuple[str, str]) -> tuple[list[Any], Iterator[Any]] | None:
    """The first record and the rest of `path` read for the columns `required`; None if a table lacks them."""
    it = records(path, required)
    try:
        first = next(it, None)
    except DataError as e:
        if e.field in required and e.detail.startswith("no '"):  # files._require_columns: wrong kind of table
            return None
        raise
    return ([] if first is None else [first]), it


def _file_records(path: Path, data_cfg: Any) -> Iterator[tuple[int, Any]]:
    """Every record of one file. Tables (CSV, Parquet, save_to_disk) must hold the columns of one row
    kind: prompt/completion or messages, or chosen/rejected with data.sft_target."""
    pair_columns = (_column(data_cfg, "chosen"), _column(data_cfg, "rejected"))
    if getattr(data_cfg, "sft_target", None) is not None:
        yield from records(path, pair_columns)
        return
    for required in (
        (_column(data_cfg, "prompt"), _column(data_cfg, "completion")),
        (_column(data_cfg, "messages"),) * 2,
    ):
        found = _first_and_rest(path, required)
        if found is not None:
            yield from found[0]
            yield from found[1]
            return
    if _first_and_rest(path, pair_columns) is not None:
        raise DataError(shown(path), PAIRS_NEED_TARGET)
    raise DataError(
        shown(path), "no completion or messages column; expected prompt/completion columns or a messages column"
    )


def _read_records(sources: list[list[Path]], data_cfg: Any) -> tuple[list[_Rec], list[int]]:
    """Every record of every file, in order, and how many each source (a files entry) holds."""
    recs: list[_Rec] = []
    counts: list[int] = []
    for paths in sources:
        start = len(recs)
        for path in paths:
            before = len(recs)
            recs.extend((path, rownum, value) for rownum, value in _file_records(path, data_cfg))
            if len(recs) == before:
                empty = "the file is empty" if path.is_file() and path.stat().st_size == 0 else "the file holds no rows"
                raise DataError(shown(path), f"{empty}; expected rows with prompt/completion fields or a messages list")
        counts.append(len(recs) - start)
    return recs, counts


def _normalize(
    recs: list[_Rec], chosen: list[int], data_cfg: Any, skip: bool, labels: bool = False
) -> tuple[list[RawCompletion], list[int], list[dict[str, Any]]]:
    """The records `chosen` (indices into recs) as RawCompletions with their record index; a malformed row
    raises (skip=False) or becomes a skip record. A pair row without data.sft_target always raises: the
    file is of the wrong kind, not a row of it."""
    raw: list[RawCompletion] = []
    where: list[int] = []
    skipped: list[dict[str, Any]] = []
    columns = dict(getattr(data_cfg, "columns", None) or {})
    for i in chosen:
        path, rownum, value = recs[i]
        if getattr(data_cfg, "sft_target", None) is None and _is_pair_row(value, columns):
            raise row_error(shown(path), rownum, PAIRS_NEED_TARGET)
        try:
            if isinstance(value, Unreadable):
                raise value.error
            raw.append(normalize_completion_row(value, shown(path), rownum, data_cfg, labels))
            where.append(i)
        except DataError as e:
            if not skip:
                e.args = (e.args[0] + SKIP_HINT,)
                raise
            row = value if isinstance(value, dict) else None
            skipped.append(skip_record(e, row, value.text if isinstance(value, Unreadable) else None))
    return raw, where, skipped


def _arrange(picks: list[int], where: list[int], encoded: list[_Encoded]) -> list[TokenizedCompletion]:
    """The kept examples in `picks` order (a row picked twice by a weight > 1 appears twice, as its
    own TokenizedCompletion sharing the lists), each with index = its position."""
    position = {rec: k for k, rec in enumerate(where)}
    used: set[int] = set()
    out: list[TokenizedCompletion] = []
    for rec in picks:
        k = position.get(rec)
        ex = encoded[k].example if k is not None else None
        if ex is None:
            continue
        out.append(ex if k not in used else TokenizedCompletion(ex.input_ids, ex.spans, label=ex.label))
        used.add(k)  # type: ignore[arg-type]
    for index, ex in enumerate(out):
        ex.index = index
    return out


def load_completions(
    files: str | Path | Sequence[str | Path], tokenizer: Any, data_cfg: Any, skipped_path: str | Path | None = None,
    labels: bool = False,
) -> tuple[list[TokenizedCompletion], CompletionSummary]:
    """Read, validate, tokenise and truncate every completion row of `files` (specs, or a `DataFiles`
    from `data_files` that also selects rows), as `dpokit.data.pairs.load_pairs` does for pairs: the
    same bad-row handling (data.on_bad_row, `skipped_path`), row selection and summary.

    `data_cfg` needs `max_length`, `max_prompt_length`, `truncation_mode`, `sft_target`, `sft_loss_on`
    and may have `on_bad_row`, `columns`, `format` and the Hub split keys. TokenizedCompletion.index
    is the example's position in the returned list. `labels` (`dpokit kto`): rows carry a boolean
    `label`, kept in TokenizedCompletion.label.
    """
    on_bad_row = getattr(data_cfg, "on_bad_row", "error")
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row must be error or skip, got {on_bad_row!r}")
    skip = on_bad_row == "skip"
    plan = plan_files(files, data_cfg)
    sources = expand_sources(plan)
    paths = [p for entry in sources for p in entry]
    recs, counts = _read_records(sources, data_cfg)
    picks = plan.select(counts)
    raw, where, skipped = _normalize(recs, list(dict.fromkeys(picks)), data_cfg, skip, labels)
    del recs
    try:
        encoded = _encode_all(raw, tokenizer, data_cfg, skip)
    except DataError as e:  # only raised when not skipping: a row the chat template cannot render
        e.args = (e.args[0] + SKIP_HINT,)
        raise
    for r, enc in zip(raw, encoded):
        if enc.example is not None:
            enc.example.label = r.label
        if enc.error is not None:
            row = {"messages": r.messages} if r.is_chat else {"prompt": r.prompt, "completion": r.completion}
            skipped.append(skip_record(enc.error, row if r.label is None else {**row, "label": r.label}, None))
    if skipped_path is not None:
        write_skipped(skipped_path, skipped)
    summary = _summarize(paths, raw, encoded)
    summary.notes = selection_notes(plan, sources, counts, picks)
    return finish_summary(summary, skipped, skipped_path, paths, _arrange(picks, where, encoded), unit="examples")


def check_completions(
    files: str | Path | Sequence[str | Path], data_cfg: Any, rows: int = 8, labels: bool = False
) -> None:
    """A cheap look before any model loads: every file exists and is readable (Hub ids resolved), holds
    rows of a kind `dpokit sft` reads (`labels`: `dpokit kto`'s labelled rows), and (with
    data.on_bad_row=error) its first `rows` rows are valid."""
    skip = getattr(data_cfg, "on_bad_row", "error") == "skip"
    for path in (p for entry in expand_sources(plan_files(files, data_cfg)) for p in entry):
        head: list[_Rec] = []
        for rownum, value in _file_records(path, data_cfg):
            head.append((path, rownum, value))
            if len(head) == rows:
                break
        if not head:
            _read_records([[path]], data_cfg)  # raises the empty-file error with its wording
        _normalize(head, list(range(len(head))), data_cfg, skip, labels)


# ----------------------------------------------------------------------------------------------
# Batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class CompletionCollator:
    """Right-pads `TokenizedCompletion`s into the padded layout of the module docstring."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set a pad token on the tokenizer)")
        self.pad_token_id = int(pad_token_id)
        self.multiple = pad_to_multiple_of or 1

    def describe(self) -> str:
        return "padded completion rows"

    def __call__(self, examples: list[TokenizedCompletion]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        seq_len = _round_up(max(len(e.input_ids) for e in examples), self.multiple)  # T
        ids, real, scored = [], [], []
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for r, e in enumerate(examples):
            n_pad = seq_len - len(e.input_ids)
            ids.append(e.input_ids + [self.pad_token_id] * n_pad)
            real.append([1] * len(e.input_ids) + [0] * n_pad)
            mask = [False] * seq_len
            for col, target in e.scores():
                mask[col + 1] = True
                rows.append(r)
                cols.append(col)
                targets.append(target)
            scored.append(mask)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (N, T)
            "attention_mask": torch.tensor(real, dtype=torch.long),  # (N, T)
            "completion_mask": torch.tensor(scored, dtype=torch.bool),  # (N, T)
            "score_index": torch.tensor([rows, cols, targets, rows], dtype=torch.long).reshape(4, -1),  # (4, M)
            "example_index": torch.tensor([e.index for e in examples], dtype=torch.long),  # (N,)
        }


@dataclass
class _Sequence:
    """One packed unit: what `PackedCollator._segments` reads (`tokens`, `branches`)."""

    tokens: list[int]
    branches: list[int]


class PackedCompletionCollator(PackedCollator):
    """Packs `TokenizedCompletion`s back to back into rows (`data.packing`): positions restart at 0 per
    example and attention stays within it (`dpokit.data.packing` explains how the model is told). Row
    sizing (`balanced_rows` / `first_fit_decreasing`) and the varlen segments are PackedCollator's."""

    def __init__(self, pad_token_id: int, *, max_tokens: int = 0, pad_to_multiple_of: int | None = None,
                 attention_tokens: float = 4096.0, varlen: bool = False) -> None:  # fmt: skip
        super().__init__(pad_token_id, packing=True, prefix_sharing=False, max_tokens=max_tokens,
                         pad_to_multiple_of=pad_to_multiple_of, attention_tokens=attention_tokens, varlen=varlen)  # fmt: skip

    def describe(self) -> str:
        return "packed completion rows" + (" (varlen attention segments)" if self.varlen else " (4D attention mask)")

    def __call__(self, examples: list[TokenizedCompletion]) -> dict[str, Tensor]:  # type: ignore[override]
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        lengths = [len(e.input_ids) for e in examples]
        if self.max_tokens:
            layout = first_fit_decreasing(lengths, _round_up(self.max_tokens, self.multiple))
        else:
            layout = balanced_rows(lengths, self.attention_tokens, self.multiple)
        seq_len = _round_up(max(sum(lengths[k] for k in row) for row in layout), self.multiple)  # T
        ids, real, pos, seg = [], [], [], []
        score: list[list[int]] = [[], [], [], []]  # rows, cols, targets, examples
        for r, row in enumerate(layout):
            row_ids: list[int] = []
            for k in row:
                for col, target in examples[k].scores():
                    for lst, v in zip(score, (r, len(row_ids) + col, target, k)):
                        lst.append(v)
                row_ids += examples[k].input_ids
            n_pad = seq_len - len(row_ids)
            ids.append(row_ids + [self.pad_token_id] * n_pad)
            real.append([1] * len(row_ids) + [0] * n_pad)
            # row padding is a sequence of its own (positions from 0, segment -1), as in PackedCollator
            pos.append([p for k in row for p in range(lengths[k])] + list(range(n_pad)))
            seg.append([k for k in row for _ in range(lengths[k])] + [-1] * n_pad)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (R, T)
            "attention_mask": torch.tensor(real, dtype=torch.long),  # (R, T) real tokens (not for the model)
            "position_ids": torch.tensor(pos, dtype=torch.long),  # (R, T)
            "segment_ids": torch.tensor(seg, dtype=torch.long),  # (R, T)
            "score_index": torch.tensor(score, dtype=torch.long).reshape(4, -1),  # (4, M)
            "example_index": torch.tensor([e.index for e in examples], dtype=torch.long),  # (N,)
        }
        if self.varlen:
            units = [_Sequence(e.input_ids, [PROMPT] * len(e.input_ids)) for e in examples]
            batch.update(self._segments(units, layout, seq_len))  # type: ignore[arg-type]
        return batch
