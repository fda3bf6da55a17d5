"""Property-based tests of the data path with the shipped byte-level tiny tokenizer.

For arbitrary (unicode) text: files round-trip to the same strings; prompt and response tokens decode
back to the original text; the collated completion_mask covers exactly the response tokens; and
truncation (both modes, random max_length / max_prompt_length) keeps the prompt's kept end, the
responses' start, never leaves an empty response and never exceeds max_length. Long texts also go
through the pre-tokenization cut, which must not change a single kept token.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dpokit
from dpokit.data.collate import PreferenceCollator, TokenizedPair
from dpokit.data.files import read_rows
from dpokit.data.pairs import RawPair, load_pairs, normalize_row, tokenize_pair, tokenize_pairs

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any unicode text a row may hold: not empty or whitespace-only (rows like that are refused).
text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
# Long texts too, so truncation and the pre-tokenization cut are exercised: a text repeated.
long_text = st.builds(lambda s, n: s * n, text, st.integers(min_value=1, max_value=80))
any_text = st.one_of(text, text, long_text)


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _pair(prompt: str, chosen: str, rejected: str) -> RawPair:
    return RawPair(prompt, chosen, rejected, "standard", "f.jsonl", 1)


# ---------------------------------------------------------------------------------------------
# Files round-trip


@PROPERTY
@given(prompt=text, chosen=text, rejected=text, crlf=st.booleans(), bom=st.booleans())
def test_jsonl_and_csv_round_trip_any_text(
    tmp_path: Path, prompt: str, chosen: str, rejected: str, crlf: bool, bom: bool
) -> None:
    assume(chosen != rejected)
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    newline = "\r\n" if crlf else "\n"
    prefix = b"\xef\xbb\xbf" if bom else b""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(prefix + (json.dumps(row, ensure_ascii=False) + newline).encode("utf-8"))
    files = [jsonl]
    if "\x00" not in prompt + chosen + rejected:  # a NUL byte marks a file as binary: refused by design
        buffer = io.StringIO(newline="")
        # Python's writer leaves a lone CR unquoted when the line end is LF (ambiguous CSV no reader can
        # undo), so LF files quote every field; CRLF files use the default minimal quoting.
        quoting = csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL
        writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator=newline, quoting=quoting)
        writer.writeheader()
        writer.writerow(row)
        (tmp_path / "p.csv").write_bytes(prefix + buffer.getvalue().encode("utf-8"))
        files.append(tmp_path / "p.csv")
    for path in files:
        [(rownum, read)] = list(read_rows(path))
        pair = normalize_row(read, path, rownum)
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected), path


# ---------------------------------------------------------------------------------------------
# Tokenization decodes back to the text


@PROPERTY
@given(prompt=text, chosen=text, rejected=text)
def test_plain_tokens_decode_back_to_the_text(
    tok: Any, tmp_path: Path, prompt: str, chosen: str, rejected: str
) -> None:
    assume(chosen != rejected)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n", encoding="utf-8")
    cfg = type("Cfg", (), {"format": "standard", "max_length": None, "max_prompt_length": None})()
    [pair], _ = load_pairs([path], tok, cfg)
    eos = tok.eos_token_id
    assert pair.chosen_ids[-1] == eos and pair.rejected_ids[-1] == eos  # plain responses end with EOS
    assert tok.decode(pair.prompt_ids) == prompt
    assert tok.decode(pair.prompt_ids + pair.chosen_ids[:-1]) == prompt + chosen
    assert tok.decode(pair.prompt_ids + pair.rejected_ids[:-1]) == prompt + rejected


@PROPERTY
@given(system=st.none() | text, user=text, chosen=text, rejected=text)
def test_chat_tokens_decode_back_to_the_rendered_conversation(
    tok: Any, system: str | None, user: str, chosen: str, rejected: str
) -> None:
    assume(chosen != rejected)
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    row = {
        "chosen": turns + [{"role": "assistant", "content": chosen}],
        "rejected": turns + [{"role": "assistant", "content": rejected}],
    }
    pair = tokenize_pair(normalize_row(row, "c.jsonl", 1), tok, None, None)
    assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    for part, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        assert tok.decode(pair.prompt_ids + ids) == tok.apply_chat_template(row[part], tokenize=False)


# ---------------------------------------------------------------------------------------------
# Truncation and the collated completion mask


@st.composite
def limits(draw: st.DrawFn) -> tuple[int, int, str]:
    max_length = draw(st.integers(min_value=2, max_value=48))
    max_prompt_length = draw(st.integers(min_value=1, max_value=max_length - 1))  # validate() enforces <
    return max_length, max_prompt_length, draw(st.sampled_from(["keep_end", "keep_start"]))


@PROPERTY
@given(
    rows=st.lists(st.tuples(any_text, any_text, any_text), min_size=1, max_size=4),
    limit=limits(),
    multiple=st.sampled_from([None, 1, 8]),
)
def test_truncation_and_completion_mask(
    tok: Any, rows: list[tuple[str, str, str]], limit: tuple[int, int, str], multiple: int | None
) -> None:
    max_length, max_prompt_length, mode = limit
    rows = [r for r in rows if r[1] != r[2]]
    assume(rows)
    raws = [_pair(*r) for r in rows]
    cut = tokenize_pairs(raws, tok, max_length, max_prompt_length, mode)
    whole = tokenize_pairs(raws, tok, None, None, mode)  # no truncation, no pre-tokenization cut
    kept: list[TokenizedPair] = []
    for result, full in zip(cut, whole):
        assert isinstance(full, TokenizedPair)
        prompt = (
            full.prompt_ids
            if len(full.prompt_ids) <= max_prompt_length
            else (full.prompt_ids[-max_prompt_length:] if mode == "keep_end" else full.prompt_ids[:max_prompt_length])
        )
        budget = max_length - len(prompt)
        if isinstance(result, str):  # the only way to lose a pair here: equal once cut to the budget
            assert result == "chosen and rejected identical after truncation"
            assert full.chosen_ids[:budget] == full.rejected_ids[:budget]
            continue
        # exactly what truncating the full tokenization gives (so the pre-cut changed nothing)
        assert result.prompt_ids == prompt
        assert result.chosen_ids == full.chosen_ids[:budget] and result.rejected_ids == full.rejected_ids[:budget]
        assert 1 <= len(result.prompt_ids) <= max_prompt_length
        for response in (result.chosen_ids, result.rejected_ids):
            assert response and len(result.prompt_ids) + len(response) <= max_length
        kept.append(result)
    assume(kept)

    batch = PreferenceCollator(tok.pad_token_id, multiple)(kept)
    n = len(kept)
    assert batch["input_ids"].shape[0] == 2 * n
    for row, (pair, response) in enumerate([(p, p.chosen_ids) for p in kept] + [(p, p.rejected_ids) for p in kept]):
        start, end = len(pair.prompt_ids), len(pair.prompt_ids) + len(response)
        mask = batch["completion_mask"][row]
        assert mask.nonzero().flatten().tolist() == list(range(start, end))  # exactly the response tokens
        assert batch["input_ids"][row, start:end].tolist() == response
        assert batch["input_ids"][row, :start].tolist() == pair.prompt_ids
        assert batch["attention_mask"][row].sum().item() == end


# Texts several windows long: the pre-tokenization cut (32 characters per kept token + a margin)
# applies to nearly every part, with and without whitespace to place the cut at.
huge_text = st.builds(
    lambda parts, n: "".join(parts) * n,
    st.lists(text, min_size=1, max_size=5),
    st.integers(min_value=30, max_value=150),
)


@PROPERTY
@given(prompt=huge_text, chosen=huge_text, rejected=huge_text, limit=limits())
def test_cutting_long_texts_before_tokenizing_changes_no_kept_token(
    tok: Any, prompt: str, chosen: str, rejected: str, limit: tuple[int, int, str]
) -> None:
    max_length, max_prompt_length, mode = limit
    assume(chosen != rejected)
    raw = _pair(prompt, chosen, rejected)
    result = tokenize_pair(raw, tok, max_length, max_prompt_length, mode)
    full = tokenize_pair(raw, tok, None, None, mode)
    assert isinstance(full, TokenizedPair)
    prompt_ids = full.prompt_ids[-max_prompt_length:] if mode == "keep_end" else full.prompt_ids[:max_prompt_length]
    budget = max_length - len(prompt_ids)
    if isinstance(result, str):
        assert result == "chosen and rejected identical after truncation"
        assert full.chosen_ids[:budget] == full.rejected_ids[:budget]
    else:
        assert result == TokenizedPair(prompt_ids, full.chosen_ids[:budget], full.rejected_ids[:budget])
