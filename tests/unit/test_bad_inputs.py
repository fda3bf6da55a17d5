"""The malformed-input corpus (tests/fixtures/bad/ plus inputs generated here) at library level.

Every bad input must raise a DataError (or ModelError for tokenizer problems) whose message names the
file, the row or line, the field and what was expected; inputs that are fine by design (BOM, CRLF, CSV
with embedded newlines, a 10 MB row, mixed row formats, duplicates, an over-long prompt) must load.
Big, binary and truncated inputs are generated in tmp_path rather than committed.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dpokit
from dpokit.data.pairs import load_pairs
from dpokit.errors import DataError, ModelError

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad"
TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
GOOD = {"prompt": "What colour is the sky?", "chosen": "Blue on a clear day.", "rejected": "Green, always."}
GOOD2 = {"prompt": "Name a prime number.", "chosen": "Seven.", "rejected": "Nine."}


def cfg(**overrides: Any) -> SimpleNamespace:
    base = {
        "format": "auto",
        "max_length": 64,
        "max_prompt_length": 32,
        "truncation_mode": "keep_end",
        "on_bad_row": "error",
    }
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def jsonl_bytes(rows: list[Any], newline: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + newline for r in rows).encode("utf-8")


def assert_located(error: BaseException, path: Path | str, where: str | None, field: str | None, expected: str) -> None:
    """The message names the file, then the row/line, then the field, then what was expected."""
    text = str(error)
    prefix = str(path) + (f", {where}" if where else "") + (f", field '{field}'" if field else "") + ": "
    assert text.startswith(prefix), f"{text!r} does not start with {prefix!r}"
    assert expected in text, text
    if isinstance(error, DataError):
        assert error.field == field


# ---------------------------------------------------------------------------------------------
# Committed fixtures that must be refused: (file, location, field, what the message says)

REFUSED = [
    ("invalid_json.jsonl", "line 2", None, "invalid JSON (expecting ',' delimiter at column 34)"),
    ("not_an_object.jsonl", "line 2", None, "expected a JSON object, got a list"),
    ("json_array_as_jsonl.jsonl", "line 1", None, "the file looks like one JSON document: name it .json"),
    ("prompt_number.jsonl", "line 2", "prompt", "expected text, got a number"),
    ("chosen_list_of_strings.jsonl", "line 2", "chosen[0]", "expected a message object with role and content"),
    ("rejected_null.jsonl", "line 3", "rejected", "expected text, got null"),
    ("missing_rejected.jsonl", "line 2", "rejected", "missing field 'rejected' (fields present: prompt, chosen)"),
    ("missing_prompt.jsonl", "line 2", "prompt", "missing field 'prompt'"),
    ("empty_chosen.jsonl", "line 2", "chosen", "text is empty or only whitespace"),
    ("whitespace_rejected.jsonl", "line 2", "rejected", "text is empty or only whitespace"),
    ("identical.jsonl", "line 2", "rejected", "chosen and rejected are identical"),
    ("conv_last_turn_user.jsonl", "line 2", "chosen[2].role", "the last turn must be the assistant's, got 'user'"),
    ("conv_unknown_role.jsonl", "line 1", "chosen[0].role", "unknown role 'human'; expected one of system, user"),
    ("conv_content_not_text.jsonl", "line 1", "chosen[1].content", "expected text, got a list"),
    ("csv_missing_column.csv", "line 1 (header)", "rejected", "no 'rejected' column; expected prompt/chosen/rejected"),
    ("csv_ragged.csv", "line 3", None, "expected 3 columns (prompt, chosen, rejected), got 4"),
    ("wrong_shape.json", None, None, "expected a list of rows or an object with one key holding that list"),
    ("empty.jsonl", None, None, "the file is empty; expected one JSON object with prompt/chosen/rejected fields"),
    ("blank_lines.jsonl", None, None, "the file holds no rows"),
    ("no_data_dir", None, None, "folder has no data files (expected .jsonl, .json, .csv, .parquet files"),
    ("pairs.txt", None, None, "unsupported file type '.txt'; expected one of .jsonl"),
]


@pytest.mark.parametrize(("name", "where", "field", "expected"), REFUSED, ids=[c[0] for c in REFUSED])
def test_committed_bad_fixture_is_refused_with_location(
    tok: Any, name: str, where: str | None, field: str | None, expected: str
) -> None:
    path = BAD / name
    with pytest.raises(DataError) as info:
        load_pairs([path], tok, cfg())
    assert_located(info.value, path, where, field, expected)


def test_row_errors_suggest_skipping(tok: Any) -> None:
    with pytest.raises(DataError, match=r"to skip malformed rows instead, set data.on_bad_row=skip\)$"):
        load_pairs([BAD / "prompt_number.jsonl"], tok, cfg())
    with pytest.raises(DataError) as info:  # a file-level problem cannot be skipped, so no such hint
        load_pairs([BAD / "empty.jsonl"], tok, cfg())
    assert "on_bad_row" not in str(info.value)


def test_missing_file(tok: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_pairs([tmp_path / "nope.jsonl"], tok, cfg())
    assert_located(info.value, tmp_path / "nope.jsonl", None, None, "no such file or folder")


# ---------------------------------------------------------------------------------------------
# Generated bad inputs: truncated, binary, undecodable, Parquet with other columns


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _generated(tmp: Path, name: str) -> Path:
    full = jsonl_bytes([GOOD, GOOD2, GOOD])
    if name == "truncated.jsonl":  # a download cut off in the middle of the last row
        return _write(tmp / name, full[: len(full) - 20])
    if name == "truncated.json":
        return _write(tmp / name, json.dumps([GOOD, GOOD2]).encode()[:-30])
    if name == "truncated.parquet":
        good = _parquet(tmp / "whole.parquet", [GOOD, GOOD2] * 50)
        return _write(tmp / name, good.read_bytes()[: good.stat().st_size // 2])
    if name == "undecodable.jsonl":  # Latin-1 bytes in a UTF-8 file
        return _write(tmp / name, jsonl_bytes([GOOD]) + b'{"prompt": "caf\xe9?", "chosen": "yes", "rejected": "no"}\n')
    if name == "gzip.jsonl":
        return _write(tmp / name, gzip.compress(full))
    if name == "binary.jsonl":
        return _write(tmp / name, bytes(range(256)) * 4)
    if name == "utf16.jsonl":
        return _write(tmp / name, full.decode().encode("utf-16"))
    if name == "parquet_named.jsonl":
        return _write(tmp / name, _parquet(tmp / "p.parquet", [GOOD]).read_bytes())
    if name == "other_columns.parquet":
        return _parquet(tmp / name, [{"question": "q", "answer_good": "a", "answer_bad": "b"}])
    if name == "null_in_parquet.parquet":
        return _parquet(tmp / name, [GOOD, {**GOOD2, "chosen": None}])
    raise AssertionError(name)


GENERATED = [
    ("truncated.jsonl", "line 3", None, "the last line has no line end, so the file looks truncated"),
    ("truncated.json", "line 1", None, "the document ends early, so the file looks truncated"),
    ("truncated.parquet", None, None, "cannot read Parquet file"),
    ("undecodable.jsonl", "line 2", None, "not valid UTF-8 (byte 0xe9); re-save the file as UTF-8"),
    ("gzip.jsonl", None, None, "expected UTF-8 text, but the file is gzip-compressed; decompress it first"),
    ("binary.jsonl", "line 1", None, "expected UTF-8 text, but the file is binary (it holds NUL bytes)"),
    ("utf16.jsonl", None, None, "expected UTF-8 text, but the file is UTF-16 text; re-save it as UTF-8"),
    (
        "parquet_named.jsonl",
        None,
        None,
        "expected UTF-8 text, but the file is a Parquet file; give it the .parquet extension",
    ),
    (
        "other_columns.parquet",
        None,
        "chosen",
        "no 'chosen' column; expected prompt/chosen/rejected columns, found: question, answer_good, answer_bad",
    ),
    ("null_in_parquet.parquet", "row 1 (0-based)", "chosen", "expected text, got null"),
]


@pytest.mark.parametrize(("name", "where", "field", "expected"), GENERATED, ids=[c[0] for c in GENERATED])
def test_generated_bad_input_is_refused_with_location(
    tok: Any, tmp_path: Path, name: str, where: str | None, field: str | None, expected: str
) -> None:
    path = _generated(tmp_path, name)
    with pytest.raises(DataError) as info:
        load_pairs([path], tok, cfg())
    assert_located(info.value, path, where, field, expected)


# ---------------------------------------------------------------------------------------------
# Fine by design: BOM, CRLF, embedded newlines, a 10 MB row, mixed formats, long prompts, duplicates


def test_bom_and_crlf_load_like_plain_lf(tok: Any, tmp_path: Path) -> None:
    plain = _write(tmp_path / "plain.jsonl", jsonl_bytes([GOOD, GOOD2]))
    odd = _write(tmp_path / "bom_crlf.jsonl", b"\xef\xbb\xbf" + jsonl_bytes([GOOD, GOOD2], newline="\r\n"))
    csv_path = _write(
        tmp_path / "bom_crlf.csv",
        b"\xef\xbb\xbfprompt,chosen,rejected\r\n"
        + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\r\n' for r in (GOOD, GOOD2)).encode(),
    )
    expected, _ = load_pairs([plain], tok, cfg())
    for path in (odd, csv_path):
        pairs, summary = load_pairs([path], tok, cfg())
        assert pairs == expected and summary.n_skipped == 0, path


def test_csv_with_embedded_newlines_loads(tok: Any) -> None:
    from dpokit.data.files import read_rows
    from dpokit.data.pairs import normalize_row

    path = BAD / "embedded_newlines.csv"
    rows = [normalize_row(row, path, n) for n, row in read_rows(path)]
    assert [r.row for r in rows] == [2, 6]  # a record is numbered by the line it starts on
    assert rows[0].prompt == "Write a haiku\nabout rain."
    assert rows[0].chosen.count("\n") == 2 and rows[1].chosen == "Hi, friend!"
    pairs, _ = load_pairs([path], tok, cfg(max_length=512, max_prompt_length=256))
    assert tok.decode(pairs[0].prompt_ids) == rows[0].prompt


def test_ten_megabyte_row_is_truncated_quickly(tok: Any, tmp_path: Path) -> None:
    import time

    words = "The quick brown fox jumps over the lazy dog. "
    huge = (words * (10_000_000 // len(words) + 1))[:10_000_000]
    path = _write(tmp_path / "big.jsonl", jsonl_bytes([{**GOOD, "chosen": huge}, GOOD2]))
    assert path.stat().st_size > 10_000_000
    start = time.perf_counter()
    pairs, summary = load_pairs([path], tok, cfg())
    assert time.perf_counter() - start < 10  # tokenizing the whole row would take ~20 s
    big = pairs[0]
    assert len(big.prompt_ids) + len(big.chosen_ids) == 64  # cut to max_length exactly
    assert huge.startswith(tok.decode(big.chosen_ids))  # the response keeps its start
    assert summary.truncated["chosen"] == 1 and summary.n_precut == 1
    assert "cut before tokenizing" in summary.render()


def test_precut_gives_the_same_tokens_as_full_tokenization(tok: Any) -> None:
    """Cutting a long text before tokenizing must not change the tokens that truncation keeps."""
    from dpokit.data.pairs import RawPair, tokenize_pair

    text = "".join(f"w{i % 97}{'é' if i % 7 == 0 else ''}{'  ' if i % 5 == 0 else ' '}" for i in range(6_000))
    for mode in ("keep_end", "keep_start"):
        for max_length, max_prompt_length in ((48, 16), (300, 200)):
            pair = RawPair(text, text[1:], text[2:], "standard", "f.jsonl", 1)
            cut = tokenize_pair(pair, tok, max_length, max_prompt_length, mode)
            whole = tokenize_pair(pair, tok, None, None, mode)
            p = whole.prompt_ids
            p = p[-max_prompt_length:] if mode == "keep_end" else p[:max_prompt_length]
            budget = max_length - len(p)
            assert (cut.prompt_ids, cut.chosen_ids, cut.rejected_ids) == (
                p,
                whole.chosen_ids[:budget],
                whole.rejected_ids[:budget],
            ), (mode, max_length)


def test_mixed_row_formats_allowed_under_auto_refused_when_forced(tok: Any) -> None:
    path = BAD / "mixed_formats.jsonl"
    pairs, summary = load_pairs([path], tok, cfg())
    assert len(pairs) == 3 and summary.kinds == {"standard": 1, "conversational": 1, "implicit": 1}
    with pytest.raises(DataError) as info:
        load_pairs([path], tok, cfg(format="standard"))
    assert_located(info.value, path, "line 2", "chosen", "expected text (data.format is 'standard'), got a list")
    with pytest.raises(DataError) as info:
        load_pairs([path], tok, cfg(format="conversational"))
    assert_located(info.value, path, "line 1", "chosen", "expected a list of messages (data.format is")


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_longer_than_max_length_is_cut(tok: Any, mode: str) -> None:
    path = BAD / "long_prompt.jsonl"
    pairs, summary = load_pairs([path], tok, cfg(max_length=64, max_prompt_length=32, truncation_mode=mode))
    long = pairs[0]
    assert len(long.prompt_ids) == 32
    prompt = tok.decode(long.prompt_ids)
    assert prompt.endswith(" word399 END") if mode == "keep_end" else prompt.startswith("word0 word1")
    assert tok.decode(long.chosen_ids) == "Short answer.<|endoftext|>"  # responses untouched: they fit
    assert summary.lengths["prompt"]["max"] > 64 and summary.truncated == {"prompt": 1, "chosen": 0, "rejected": 0}


def test_duplicates_are_kept_and_counted(tok: Any) -> None:
    pairs, summary = load_pairs([BAD / "duplicates.jsonl"], tok, cfg())
    assert len(pairs) == 5  # kept: a repeated pair is a legitimate weight
    assert (summary.n_duplicates, summary.n_contradictory) == (2, 1)
    text = summary.render()
    assert "warning: 2 duplicate pairs" in text and "warning: 1 contradictory pairs" in text


# ---------------------------------------------------------------------------------------------
# data.on_bad_row=skip


BAD_LINES = [
    b'{"prompt": "2+2?", "chosen": "4" "rejected": "5"}',  # invalid JSON
    b'{"prompt": 42, "chosen": "a", "rejected": "b"}',  # wrong type
    b'{"prompt": "p", "chosen": "a"}',  # missing field
    b'{"prompt": "p", "chosen": "same", "rejected": "same"}',  # identical
    b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # undecodable
    b'["not", "an", "object"]',
]


def _mixed_file(tmp_path: Path) -> Path:
    good = [json.dumps({"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}).encode() for i in range(4)]
    lines = [good[0], BAD_LINES[0], good[1], *BAD_LINES[1:4], good[2], *BAD_LINES[4:], good[3]]
    return _write(tmp_path / "mixed.jsonl", b"\n".join(lines) + b"\n")


def test_skip_mode_skips_counts_and_lists_bad_rows(tok: Any, tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: invalid JSON"):
        load_pairs([path], tok, cfg())
    skipped = tmp_path / "out" / "skipped.jsonl"
    pairs, summary = load_pairs([path], tok, cfg(on_bad_row="skip"), skipped_path=skipped)
    assert len(pairs) == 4 and summary.n_read == 4 and summary.n_skipped == 6
    assert [p.index for p in pairs] == [0, 1, 2, 3]
    records = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    assert [(r["row"], r["field"]) for r in records] == [
        (2, None),
        (4, "prompt"),
        (5, "rejected"),
        (6, "rejected"),
        (8, None),
        (9, None),
    ]
    assert all(r["file"] == str(path) and r["reason"] and r["location"] == f"line {r['row']}" for r in records)
    assert records[1]["raw"] == {"prompt": 42, "chosen": "a", "rejected": "b"}  # parsed: the row itself
    assert records[0]["raw"] is None and records[0]["text"].startswith('{"prompt": "2+2?"')  # unparsed: its text
    assert "caf\ufffd" in records[4]["text"]
    text = summary.render()
    assert "4 kept, 0 dropped, 6 malformed rows skipped" in text and str(skipped) in text
    assert f"{path}, line 2: invalid JSON" in text  # first examples shown


def test_skip_mode_rewrites_the_list_and_removes_a_stale_one(tok: Any, tmp_path: Path) -> None:
    skipped = tmp_path / "skipped.jsonl"
    load_pairs([_mixed_file(tmp_path)], tok, cfg(on_bad_row="skip"), skipped_path=skipped)
    load_pairs([_mixed_file(tmp_path)], tok, cfg(on_bad_row="skip"), skipped_path=skipped)
    assert len(skipped.read_text().splitlines()) == 6  # replaced, not appended
    clean = _write(tmp_path / "clean.jsonl", jsonl_bytes([GOOD, GOOD2]))
    _, summary = load_pairs([clean], tok, cfg(on_bad_row="skip"), skipped_path=skipped)
    assert not skipped.exists() and summary.n_skipped == 0 and "skipped" not in summary.render()


def test_skip_mode_all_rows_bad_is_an_error(tok: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "all_bad.jsonl", b"\n".join(BAD_LINES) + b"\n")
    with pytest.raises(DataError, match=r"all 6 rows are malformed and were skipped \(first: .*line 1: invalid JSON"):
        load_pairs([path], tok, cfg(on_bad_row="skip"), skipped_path=tmp_path / "s.jsonl")
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 6  # listed even though the load failed


@pytest.mark.parametrize("name", ["empty.jsonl", "csv_missing_column.csv", "wrong_shape.json", "no_data_dir"])
def test_skip_mode_still_refuses_file_level_problems(tok: Any, name: str) -> None:
    with pytest.raises(DataError, match=str(BAD / name).replace("\\", "\\\\")):
        load_pairs([BAD / name], tok, cfg(on_bad_row="skip"))


def test_skip_mode_covers_rows_the_chat_template_rejects(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    strict.chat_template = (
        "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('system turns are not supported') }}"
        "{%- endif -%}" + tok.chat_template
    )
    user, bot, rude = (
        {"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "Hello"), ("assistant", "No"))
    )
    system = {"role": "system", "content": "Be kind."}
    path = _write(
        tmp_path / "chat.jsonl",
        jsonl_bytes(
            [
                {"chosen": [user, bot], "rejected": [user, rude]},
                {"chosen": [system, user, bot], "rejected": [system, user, rude]},
            ]
        ),
    )
    with pytest.raises(DataError) as info:
        load_pairs([path], strict, cfg())
    assert_located(info.value, path, "line 2", None, "the chat template failed on this conversation: system turns")
    pairs, summary = load_pairs([path], strict, cfg(on_bad_row="skip"), skipped_path=tmp_path / "s.jsonl")
    assert len(pairs) == 1 and summary.n_skipped == 1
    record = json.loads((tmp_path / "s.jsonl").read_text())
    assert record["row"] == 2 and record["raw"]["prompt"][0] == system


# ---------------------------------------------------------------------------------------------
# Tokenizers: no pad token (fine: EOS pads), no pad and no EOS, no chat template for chat data


def edited_copy(src: Path, dst: Path, drop: tuple[str, ...] = (), chat_template: bool = True) -> Path:
    """Copy a tokenizer (or model) folder, removing special-token keys and optionally the chat template."""
    shutil.copytree(src, dst)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (dst / name).is_file():
            config = json.loads((dst / name).read_text())
            for key in drop + (() if chat_template else ("chat_template",)):
                config.pop(key, None)
            (dst / name).write_text(json.dumps(config))
    if not chat_template:
        (dst / "chat_template.jinja").unlink(missing_ok=True)  # where transformers >= 4.5x saves it
    return dst


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dpokit.models.sources import load_tokenizer

    tokenizer = load_tokenizer(edited_copy(tiny_model_dir, tmp_path / "m", ("pad_token",)))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    pairs, _ = load_pairs([BAD / "duplicates.jsonl"], tokenizer, cfg())
    assert len(pairs) == 5


def test_tokenizer_without_pad_or_eos_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dpokit.models.sources import load_tokenizer

    with pytest.raises(ModelError, match="has neither a pad token nor an EOS token"):
        load_tokenizer(edited_copy(tiny_model_dir, tmp_path / "m", ("pad_token", "eos_token")))


def test_tokenizer_without_eos_for_plain_text_names_the_row(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(str(edited_copy(TOKENIZER_DIR, tmp_path / "t", ("eos_token",))))
    path = BAD / "mixed_formats.jsonl"
    with pytest.raises(ModelError) as info:
        load_pairs([path], no_eos, cfg())
    assert_located(info.value, path, "line 1", None, "plain-text responses must end with an EOS token")


def test_chat_rows_without_chat_template_name_the_row(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    plain_tok = AutoTokenizer.from_pretrained(str(edited_copy(TOKENIZER_DIR, tmp_path / "t", chat_template=False)))
    assert not plain_tok.chat_template
    path = BAD / "mixed_formats.jsonl"
    with pytest.raises(ModelError) as info:
        load_pairs([path], plain_tok, cfg())
    assert_located(info.value, path, "line 2", None, "conversational row (message lists; 1 such rows)")
    assert "has no chat_template" in str(info.value)
