"""Preference pairs: rows -> `RawPair` -> `TokenizedPair` (+ a `DataSummary`).

Rows come from `dpokit.data.files`.

Row formats (`normalize_row`, detected per row unless ``data.format`` forces one)
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  "chosen"/"rejected" are message lists [{"role", "content"}]. Without "prompt", the
                    prompt is every turn before the final assistant turn (identical in both). With a
                    "prompt" message list, chosen/rejected are its continuation (TRL style) or full
                    conversations that start with it.
    implicit        only "chosen"/"rejected" strings sharing a prefix (Anthropic HH): the prompt is the
                    common prefix cut after the last "\\n\\nAssistant:" marker, else before the last
                    whitespace run so no word is split (the response keeps its leading space).

Columns: data.columns ({prompt: question, chosen: response_j, ...}, dpokit name -> dataset column)
renames every row's columns before validation; errors then name the dataset's column.

Margin: any row may carry a number "margin" (null or absent = 0; in a CSV a numeric text), kept on
RawPair / TokenizedPair for `dpokit reward` (how far r_chosen must exceed r_rejected); DPO ignores it.

Tokenization (`tokenize_pair`) follows docs/design.md: prompt and responses are tokenized separately
and concatenated, so the prompt/response boundary is exact by construction. A text much longer than
max_length (over `_PRECUT_CHARS_PER_TOKEN` characters per allowed token) is cut to that window before
tokenizing, so one 10 MB row costs milliseconds instead of a full tokenization of text truncation drops.

At scale (`load_pairs`): data.cache_tokenized keeps the tokenized pairs of a load on disk
(`dpokit.data.cache`, keyed by the tokenizer, a hash of the normalised rows and the truncation
settings), so a second run with the same inputs skips tokenizing; data.num_proc tokenizes chunks of
rows in that many processes (forked where possible), with the output of one process.

Bad rows (`load_pairs`)
    data.on_bad_row=error (default): the first malformed row raises DataError naming file, row, field.
    data.on_bad_row=skip: malformed rows (unparseable line, wrong type, missing/empty field, identical
    responses, bad roles, a chat template failing on the row) are skipped, counted in the summary and
    written to `skipped_path`. File-level problems (missing, empty, binary, unreadable file, no
    chosen/rejected columns) and model problems (no chat template / EOS) always raise.
    Duplicate pairs (same prompt, chosen, rejected) are kept and counted with a warning in the summary,
    as are contradictory pairs (same prompt, chosen and rejected swapped): repeating a pair is a
    legitimate way to weight it, and silently dropping rows would change the data behind the user's back.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.data import cache as data_cache
from dpokit.data.collate import TokenizedPair
from dpokit.data.files import DataFiles, Unreadable, describe_row, expand_sources, records, row_error, shown, type_name
from dpokit.errors import ConfigError, DataError, ModelError, writing

__all__ = [
    "RawPair",
    "DataSummary",
    "normalize_row",
    "split_implicit_prompt",
    "tokenize_pair",
    "tokenize_pairs",
    "load_pairs",
    "FORMATS",
    "TRUNCATION_MODES",
]

logger = logging.getLogger(__name__)

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
    margin: float = 0.0  # the row's optional "margin" (reward models); 0 when absent



# ----------------------------------------------------------------------------------------------
# Row validation and normalisation


def normalize_row(row: dict[str, Any], path: str | Path, rownum: int, fmt: str = "auto") -> RawPair:
    """Validate one row and turn it into a `RawPair`; any problem raises DataError naming file, row, field."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(row, dict):
        raise row_error(path, rownum, f"expected an object with chosen/rejected fields, got {type_name(row)}")
    for name in ("chosen", "rejected"):
        if name not in row:
            raise row_error(path, rownum, f"missing field '{name}' (fields present: {', '.join(map(str, row))})", name)
    kind = _detect_kind(row)
    if fmt != "auto" and kind != fmt:
        field_name, message = _format_mismatch(row, fmt)
        raise row_error(path, rownum, message, field_name)

    if kind == "conversational":
        prompt, chosen, rejected = _normalize_conversation(row, path, rownum)
    else:
        texts = {name: text_field(row[name], path, rownum, name) for name in ("chosen", "rejected")}
        if texts["chosen"] == texts["rejected"]:
            raise row_error(
                path, rownum, "chosen and rejected are identical, so the pair expresses no preference", "rejected"
            )
        if kind == "standard":
            prompt, chosen, rejected = text_field(row["prompt"], path, rownum, "prompt"), texts["chosen"], texts["rejected"]
        else:
            prompt, chosen, rejected = split_implicit_prompt(texts["chosen"], texts["rejected"])
            if not prompt.strip():
                # Nothing shared to infer a prompt from: far likelier a standard row that lost its
                # prompt than a real implicit pair, and an empty prompt cannot be scored anyway.
                raise row_error(
                    path,
                    rownum,
                    "missing field 'prompt' (and chosen/rejected share no leading text to use as an implicit prompt); "
                    f"expected prompt/chosen/rejected text (fields present: {', '.join(map(str, row))})",
                    "prompt",
                )
            for name, response in (("chosen", chosen), ("rejected", rejected)):
                if not response.strip():
                    raise row_error(
                        path,
                        rownum,
                        "response is empty once the prompt shared with the other response is removed",
                        name,
                    )
    return RawPair(prompt, chosen, rejected, kind, str(path), rownum, _margin(row, path, rownum))


def _margin(row: dict[str, Any], path: str | Path, rownum: int) -> float:
    """The row's optional "margin": a finite number, 0 when absent or null. A CSV holds only text, so
    there a numeric text counts (an empty cell is absent); anywhere else text is an error."""
    value = row.get("margin")
    if isinstance(value, str) and str(path).lower().endswith(".csv"):
        try:
            value = float(value) if value.strip() else None
        except ValueError:
            pass
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        shown_value = f" {value!r}" if isinstance(value, (str, float)) else ""
        raise row_error(
            path, rownum, f"expected a finite number (how far the chosen reward must exceed the rejected one), "
            f"got {type_name(value)}{shown_value}", "margin",
        )  # fmt: skip
    return float(value)


def _detect_kind(row: dict[str, Any]) -> str:
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        return "conversational"
    return "standard" if "prompt" in row else "implicit"


def _format_mismatch(row: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(field, message) explaining why a row does not match the format forced by data.format."""
    forced = f"data.format is '{fmt}'"
    if fmt == "conversational":
        bad = "chosen" if not isinstance(row["chosen"], list) else "rejected"
        return bad, f"expected a list of messages ({forced}), got {type_name(row[bad])}"
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        bad = "chosen" if isinstance(row["chosen"], list) else "rejected"
        return bad, f"expected text ({forced}), got a list of messages"
    if fmt == "standard":
        return "prompt", f"missing field 'prompt' ({forced})"
    return "prompt", f"unexpected field 'prompt' ({forced}: the prompt is the shared prefix of chosen and rejected)"


def text_field(value: Any, path: str | Path, rownum: int, name: str) -> str:
    if not isinstance(value, str):
        raise row_error(path, rownum, f"expected text, got {type_name(value)}", name)
    if not value.strip():
        raise row_error(path, rownum, "text is empty or only whitespace", name)
    return value


def parse_messages(value: Any, path: str | Path, rownum: int, name: str) -> Messages:
    """Validate a message list; returns copies without null-valued keys (Arrow structs add them)."""
    if not isinstance(value, list):
        raise row_error(path, rownum, f"expected a list of messages, got {type_name(value)}", name)
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise row_error(
                path, rownum, f"expected a message object with role and content, got {type_name(message)}", where
            )
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message:
            raise row_error(path, rownum, "message without a role", f"{where}.role")
        if message["role"] not in ROLES:
            raise row_error(
                path, rownum, f"unknown role {message['role']!r}; expected one of {', '.join(ROLES)}", f"{where}.role"
            )
        if "content" not in message:
            raise row_error(path, rownum, "message without content", f"{where}.content")
        text_field(message["content"], path, rownum, f"{where}.content")
        out.append(message)
    return out


def _normalize_conversation(row: dict[str, Any], path: str | Path, rownum: int) -> tuple[Messages, Messages, Messages]:
    chosen = parse_messages(row["chosen"], path, rownum, "chosen")
    rejected = parse_messages(row["rejected"], path, rownum, "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise row_error(path, rownum, "empty message list", name)
        if turns[-1]["role"] != "assistant":
            last = f"{name}[{len(turns) - 1}].role"
            raise row_error(path, rownum, f"the last turn must be the assistant's, got '{turns[-1]['role']}'", last)
    if "prompt" in row:
        prompt = parse_messages(row["prompt"], path, rownum, "prompt")
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
            raise row_error(
                path,
                rownum,
                f"chosen and rejected must share every turn before the final assistant turn; they differ at turn {turn}",
                "rejected",
            )
        chosen, rejected = chosen[-1:], rejected[-1:]
    if chosen == rejected:
        raise row_error(
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

# Texts far longer than max_length are cut before tokenizing: tokenizing a 10 MB row takes ~20 s and
# truncation would throw almost all of it away. The window holds CHARS_PER_TOKEN characters for every
# token truncation can keep, plus MARGIN tokens, and the cut is placed at a word boundary, so the
# tokens that are kept are the same as with the whole text. If a window yields too few tokens to be
# sure (over 32 characters per token on average), the whole text is tokenized after all.
_PRECUT_CHARS_PER_TOKEN = 32
_PRECUT_MARGIN_TOKENS = 16


@dataclass
class _Encoded:
    """One pair's tokenization outcome, with what the summary needs."""

    pair: TokenizedPair | None
    reason: str | None  # why the pair is dropped (pair is None)
    lengths: tuple[int, int, int]  # prompt/chosen/rejected tokens before truncation
    truncated: tuple[bool, bool, bool]
    precut: bool = False  # a text was cut before tokenizing: `lengths` are lower bounds
    error: DataError | None = None  # the row could not be rendered (only under on_bad_row=skip)


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
    return [e.pair if e.pair is not None else e.reason for e in encoded]  # type: ignore[misc]


def _tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return f"the tokenizer of {name}" if name else "the tokenizer"


def _check_tokenizer(pairs: Sequence[RawPair], tokenizer: Any, mode: str) -> None:
    """Problems of the settings or the tokenizer, not of rows: never skipped, but located at the first
    row they hit (checked on all rows before they are split among processes)."""
    if mode not in TRUNCATION_MODES:
        raise ConfigError(f"data.truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    plain = [p for p in pairs if p.kind != "conversational"]
    chat = [p for p in pairs if p.kind == "conversational"]
    if chat and not getattr(tokenizer, "chat_template", None):
        first = chat[0]
        raise ModelError(
            f"{first.source}, {describe_row(first.source, first.row)}: conversational row (message lists; "
            f"{len(chat)} such rows) but {_tokenizer_name(tokenizer)} has no chat_template to render it; "
            "use a tokenizer with one, or convert the data to prompt/chosen/rejected text"
        )
    if plain and tokenizer.eos_token_id is None:
        first = plain[0]
        raise ModelError(
            f"{first.source}, {describe_row(first.source, first.row)}: plain-text responses must end with "
            f"an EOS token, but {_tokenizer_name(tokenizer)} has no eos_token; set one"
        )


def _encode(
    pairs: Sequence[RawPair],
    tokenizer: Any,
    max_length: int | None,
    max_prompt_length: int | None,
    mode: str,
    skip_bad_rows: bool = False,
) -> list[_Encoded]:
    _check_tokenizer(pairs, tokenizer, mode)
    plain = [i for i, p in enumerate(pairs) if p.kind != "conversational"]
    chat = [i for i, p in enumerate(pairs) if p.kind == "conversational"]
    eos = tokenizer.eos_token_id if plain else None

    errors: dict[int, DataError] = {}
    texts: list[tuple[str, str, str]] = []  # (prompt, chosen, rejected) strings
    for i, pair in enumerate(pairs):
        try:
            texts.append(_render(pair, tokenizer))
        except DataError as e:
            if not skip_bad_rows:
                raise
            errors[i] = e
            texts.append(("", "", ""))  # placeholder, never used
    plain = [i for i in plain if i not in errors]
    chat = [i for i in chat if i not in errors]
    good = [i for i in range(len(pairs)) if i not in errors]

    prompt_keep = max_prompt_length if max_prompt_length is not None else max_length
    prompts: list[list[int]] = [[] for _ in pairs]
    precut = [False] * len(pairs)
    for group, special in ((plain, True), (chat, False)):
        ids, cut = tokenize_window([texts[i][0] for i in group], tokenizer, special, prompt_keep, mode == "keep_start")
        for i, pids, was_cut in zip(group, ids, cut):
            prompts[i], precut[i] = pids, was_cut
    responses: dict[tuple[int, int], list[int]] = {}
    keys = [(i, k) for i in good for k in (1, 2)]
    ids, cut = tokenize_window([texts[i][k] for i, k in keys], tokenizer, False, max_length, True)
    for key, rids, was_cut in zip(keys, ids, cut):
        responses[key] = rids
        precut[key[0]] |= was_cut

    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for i, pair in enumerate(pairs):
        if i in errors:
            out.append(_Encoded(None, None, (0, 0, 0), (False, False, False), error=errors[i]))
            continue
        chosen, rejected = responses[i, 1], responses[i, 2]
        if pair.kind != "conversational":  # plain text ends with EOS, unless the text already has it
            chosen, rejected = (r if r and r[-1] == eos else r + [eos] for r in (chosen, rejected))
        encoded = _truncate(prompts[i], chosen, rejected, max_length, max_prompt_length, mode, bos)
        encoded.precut = precut[i]
        out.append(encoded)
    return out


def tokenize_window(
    texts: list[str], tokenizer: Any, add_special_tokens: bool, keep: int | None, keep_start: bool
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text, tokenizing only the window that can hold the `keep` tokens truncation keeps.

    Returns the ids and, per text, whether it was cut (its ids then stop short of the full length).
    """
    windows = [_precut(text, keep, keep_start) for text in texts]
    ids = _batch_ids(tokenizer, windows, add_special_tokens)
    cut = [len(w) < len(t) for w, t in zip(windows, texts)]
    if keep is not None:
        # Too few tokens to be sure the kept ones are far from the cut: tokenize the whole text.
        retry = [i for i in range(len(texts)) if cut[i] and len(ids[i]) < keep + _PRECUT_MARGIN_TOKENS]
        for i, full in zip(retry, _batch_ids(tokenizer, [texts[i] for i in retry], add_special_tokens)):
            ids[i], cut[i] = full, False
    return ids, cut


def _precut(text: str, keep: int | None, keep_start: bool) -> str:
    """The start (keep_start) or end of `text` long enough for `keep` tokens, cut before whitespace.

    Cutting where whitespace follows a non-space character keeps word-level pre-tokenization (GPT-2
    style byte-level BPE, SentencePiece) identical on the kept side; the token margin absorbs the rest.
    """
    if keep is None:
        return text
    window = _PRECUT_CHARS_PER_TOKEN * (keep + _PRECUT_MARGIN_TOKENS)
    if len(text) <= window:
        return text
    slack = window // 4  # look for a word boundary in the outer quarter of the window
    if keep_start:
        for k in range(window, window - slack, -1):
            if text[k].isspace() and not text[k - 1].isspace():
                return text[:k]
        return text[:window]
    start = len(text) - window
    for k in range(start, start + slack):
        if text[k].isspace() and not text[k - 1].isspace():
            return text[k:]
    return text[start:]


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _render(pair: RawPair, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text to tokenize; chat pairs are rendered with the chat template."""
    if pair.kind != "conversational":
        return pair.prompt, pair.chosen, pair.rejected  # type: ignore[return-value]
    try:  # templates are arbitrary Jinja and may raise anything (e.g. "roles must alternate")
        prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        fulls = [
            tokenizer.apply_chat_template(pair.prompt + turns, tokenize=False) for turns in (pair.chosen, pair.rejected)
        ]
    except Exception as e:
        raise row_error(pair.source, pair.row, f"the chat template failed on this conversation: {e}") from None
    for name, full in zip(("chosen", "rejected"), fulls):
        if not full.startswith(prompt):
            raise row_error(
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
    """What `load_pairs` read, kept, dropped and skipped, for a one-screen report."""

    files: list[str] = field(default_factory=list)
    n_read: int = 0  # valid pairs read (skipped rows not included)
    n_kept: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # row format -> pairs read
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs
    truncated: dict[str, int] = field(default_factory=dict)  # "prompt"/"chosen"/"rejected" -> kept pairs cut
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> p50/p90/p99/max, before truncation
    n_skipped: int = 0  # malformed rows skipped under data.on_bad_row=skip
    skipped_examples: list[str] = field(default_factory=list)  # the first few skip messages
    skipped_path: str | None = None  # where the skipped rows were written
    n_duplicates: int = 0  # pairs identical to an earlier pair (kept)
    n_contradictory: int = 0  # pairs whose swap (same prompt, chosen <-> rejected) came earlier (kept)
    n_precut: int = 0  # pairs with a text cut before tokenizing (lengths above are lower bounds)
    notes: list[str] = field(default_factory=list)  # row selection (eval carve, weights), tokenized cache

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def render(self) -> str:
        """A few lines of plain text for the console / log."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        skipped = f", {self.n_skipped} malformed rows skipped" if self.n_skipped else ""
        lines = [
            f"data: {self.n_read} pairs read from {files} ({kinds}); "
            f"{self.n_kept} kept, {self.n_dropped} dropped{skipped}"
        ]
        lines.extend(f"  {note}" for note in self.notes)
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped ({reason}): {n}")
        if self.n_skipped:
            where = f"; all listed in {self.skipped_path}" if self.skipped_path else ""
            lines.append(f"  skipped (data.on_bad_row=skip): {self.n_skipped} rows{where}")
            lines.extend(f"    {message}" for message in self.skipped_examples)
        if self.n_duplicates:
            lines.append(
                f"  warning: {self.n_duplicates} duplicate pairs (same prompt, chosen and rejected as an earlier "
                "pair); kept, so they weigh more: dedupe the data if that is not intended"
            )
        if self.n_contradictory:
            lines.append(
                f"  warning: {self.n_contradictory} contradictory pairs (an earlier pair has the same prompt with "
                "chosen and rejected swapped); kept, their gradients cancel"
            )
        if any(self.truncated.values()):
            cut = ", ".join(f"{part} {self.truncated.get(part, 0)}" for part in _PARTS)
            lines.append(f"  truncated among kept pairs: {cut}")
        if self.n_precut:
            lines.append(
                f"  {self.n_precut} pairs hold texts far over data.max_length, cut before tokenizing "
                "(their token lengths below are lower bounds)"
            )
        if self.lengths:
            lines.append(f"  {'tokens (before truncation)':<28}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
            for part in _PARTS:
                stats = self.lengths.get(part, {})
                lines.append(f"  {part:<28}" + "".join(f"{stats.get(k, 0):>7}" for k in ("p50", "p90", "p99", "max")))
        return "\n".join(lines)


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (always an observed length)."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    xs = sorted(values)
    rank = {p: xs[max(math.ceil(p / 100 * len(xs)) - 1, 0)] for p in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": xs[-1]}


def _pair_key(prompt: Any, chosen: Any, rejected: Any) -> bytes:
    # A digest, not the texts: holding every text twice in a set would double the memory of big sets.
    text = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _count_repeats(raw: list[RawPair]) -> tuple[int, int]:
    """(duplicates, contradictory pairs) among `raw`, each counted at its later occurrence."""
    seen: set[bytes] = set()
    duplicates = contradictory = 0
    for pair in raw:
        key = _pair_key(pair.prompt, pair.chosen, pair.rejected)
        if key in seen:
            duplicates += 1
        elif _pair_key(pair.prompt, pair.rejected, pair.chosen) in seen:
            contradictory += 1
        seen.add(key)
    return duplicates, contradictory


def _summarize(files: list[Path], raw: list[RawPair], encoded: list[_Encoded]) -> DataSummary:
    valid = [e for e in encoded if e.error is None]
    kept = [e for e in valid if e.pair is not None]
    duplicates, contradictory = _count_repeats([p for p, e in zip(raw, encoded) if e.error is None])
    return DataSummary(
        files=[shown(f) for f in files],
        n_read=len(valid),
        n_kept=len(kept),
        kinds=dict(Counter(p.kind for p, e in zip(raw, encoded) if e.error is None)),
        dropped=dict(Counter(e.reason for e in valid if e.reason is not None)),
        truncated={part: sum(e.truncated[k] for e in kept) for k, part in enumerate(_PARTS)},
        lengths={part: percentiles([e.lengths[k] for e in valid]) for k, part in enumerate(_PARTS)},
        n_duplicates=duplicates,
        n_contradictory=contradictory,
        n_precut=sum(e.precut for e in valid),
    )


SKIP_HINT = " (to skip malformed rows instead, set data.on_bad_row=skip)"
_EMPTY_EXPECTED = {
    ".jsonl": "one JSON object with prompt/chosen/rejected fields per line",
    ".json": "a list of objects with prompt/chosen/rejected fields",
    ".csv": "a header line (prompt,chosen,rejected) and one row per pair",
    ".parquet": "prompt/chosen/rejected columns with at least one row",
}


def skip_record(error: DataError, row: Any, text: str | None) -> dict[str, Any]:
    """One line of skipped.jsonl: where, why, and the row itself when it could be parsed."""
    record: dict[str, Any] = {
        "file": error.path,
        "row": error.row,
        "location": describe_row(error.path, error.row) if error.row is not None else None,
        "field": error.field,
        "reason": error.detail,
        "raw": row,
    }
    if row is None and text is not None:
        record["text"] = text[:2000]  # the unparseable line, clipped: a binary blob need not be copied whole
    return record


def write_skipped(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace `path` with this load's skipped rows; remove it when none were skipped (no stale lists)."""
    path = Path(path)
    if not records:
        path.unlink(missing_ok=True)
        return
    with writing("the list of skipped rows", path):  # a full disk here: a WriteError, not a traceback
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                # default=str: Parquet rows may hold dates or bytes, which JSON has no type for.
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Reading and selecting rows

_Rec = tuple[Path, int, "dict[str, Any] | Unreadable"]


def _read_records(sources: list[list[Path]], required: tuple[str, str]) -> tuple[list[_Rec], list[int]]:
    """Every record of every file, in order, and how many each source (a files entry) holds."""
    recs: list[_Rec] = []
    counts: list[int] = []
    for paths in sources:
        start = len(recs)
        for path in paths:
            before = len(recs)
            recs.extend((path, rownum, value) for rownum, value in records(path, required))
            if len(recs) == before:
                expected = _EMPTY_EXPECTED.get(path.suffix.lower(), "rows with prompt/chosen/rejected fields")
                empty = "the file is empty" if path.is_file() and path.stat().st_size == 0 else "the file holds no rows"
                raise DataError(shown(path), f"{empty}; expected {expected}")
        counts.append(len(recs) - start)
    return recs, counts


def _normalize(
    recs: list[_Rec], chosen: list[int], fmt: str, skip: bool, columns: dict[str, str]
) -> tuple[list[RawPair], list[int], list[dict[str, Any]]]:
    """The records `chosen` (indices into recs) as RawPairs, with the record index of each; a malformed
    row raises (skip=False) or becomes a skip record."""
    raw: list[RawPair] = []
    where: list[int] = []
    skipped: list[dict[str, Any]] = []
    for i in chosen:
        path, rownum, value = recs[i]
        try:
            if isinstance(value, Unreadable):
                raise value.error
            raw.append(normalize_mapped_row(value, path, rownum, fmt, columns))
            where.append(i)
        except DataError as e:
            if not skip:
                e.args = (e.args[0] + SKIP_HINT,)
                raise
            row = value if isinstance(value, dict) else None
            skipped.append(skip_record(e, row, value.text if isinstance(value, Unreadable) else None))
    return raw, where, skipped


def normalize_mapped_row(row: dict[str, Any], path: Path, rownum: int, fmt: str, columns: dict[str, str]) -> RawPair:
    """`normalize_row` after renaming the dataset's columns to dpokit's (data.columns: name -> column);
    errors name the dataset's column, which is what the user can look up."""
    name = shown(path)
    if not columns:
        return normalize_row(row, name, rownum, fmt)
    for key, column in columns.items():
        if column not in row:
            present = ", ".join(map(str, row))
            message = f"missing column '{column}' (data.columns maps it to {key}; columns present: {present})"
            raise row_error(name, rownum, message, column)
    # The mapped columns replace any column that already has a dpokit name (a dataset may hold an
    # unrelated "prompt" column next to the "question" the user picked).
    renamed = {k: v for k, v in row.items() if k not in columns and k not in columns.values()}
    renamed.update({key: row[column] for key, column in columns.items()})
    try:
        return normalize_row(renamed, name, rownum, fmt)
    except DataError as e:
        if e.row is None:
            raise
        field_name = e.field
        head = re.match(r"\w+", field_name) if field_name else None  # "chosen[0].content" -> "chosen"
        if head and head.group(0) in columns:
            field_name = columns[head.group(0)] + field_name[head.end() :]  # type: ignore[index]
        mapping = ", ".join(f"{column} -> {key}" for key, column in columns.items())
        raise row_error(e.path, e.row, f"{e.detail} (data.columns: {mapping})", field_name) from None


def plan_files(files: str | Path | Sequence[str | Path], data_cfg: Any) -> DataFiles:
    """`files` as a DataFiles. A plain list reads the Hub split data.eval_split when it is
    data.eval_files (and not also data.train_files: then only a DataFiles can tell), else
    data.train_split; the eval carve and mixture weights come only with a DataFiles from
    `data_files` (they need train.seed)."""
    if isinstance(files, DataFiles):
        return files
    specs = [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]
    eval_files = [str(f) for f in getattr(data_cfg, "eval_files", None) or []]
    train_files = [str(f) for f in getattr(data_cfg, "train_files", None) or []]
    is_eval = bool(eval_files) and specs == eval_files and specs != train_files
    split = getattr(data_cfg, "eval_split", "test") if is_eval else getattr(data_cfg, "train_split", "train")
    return DataFiles(specs, split=split, subset=getattr(data_cfg, "subset", None))


def selection_notes(plan: DataFiles, sources: list[list[Path]], counts: list[int], picks: list[int]) -> list[str]:
    """Summary lines saying which rows were used: the eval carve, the mixture weights."""
    notes = []
    total = sum(counts)
    if plan.eval_fraction > 0:
        held = plan.eval_rows(total)
        side = f"{held} held out as the eval split" if plan.part == "eval" else f"{total - held} left for training"
        notes.append(f"data.eval_fraction {plan.eval_fraction:g}: of {total} rows, {side} (seeded by train.seed)")
    if plan.weights and plan.part != "eval":
        starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
        unweighted = DataFiles(plan, part=plan.part, eval_fraction=plan.eval_fraction, seed=plan.seed).select(counts)
        for i, (paths, weight) in enumerate(zip(sources, plan.weights)):
            before = sum(starts[i] <= r < starts[i + 1] for r in unweighted)
            after = sum(starts[i] <= r < starts[i + 1] for r in picks)
            name = shown(paths[0]) + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "") if paths else "-"
            notes.append(f"data.train_weights[{i}] = {weight:g}: {name}: {before} rows -> {after}")
    return notes


def _arrange(picks: list[int], where: list[int], encoded: list[_Encoded]) -> list[TokenizedPair]:
    """The kept pairs in `picks` order (a row picked twice by a weight > 1 appears twice, as its own
    TokenizedPair sharing the id lists), each with index = its position."""
    position = {rec: k for k, rec in enumerate(where)}
    used: set[int] = set()
    pairs: list[TokenizedPair] = []
    for rec in picks:
        k = position.get(rec)
        pair = encoded[k].pair if k is not None else None
        if pair is None:
            continue
        pairs.append(pair if k not in used else TokenizedPair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids,
                                                                margin=pair.margin))  # fmt: skip
        used.add(k)  # type: ignore[arg-type]
    for index, pair in enumerate(pairs):
        pair.index = index
    return pairs


# ----------------------------------------------------------------------------------------------
# Tokenizing at scale: the tokenized-pairs cache and data.num_proc processes


def _rows_digest(raw: list[RawPair]) -> str:
    """Hash of exactly what tokenization reads: each pair's texts, kind and where it came from (the
    file name, with a Hub dataset's revision, and the row, which errors quote). It covers the file
    bytes, data.format, data.columns, the Hub split/subset/revision and the row selection: a change
    to any of them that changes a row changes the key, and nothing else does."""
    h = hashlib.sha256()
    for p in raw:
        record = [p.source, p.row, p.kind, p.prompt, p.chosen, p.rejected]
        h.update(json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _encode_all(raw: list[RawPair], tokenizer: Any, data_cfg: Any, skip: bool) -> tuple[list[_Encoded], list[str]]:
    """Tokenize `raw` through the tokenized-pairs cache (data.cache_tokenized) in data.num_proc
    processes; returns the encodings and a note for the summary."""
    settings = (
        getattr(data_cfg, "max_length", None),
        getattr(data_cfg, "max_prompt_length", None),
        getattr(data_cfg, "truncation_mode", "keep_end"),
    )
    num_proc = int(getattr(data_cfg, "num_proc", 1) or 1)
    _check_tokenizer(raw, tokenizer, settings[2])
    start = time.perf_counter()
    if not getattr(data_cfg, "cache_tokenized", False):  # off for plain objects: only a DataConfig opts in
        return _encode_procs(raw, tokenizer, settings, skip, num_proc), []
    keyed = {"max_length": settings[0], "max_prompt_length": settings[1], "truncation_mode": settings[2], "skip": skip}
    key = data_cache.entry_key(tokenizer, keyed, _rows_digest(raw))
    path = data_cache.entry_path(key)
    entry = data_cache.load_entry(path, key)
    encoded = _from_arrays(*entry, len(raw), path) if entry is not None else None
    if encoded is not None:
        note = f"tokenized pairs cache hit: {len(raw)} rows in {time.perf_counter() - start:.1f}s ({path})"
        logger.info("data: %s", note)
        return encoded, [note]
    encoded = _encode_procs(raw, tokenizer, settings, skip, num_proc)
    arrays, summary = _to_arrays(encoded)
    saved = data_cache.save_entry(path, key, arrays, summary)
    procs = f" in {num_proc} processes" if num_proc > 1 else ""
    note = f"tokenized {len(raw)} rows{procs} in {time.perf_counter() - start:.1f}s" + (f"; cached in {path}" if saved else "")
    logger.info("data: %s", note)
    return encoded, [note]


def _to_arrays(encoded: list[_Encoded]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encodings as integer arrays (+ the drop reasons and row errors as JSON) for the cache."""
    import numpy as np

    n = len(encoded)
    parts = np.zeros((n, 3), dtype=np.int64)
    reason = np.full(n, -1, dtype=np.int64)
    error = np.full(n, -1, dtype=np.int64)
    reasons: dict[str, int] = {}
    errors: list[list[Any]] = []
    ids: list[int] = []
    for i, e in enumerate(encoded):
        if e.pair is not None:
            parts[i] = (len(e.pair.prompt_ids), len(e.pair.chosen_ids), len(e.pair.rejected_ids))
            ids += e.pair.prompt_ids
            ids += e.pair.chosen_ids
            ids += e.pair.rejected_ids
        if e.reason is not None:
            reason[i] = reasons.setdefault(e.reason, len(reasons))
        if e.error is not None:
            error[i] = len(errors)
            errors.append(list(_error_fields(e.error)))
    flat = np.asarray(ids, dtype=np.int64)
    if not flat.size or (flat.min() >= 0 and flat.max() < 2**31):
        flat = flat.astype(np.int32)  # half the size; every real vocabulary fits
    arrays = {
        "ids": flat,
        "parts": parts,
        "lengths": np.asarray([e.lengths for e in encoded], dtype=np.int64).reshape(n, 3),
        "flags": np.asarray([(*e.truncated, e.precut) for e in encoded], dtype=np.uint8).reshape(n, 4),
        "reason": reason,
        "error": error,
    }
    return arrays, {"rows": n, "reasons": list(reasons), "errors": errors}


def _from_arrays(arrays: dict[str, Any], summary: dict[str, Any], n: int, path: Path) -> list[_Encoded] | None:
    """The encodings a cache entry holds, or None (with a warning) if it does not fit `n` rows."""
    try:
        parts, lengths, flags = arrays["parts"], arrays["lengths"], arrays["flags"]
        fits = (
            summary.get("rows") == n and parts.shape == (n, 3) and lengths.shape == (n, 3) and flags.shape == (n, 4)
            and arrays["reason"].shape == (n,) and arrays["error"].shape == (n,)
            and int(parts.sum()) == arrays["ids"].shape[0]
        )  # fmt: skip
        if not fits:
            raise ValueError("its arrays do not match the rows")
        ids = arrays["ids"].tolist()
        rows = zip(parts.tolist(), lengths.tolist(), flags.tolist(), arrays["reason"].tolist(), arrays["error"].tolist())
        out, pos = [], 0
        for (a, b, c), length, flag, r, err in rows:
            pair = None
            if a:  # a kept pair has a prompt; dropped ones store no ids
                pair = TokenizedPair(ids[pos : pos + a], ids[pos + a : pos + a + b], ids[pos + a + b : pos + a + b + c])
                pos += a + b + c
            error = _error_from(summary["errors"][err]) if err >= 0 else None
            reason = summary["reasons"][r] if r >= 0 else None
            out.append(_Encoded(pair, reason, tuple(length), tuple(bool(x) for x in flag[:3]), bool(flag[3]), error))
        return out
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        data_cache.ignore_entry(path, str(exc))
        return None


def _error_fields(error: DataError) -> tuple[Any, ...]:
    # DataError cannot be pickled or stored as is (its __init__ takes the path and message apart)
    return (error.path, error.detail, error.row, error.field, error.args[0])


def _error_from(fields: Sequence[Any]) -> DataError:
    error = DataError(fields[0], fields[1], row=fields[2], field=fields[3])
    error.args = (fields[4],)
    return error


_WORKER_TOKENIZER: Any = None


@contextlib.contextmanager
def _tokenizers_parallelism_off() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while the workers start: each forked worker would otherwise print
    the tokenizers library's "process just got forked" warning (num_proc processes use the cores)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _worker_init(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes already share the cores
    _WORKER_TOKENIZER = tokenizer


def _encode_chunk(chunk: list[RawPair], settings: tuple[Any, Any, str], skip: bool) -> tuple[str, Any]:
    try:
        encoded = _encode(chunk, _WORKER_TOKENIZER, *settings, skip_bad_rows=skip)
    except DataError as e:
        return "error", _error_fields(e)
    packed = [(e.pair, e.reason, e.lengths, e.truncated, e.precut, e.error and _error_fields(e.error)) for e in encoded]
    return "ok", packed


def _encode_procs(
    raw: list[RawPair], tokenizer: Any, settings: tuple[Any, Any, str], skip: bool, num_proc: int
) -> list[_Encoded]:
    """`_encode` over chunks of rows in `num_proc` processes, results in row order: the same output
    as one process, because every text is tokenized on its own."""
    if num_proc <= 1 or len(raw) < 2:
        return _encode(raw, tokenizer, *settings, skip_bad_rows=skip)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n_chunks = min(len(raw), 4 * num_proc)  # several per process, so one slow chunk does not idle the rest
    bounds = [len(raw) * k // n_chunks for k in range(n_chunks + 1)]
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    # fork where the platform allows it (Linux): spawn and forkserver re-import the caller's main
    # module in every worker, which re-runs a script without an `if __name__ == "__main__"` guard (and
    # `python -m dpokit`), and they pickle the tokenizer to each worker. The workers only tokenize:
    # no torch, no CUDA, no locks of the parent's threads. macOS (fork unsafe) and Windows spawn.
    forkable = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    workers = min(num_proc, n_chunks)
    with _tokenizers_parallelism_off(), ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(tokenizer,)
    ) as pool:
        results = list(pool.map(_encode_chunk, chunks, [settings] * n_chunks, [skip] * n_chunks))
    out: list[_Encoded] = []
    for status, value in results:
        if status == "error":  # the first failing chunk holds the first failing row, as in one process
            raise _error_from(value)
        for pair, reason, lengths, truncated, precut, error in value:
            out.append(_Encoded(pair, reason, lengths, truncated, precut, _error_from(error) if error else None))
    return out


# ----------------------------------------------------------------------------------------------
# The top-level loader


def load_pairs(
    files: str | Path | Sequence[str | Path],
    tokenizer: Any,
    data_cfg: Any,
    skipped_path: str | Path | None = None,
) -> tuple[list[TokenizedPair], DataSummary]:
    """Read, validate, normalise and tokenize every pair of `files`.

    `files`: specs as `dpokit.data.files.expand_sources` takes them (files, globs, folders, Hub
    dataset ids), or a `DataFiles` (from `data_files`) that also selects rows: one side of the
    data.eval_fraction carve, data.train_weights. `data_cfg` needs `format`, `max_length`,
    `max_prompt_length` and `truncation_mode` attributes, and may have `on_bad_row` ("error", the
    default, or "skip"), `columns`, `train_split` / `eval_split` / `subset`, `num_proc` and
    `cache_tokenized` (off unless present). With "error" the first malformed row raises DataError
    naming file, row and field. With "skip" malformed rows are left out, counted in the summary and,
    if `skipped_path` is given, written there as JSON Lines (file, row, location, field, reason, raw
    row or, if it could not be parsed, its text); the file is replaced on every call and removed
    when nothing was skipped. File-level problems raise in both modes.

    Pairs that tokenization cannot keep are dropped and counted in the summary. TokenizedPair.index is
    the pair's position in the returned list.
    """
    fmt = getattr(data_cfg, "format", "auto")
    on_bad_row = getattr(data_cfg, "on_bad_row", "error")
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row must be error or skip, got {on_bad_row!r}")
    skip = on_bad_row == "skip"
    columns = dict(getattr(data_cfg, "columns", None) or {})
    plan = plan_files(files, data_cfg)
    sources = expand_sources(plan)
    paths = [path for entry in sources for path in entry]
    recs, counts = _read_records(sources, (columns.get("chosen", "chosen"), columns.get("rejected", "rejected")))
    picks = plan.select(counts)
    raw, where, skipped = _normalize(recs, list(dict.fromkeys(picks)), fmt, skip, columns)
    del recs  # the rows are in `raw` now; the parsed records can go
    try:
        encoded, notes = _encode_all(raw, tokenizer, data_cfg, skip)
    except DataError as e:  # only raised when not skipping: a row the chat template cannot render
        e.args = (e.args[0] + SKIP_HINT,)
        raise
    for pair, enc in zip(raw, encoded):
        if enc.pair is not None:  # set here, not while tokenizing: the tokenized-pairs cache holds only ids
            enc.pair.margin = pair.margin
        if enc.error is not None:
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            skipped.append(skip_record(enc.error, row, None))
    if skipped_path is not None:
        write_skipped(skipped_path, skipped)
    summary = _summarize(paths, raw, encoded)
    summary.notes = selection_notes(plan, sources, counts, picks) + notes
    return finish_summary(summary, skipped, skipped_path, paths, _arrange(picks, where, encoded))


def finish_summary(
    summary: Any, skipped: list[dict[str, Any]], skipped_path: str | Path | None, paths: list[Path],
    examples: list[Any], unit: str = "pairs",
) -> tuple[list[Any], Any]:  # fmt: skip
    """The loaders' last step (pairs here, completions in `dpokit.data.completions`): record the
    skipped rows in `summary`, refuse a load that kept nothing (every row malformed, or every
    example dropped by truncation) with the files named, and count what was kept."""
    summary.n_skipped = len(skipped)
    summary.skipped_examples = [
        f"{r['file']}, {r['location']}" + (f", field '{r['field']}'" if r["field"] else "") + f": {r['reason']}"
        for r in skipped[:3]
    ]
    summary.skipped_path = str(skipped_path) if skipped and skipped_path is not None else None
    where = ", ".join(map(shown, paths))
    if summary.n_read == 0:
        listed = f"; all are listed in {skipped_path}" if skipped_path is not None else ""
        raise DataError(
            where,
            f"all {len(skipped)} rows are malformed and were skipped (first: {summary.skipped_examples[0]}){listed}",
        )
    if not examples:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in summary.dropped.items())
        raise DataError(
            where,
            f"all {summary.n_read} {unit} were dropped ({reasons}); check data.max_length / max_prompt_length",
        )
    summary.n_kept = len(examples)  # with data.train_weights, repeats included
    return examples, summary


def check_pairs(files: str | Path | Sequence[str | Path], data_cfg: Any, rows: int = 8) -> None:
    """A cheap look at `files` before any model loads: every file exists and is readable (a Hub id
    is resolved), and its first `rows` rows are valid pairs (with data.on_bad_row=error). Raises the
    DataError `load_pairs` would raise for them; tokenisation problems are found later."""
    columns = dict(getattr(data_cfg, "columns", None) or {})
    required = (columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    skip = getattr(data_cfg, "on_bad_row", "error") == "skip"
    for path in (p for entry in expand_sources(plan_files(files, data_cfg)) for p in entry):
        head = [(path, n, value) for n, value in itertools.islice(records(path, required), rows)]
        if not head:
            _read_records([[path]], required)  # raises the empty-file error with its wording
        if not skip:
            _normalize(head, list(range(len(head))), getattr(data_cfg, "format", "auto"), False, columns)
