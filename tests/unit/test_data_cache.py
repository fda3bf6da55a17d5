"""Data at scale: the tokenized-pairs cache (data.cache_tokenized) and tokenizing in data.num_proc
processes give exactly the pairs and summary of one fresh tokenization."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dpokit
from dpokit.data import cache as data_cache
from dpokit.data.pairs import load_pairs
from dpokit.errors import DataError
from dpokit.models import refcache

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "dpokit"))
    return tmp_path / "dpokit" / "tokenized"


def cfg(**overrides: Any) -> SimpleNamespace:
    base = {"format": "auto", "max_length": 24, "max_prompt_length": 12, "truncation_mode": "keep_end",
            "on_bad_row": "skip", "cache_tokenized": True, "num_proc": 1}  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


def mixed_rows(n: int) -> list[dict[str, Any]]:
    """Plain, chat, long (truncated), dropped and malformed rows: every field the cache stores."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append({"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"})
        elif kind == 1:
            out.append({"chosen": CHAT + [{"role": "assistant", "content": f"fine {i}"}],
                        "rejected": CHAT + [{"role": "assistant", "content": f"bad {i}"}]})  # fmt: skip
        elif kind == 2:
            out.append({"prompt": "long " * 40 + str(i), "chosen": "word " * 300, "rejected": "other " * 30})
        elif kind == 3:
            out.append({"prompt": "x " * 30, "chosen": "same " * 20 + "a", "rejected": "same " * 20 + "b"})  # dropped
        else:
            out.append({"prompt": f"Q{i}", "chosen": i, "rejected": "text"})  # malformed: skipped
    return out


def write(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def summary_fields(summary: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(summary).items() if k != "notes"}


def test_cache_hit_equals_miss_and_misses_on_changes(tmp_path: Path, tok: Any, cache_dir: Path) -> None:
    data = write(tmp_path / "pairs.jsonl", mixed_rows(40))
    fresh, fresh_summary = load_pairs([data], tok, cfg(cache_tokenized=False))
    miss, miss_summary = load_pairs([data], tok, cfg())
    assert len(list(cache_dir.glob("*.safetensors"))) == 1 and "cached in" in miss_summary.render()
    hit, hit_summary = load_pairs([data], tok, cfg(), skipped_path=tmp_path / "skipped.jsonl")
    assert "tokenized pairs cache hit: 32 rows" in hit_summary.render()
    assert miss_summary.dropped == {"chosen and rejected identical after truncation": 8} and miss_summary.n_precut == 8
    assert fresh == miss == hit  # ids, split into parts and indices: dataclass equality
    assert summary_fields(fresh_summary) == summary_fields(miss_summary) | {"skipped_path": None}
    assert summary_fields(hit_summary) == summary_fields(miss_summary) | {"skipped_path": str(tmp_path / "skipped.jsonl")}
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 8  # skipped rows are still reported

    assert "cache hit" not in load_pairs([data], tok, cfg(max_length=25))[1].render()  # a setting changed
    write(data, mixed_rows(39) + [{"prompt": "new", "chosen": "a", "rejected": "b"}])  # a row changed
    assert "cache hit" not in load_pairs([data], tok, cfg())[1].render()
    assert len(list(cache_dir.glob("*.safetensors"))) == 3


def test_corrupt_or_foreign_cache_files_are_ignored_with_a_warning(tmp_path: Path, tok: Any, cache_dir: Path) -> None:
    data = write(tmp_path / "pairs.jsonl", mixed_rows(10))
    expected, _ = load_pairs([data], tok, cfg())
    (entry,) = cache_dir.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with pytest.warns(data_cache.TokenCacheWarning, match="ignoring tokenized-pairs cache .*unreadable"):
        pairs, summary = load_pairs([data], tok, cfg())
    assert pairs == expected and "cache hit" not in summary.render()
    good = entry.read_bytes()  # rewritten by the run above
    other = cache_dir / ("0" * 40 + ".safetensors")
    other.write_bytes(good)  # a valid file under another key's name
    with pytest.warns(data_cache.TokenCacheWarning, match="its key does not match its name"):
        assert data_cache.load_entry(other, "0" * 40) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact entry loads silently
        assert load_pairs([data], tok, cfg())[0] == expected


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DPOKIT_CACHE", str(blocker))
    data = write(tmp_path / "pairs.jsonl", mixed_rows(5))
    with pytest.warns(data_cache.TokenCacheWarning, match="could not write"):
        pairs, _ = load_pairs([data], tok, cfg())
    assert len(pairs) == 3  # 5 rows: one malformed, one dropped


def test_num_proc_gives_the_same_pairs(tmp_path: Path, tok: Any, cache_dir: Path) -> None:
    data = write(tmp_path / "pairs.jsonl", mixed_rows(45))
    one, one_summary = load_pairs([data], tok, cfg(cache_tokenized=False))
    two, two_summary = load_pairs([data], tok, cfg(cache_tokenized=False, num_proc=2))
    assert one == two and summary_fields(one_summary) == summary_fields(two_summary)
    # under on_bad_row=error the first bad row raises, from whichever process met it
    bad = mixed_rows(20)
    bad[13] = {"chosen": CHAT + [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    write(data, [r for i, r in enumerate(bad) if i % 5 != 4])
    with pytest.raises(DataError) as single:
        load_pairs([data], tok, cfg(cache_tokenized=False, on_bad_row="error"))
    with pytest.raises(DataError) as multi:
        load_pairs([data], tok, cfg(cache_tokenized=False, on_bad_row="error", num_proc=2))
    assert str(single.value) == str(multi.value)


def test_cache_locations_and_fingerprint_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    assert data_cache.entry_path("k").parent == tmp_path / "tokenized"
    assert refcache.resolve_cache_dir(None) == tmp_path / "ref_logps"
    assert refcache.tokenizer_fingerprint is data_cache.tokenizer_fingerprint  # one definition, in the data layer
