"""dpokit.data: file reading, row validation, prompt extraction, tokenization, truncation, summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dpokit
from dpokit.data.collate import TokenizedPair
from dpokit.data.files import describe_row, expand_files, read_rows
from dpokit.data.pairs import RawPair, load_pairs, normalize_row, split_implicit_prompt, tokenize_pair
from dpokit.errors import ConfigError, DataError, ModelError
from tests.conftest import TOY

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
TOY_DIR = TOY

STANDARD = [
    {"prompt": "Describe the weather in Paris.", "chosen": "sunny and warm.", "rejected": "cold, grey ☔."},
    {"prompt": "How was Zürich?", "chosen": "lovely", "rejected": "awful\nreally"},
]
CONVERSATIONAL = [
    {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "sunny"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "gloomy"}],
    },
    {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "warm"},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "bright"},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "warm"},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "dreadful"},
        ],
    },
]


def cfg(**overrides: Any) -> SimpleNamespace:
    base = {"format": "auto", "max_length": 512, "max_prompt_length": 256, "truncation_mode": "keep_end"}
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture
def fresh_tok() -> Any:
    """A private copy for tests that modify the tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


class CharTokenizer:
    """Fake tokenizer: one id per character (ord), so truncation expectations are readable literals."""

    eos_token_id = 0
    chat_template = None

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        prefix = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return {"input_ids": [prefix + [ord(c) for c in text] for text in texts]}


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def write_jsonl(path: Path, rows: list[Any], newline: str = "\n", bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + newline for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def read_pairs(path: Path, fmt: str = "auto") -> list[tuple[Any, Any, Any]]:
    return [(p.prompt, p.chosen, p.rejected) for p in (normalize_row(r, path, n, fmt) for n, r in read_rows(path))]


# ---------------------------------------------------------------------------------------------
# File types


def _write_all_types(tmp_path: Path, rows: list[dict], with_csv: bool) -> list[Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = [write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "crlf.jsonl", rows, "\r\n", bom=True)]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "keyed.json").write_text(json.dumps({"train": rows}), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", rows)  # what Dataset.to_json writes
    out += [tmp_path / "list.json", tmp_path / "keyed.json", tmp_path / "lines.json"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    out += [tmp_path / "a.parquet", tmp_path / "saved"]
    if with_csv:
        with (tmp_path / "a.csv").open("w", encoding="utf-8-sig", newline="") as f:  # BOM + CRLF (csv default)
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
        out.append(tmp_path / "a.csv")
    return out


def test_every_file_type_round_trips_standard_rows(tmp_path: Path) -> None:
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD]
    for path in _write_all_types(tmp_path, STANDARD, with_csv=True):
        assert read_pairs(path) == expected, path


def test_every_structured_file_type_round_trips_conversations(tmp_path: Path) -> None:
    expected = read_pairs(write_jsonl(tmp_path / "ref.jsonl", CONVERSATIONAL))
    assert expected[1][0][-1] == {"role": "user", "content": "And tomorrow?"}
    for path in _write_all_types(tmp_path, CONVERSATIONAL, with_csv=False):
        assert read_pairs(path) == expected, path


def test_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(STANDARD[0]) + "\n\n" + json.dumps(STANDARD[1]) + "\n", encoding="utf-8")
    assert [n for n, _ in read_rows(path)] == [2, 4]  # physical lines, blank lines skipped
    (tmp_path / "a.json").write_text(json.dumps(STANDARD), encoding="utf-8")
    assert [n for n, _ in read_rows(tmp_path / "a.json")] == [0, 1]
    assert describe_row(path, 4) == "line 4"
    assert describe_row(tmp_path / "a.json", 1) == "row 1 (0-based)"


def test_csv_line_numbers_follow_multiline_records(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",yes,no\nq,"",no\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv, line 4, field 'chosen': text is empty"):
        list(load_rows(path))


def load_rows(path: Path) -> list[RawPair]:
    return [normalize_row(r, path, n) for n, r in read_rows(path)]


def test_multiple_files_globs_and_folders(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "b.jsonl", STANDARD)
    write_jsonl(tmp_path / "a.jsonl", STANDARD[:1])
    (tmp_path / "README.md").write_text("not data")
    assert expand_files([str(tmp_path)]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert expand_files(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    # duplicates are read once
    assert expand_files([tmp_path / "b.jsonl", str(tmp_path / "*.jsonl")]) == [
        tmp_path / "b.jsonl",
        tmp_path / "a.jsonl",
    ]
    pairs, summary = load_pairs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tok, cfg())
    assert summary.n_read == summary.n_kept == 3 and [p.index for p in pairs] == [0, 1, 2]
    assert len(summary.files) == 2


def test_save_to_disk_folder_detected(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "ds"))
    assert expand_files([tmp_path / "ds"]) == [tmp_path / "ds"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STANDARD)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]"):
        list(read_rows(tmp_path / "dd"))


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda d: d / "missing.jsonl", "no such file or folder"),
        (lambda d: d / "nothing-*.jsonl", "no file matches this pattern"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "folder has no data files"),
        (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", r"unsupported file type '\.txt'"),
    ],
    ids=["missing", "glob", "empty-folder", "extension"],
)
def test_expand_files_errors(tmp_path: Path, make: Any, pattern: str) -> None:
    spec = make(tmp_path)
    with pytest.raises(DataError, match=pattern) as info:
        expand_files([str(spec)])
    assert str(spec) in str(info.value)


def test_invalid_json_line_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + json.dumps(STANDARD[1]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        list(read_rows(path))


def test_invalid_utf8_line_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(STANDARD[0]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid UTF-8"):
        list(read_rows(path))
    (tmp_path / "bad.csv").write_bytes(b"prompt,chosen,rejected\na,b,c\na,\xff,c\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: not valid UTF-8"):
        list(read_rows(tmp_path / "bad.csv"))


def test_json_document_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"a": [], "b": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"with keys \['a', 'b'\]"):
        list(read_rows(path))
    path.write_text('[\n{"prompt": 1,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, line 3: invalid JSON"):
        list(read_rows(path))
    path.write_text("[1]", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 0 \(0-based\): expected a JSON object, got a number"):
        list(read_rows(path))


# ---------------------------------------------------------------------------------------------
# Row formats and validation


def test_standard_row() -> None:
    pair = normalize_row(STANDARD[0], "f.jsonl", 1)
    assert (pair.kind, pair.source, pair.row) == ("standard", "f.jsonl", 1)
    assert (pair.prompt, pair.chosen, pair.rejected) == (STANDARD[0]["prompt"], "sunny and warm.", "cold, grey ☔.")


def test_conversational_without_prompt_uses_earlier_turns() -> None:
    pair = normalize_row(CONVERSATIONAL[1], "f.jsonl", 1)
    assert pair.kind == "conversational"
    assert pair.prompt == CONVERSATIONAL[1]["chosen"][:-1]
    assert pair.chosen == [{"role": "assistant", "content": "bright"}]
    assert pair.rejected == [{"role": "assistant", "content": "dreadful"}]


def test_conversational_with_explicit_prompt() -> None:
    prompt = [{"role": "user", "content": "Hi"}]
    trl_style = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    full = {"prompt": prompt, "chosen": prompt + trl_style["chosen"], "rejected": prompt + trl_style["rejected"]}
    for row in (trl_style, full):
        pair = normalize_row(row, "f.jsonl", 1, fmt="conversational")
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, trl_style["chosen"], trl_style["rejected"])


def test_implicit_hh_rows() -> None:
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Weather?\n\nAssistant:"
    pair = normalize_row({"chosen": prefix + " Sunny today.", "rejected": prefix + " Sure, it is sunny."}, "f.jsonl", 1)
    assert pair.kind == "implicit"
    assert (pair.prompt, pair.chosen, pair.rejected) == (prefix, " Sunny today.", " Sure, it is sunny.")


def test_implicit_without_markers_cuts_at_word_boundary() -> None:
    assert split_implicit_prompt("The cat is happy", "The cat is hungry") == ("The cat is", " happy", " hungry")
    assert split_implicit_prompt("Q:\n\nyes", "Q:\n\nno") == ("Q:", "\n\nyes", "\n\nno")
    assert split_implicit_prompt("yes", "no") == ("", "yes", "no")


def test_toy_hh_file_prompts_end_with_assistant_marker() -> None:
    pairs = load_rows(TOY_DIR / "hh_style.jsonl")
    assert len(pairs) >= 15
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen.startswith(" ") for p in pairs)


_USER = {"role": "user", "content": "Hi"}
_BOT = {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing field 'rejected'"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "expected text, got a number"),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "chosen", "expected text, got null"),
        ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "prompt", "expected text, got a list"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty or only whitespace"),
        ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "prompt", "empty or only whitespace"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
        ({"chosen": [_USER, _BOT], "rejected": "x"}, "rejected", "expected a list of messages, got text"),
        (
            {"chosen": [{"role": "robot", "content": "x"}, _BOT], "rejected": [_USER, _BOT]},
            "chosen[0].role",
            "unknown role 'robot'",
        ),
        (
            {"chosen": [_USER, _BOT], "rejected": [_USER, {"role": "assistant"}]},
            "rejected[1].content",
            "message without content",
        ),
        ({"chosen": [_USER, _BOT], "rejected": [_BOT, _USER]}, "rejected[1].role", "last turn must be the assistant's"),
        ({"chosen": [_USER, _BOT], "rejected": [_USER, _BOT]}, "rejected", "identical"),
        (
            {"chosen": [_USER, _BOT], "rejected": [{"role": "user", "content": "Yo"}, _BOT]},
            "rejected",
            "differ at turn 0",
        ),
        ({"chosen": "Hello world", "rejected": "Hello world"}, "rejected", "identical"),
    ],
)
def test_validation_errors_name_file_row_and_field(tmp_path: Path, row: dict, field: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [STANDARD[0], row])
    with pytest.raises(DataError) as info:
        load_rows(path)
    text = str(info.value)
    assert text.startswith(f"{path}, line 2, field '{field}': "), text
    assert message in text
    assert (info.value.row, info.value.field) == (2, field)


def test_validation_error_in_index_based_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([STANDARD[0], {**STANDARD[0], "chosen": " "}]), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1 \(0-based\), field 'chosen': text is empty"):
        load_rows(path)


@pytest.mark.parametrize(
    ("fmt", "row", "field", "message"),
    [
        ("standard", {"chosen": "a b", "rejected": "a c"}, "prompt", "missing field 'prompt'"),
        ("standard", CONVERSATIONAL[0], "chosen", "expected text (data.format is 'standard')"),
        (
            "conversational",
            STANDARD[0],
            "chosen",
            "expected a list of messages (data.format is 'conversational'), got text",
        ),
        ("implicit", STANDARD[0], "prompt", "unexpected field 'prompt'"),
    ],
)
def test_forced_format_mismatch(fmt: str, row: dict, field: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"f\.parquet, row 4 \(0-based\), field '{field}'") as info:
        normalize_row(row, "f.parquet", 4, fmt=fmt)
    assert message in str(info.value)


def test_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.format"):
        normalize_row(STANDARD[0], "f.jsonl", 1, fmt="sharegpt")


# ---------------------------------------------------------------------------------------------
# Tokenization and truncation


def _char_pair(prompt: str = "abcdef", chosen: str = "xyz", rejected: str = "uv") -> RawPair:
    return RawPair(prompt, chosen, rejected, "standard", "f.jsonl", 1)


def test_truncation_keep_end_vs_keep_start() -> None:
    tok = CharTokenizer()
    end = tokenize_pair(_char_pair(), tok, max_length=6, max_prompt_length=4, truncation_mode="keep_end")
    start = tokenize_pair(_char_pair(), tok, max_length=6, max_prompt_length=4, truncation_mode="keep_start")
    # prompt cut to 4, then each response (with EOS = 0 appended) cut to 6 - 4 = 2 tokens
    assert end == TokenizedPair(ids("cdef"), ids("xy"), ids("uv"))
    assert start == TokenizedPair(ids("abcd"), ids("xy"), ids("uv"))
    untouched = tokenize_pair(_char_pair(), tok, max_length=None, max_prompt_length=None, truncation_mode="keep_end")
    assert untouched == TokenizedPair(ids("abcdef"), ids("xyz") + [0], ids("uv") + [0])


def test_keep_end_keeps_bos() -> None:
    tok = CharTokenizer(bos=1)
    pair = tokenize_pair(_char_pair(), tok, max_length=20, max_prompt_length=4, truncation_mode="keep_end")
    assert pair.prompt_ids == [1, *ids("def")]
    # a tokenizer that adds BOS never produces an empty prompt
    assert tokenize_pair(_char_pair(prompt=""), tok, None, None).prompt_ids == [1]


def test_drop_reasons() -> None:
    tok = CharTokenizer()
    assert tokenize_pair(_char_pair(), tok, max_length=4, max_prompt_length=4) == "response empty after truncation"
    assert tokenize_pair(_char_pair(prompt=""), tok, None, None) == "empty prompt"
    same_start = _char_pair(chosen="xyz", rejected="xyw")
    assert (
        tokenize_pair(same_start, tok, max_length=8, max_prompt_length=None)
        == "chosen and rejected identical after truncation"
    )
    with pytest.raises(ConfigError, match="truncation_mode"):
        tokenize_pair(_char_pair(), tok, None, None, truncation_mode="middle")


CHAR_ROWS = [
    {"prompt": "abc", "chosen": "xyz", "rejected": "uv"},
    {"prompt": "p" * 30, "chosen": "y", "rejected": "n"},
    {"prompt": "hello", "chosen": "world", "rejected": "there"},
]


def test_dropped_pair_counted_in_summary(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", CHAR_ROWS)
    pairs, summary = load_pairs([path], CharTokenizer(), cfg(max_length=20, max_prompt_length=None))
    assert (summary.n_read, summary.n_kept, summary.n_dropped) == (3, 2, 1)
    assert summary.dropped == {"response empty after truncation": 1}  # the 30-token prompt leaves no room
    assert summary.lengths["prompt"] == {"p50": 5, "p90": 30, "p99": 30, "max": 30}  # before truncation
    assert summary.lengths["chosen"]["max"] == 6  # "world" + EOS
    assert [p.index for p in pairs] == [0, 1] and pairs[1].prompt_ids == ids("hello")
    text = summary.render()
    assert "3 pairs read" in text and "dropped (response empty after truncation): 1" in text and "p99" in text
    with pytest.raises(DataError, match="all 3 pairs were dropped"):
        load_pairs([path], CharTokenizer(), cfg(max_length=2, max_prompt_length=None))


def test_truncated_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", CHAR_ROWS)
    pairs, summary = load_pairs([path], CharTokenizer(), cfg(max_length=6, max_prompt_length=3))
    assert summary.truncated == {"prompt": 2, "chosen": 2, "rejected": 1}
    assert pairs[2] == TokenizedPair(ids("llo"), ids("wor"), ids("the"), index=2)
    assert "truncated among kept pairs: prompt 2, chosen 2, rejected 1" in summary.render()


def test_plain_boundary_is_exact_and_eos_appended(tok: Any) -> None:
    rows = STANDARD + [
        json.loads(line) for line in (TOY_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    ]
    for row in rows:
        raw = normalize_row(row, "f.jsonl", 1)
        pair = tokenize_pair(raw, tok, None, None)
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_token_id
        assert tok.decode(pair.prompt_ids) == row["prompt"]
        assert tok.decode(pair.prompt_ids) + tok.decode(pair.chosen_ids[:-1]) == row["prompt"] + row["chosen"]
        assert tok.decode(pair.rejected_ids[:-1]) == row["rejected"]


def test_chat_pair_tokenization(tok: Any) -> None:
    raw = normalize_row(CONVERSATIONAL[1], "f.jsonl", 1)
    pair = tokenize_pair(raw, tok, None, None)
    prompt_text = tok.apply_chat_template(raw.prompt, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    end_of_turn = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert pair.chosen_ids[-len(end_of_turn) :] == end_of_turn
    assert tok.decode(pair.chosen_ids) == "bright<|im_end|>\n"  # no EOS appended for chat
    full = tok.apply_chat_template(CONVERSATIONAL[1]["rejected"], tokenize=False)
    assert tok.decode(pair.prompt_ids + pair.rejected_ids) == full


def test_chat_template_problems(fresh_tok: Any) -> None:
    raw = normalize_row(CONVERSATIONAL[0], "chat.jsonl", 7)
    # a generation prompt the rendered conversation does not contain -> not prefix-consistent
    fresh_tok.chat_template = fresh_tok.chat_template.replace("assistant\\n'", "assistant\\n<think>\\n'")
    with pytest.raises(
        DataError, match=r"chat\.jsonl, line 7, field 'chosen': the chat template is not prefix-consistent"
    ):
        tokenize_pair(raw, fresh_tok, None, None)
    fresh_tok.chat_template = None
    with pytest.raises(ModelError, match="no chat_template"):
        tokenize_pair(raw, fresh_tok, None, None)


def test_shipped_toy_files_load_cleanly(tok: Any) -> None:
    sizes = {}
    for name in ("train", "eval", "chat", "hh_style"):
        pairs, summary = load_pairs([TOY_DIR / f"{name}.jsonl"], tok, cfg())
        assert summary.n_dropped == 0 and summary.n_read == len(pairs)
        sizes[name] = len(pairs)
    assert sizes["train"] >= 300 and sizes["eval"] >= 80 and sizes["chat"] >= 15 and sizes["hh_style"] >= 15
    _, summary = load_pairs([TOY_DIR], tok, cfg())  # the whole folder, mixed formats
    assert summary.kinds == {
        "standard": sizes["train"] + sizes["eval"],
        "conversational": sizes["chat"],
        "implicit": sizes["hh_style"],
    }


def test_tiny_tokenizer_assets(tok: Any) -> None:
    text = "Zürich 東京 🤖 \t\r\n ÿ <b>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert tok.pad_token_id != tok.eos_token_id
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    assert 900 <= len(tok) <= 1100


def test_eos_is_not_doubled_when_the_text_already_ends_with_it(tmp_path) -> None:
    """A plain response that already ends in the EOS text gets exactly one EOS token."""
    import json

    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data.pairs import load_pairs
    from dpokit.models.tiny import ASSET_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER))
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hi.", "chosen": " good day.<|endoftext|>", "rejected": " bad day."}) + "\n")
    (pair,), _ = load_pairs([str(f)], tok, DataConfig())
    eos = tok.eos_token_id
    assert pair.chosen_ids[-1] == eos and pair.chosen_ids[-2] != eos
    assert pair.rejected_ids[-1] == eos and pair.rejected_ids[-2] != eos
