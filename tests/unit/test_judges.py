"""Sentiment judges: obvious sentences land on the right side, offline, with clear errors."""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.errors import DpokitError
from dpokit.eval import judges
from dpokit.eval.judges import JUDGES, get_judge

POSITIVE = [
    "This movie was wonderful, the acting was superb and I loved every minute.",
    "A brilliant, heartwarming film with a great soundtrack.",
]
NEGATIVE = [
    "A terrible, boring mess. The acting was awful and I hated it.",
    "The worst film of the year: dull, ugly and painfully stupid.",
]
NEUTRAL = ["The film is ninety minutes long and was released in March.", ""]


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_obvious_sentences(name):
    judge = get_judge(name)
    pos, neg, neu = judge(POSITIVE), judge(NEGATIVE), judge(NEUTRAL)
    assert all(s > 0.3 for s in pos), pos
    assert all(s < -0.3 for s in neg), neg
    assert all(abs(s) < 0.2 for s in neu), neu
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in pos + neg + neu)
    assert min(pos) > max(neu) and min(neu) > max(neg)
    assert judge([]) == []


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_deterministic_and_cached(name):
    assert get_judge(name) is get_judge(name.upper())
    assert get_judge(name)(POSITIVE) == get_judge(name)(POSITIVE)


def test_rejects_bare_string():
    with pytest.raises(DpokitError, match="list of texts"):
        get_judge("vader")("great movie")


def test_unknown_judge_lists_choices():
    with pytest.raises(DpokitError, match="textblob, vader"):
        get_judge("gpt4")


def test_missing_package_message(monkeypatch):
    judges._build.cache_clear()
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(("vaderSentiment", "textblob")):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        for name in JUDGES:
            with pytest.raises(DpokitError, match=r"pip install 'dpokit\[demo\]'"):
                get_judge(name)
    finally:
        monkeypatch.undo()
        judges._build.cache_clear()


def test_textblob_needs_no_nltk_corpora(tmp_path):
    """Polarity must work with no NLTK data anywhere (a fresh process, NLTK_DATA pointing at nothing)."""
    code = (
        "import nltk; nltk.data.path[:] = [];"
        "from dpokit.eval.judges import get_judge;"
        "print(get_judge('textblob')(['A great film.', 'An awful film.']))"
    )
    env = {"NLTK_DATA": str(tmp_path / "none"), "PATH": "", "HOME": str(tmp_path)}
    repo = Path(__file__).resolve().parents[2]  # cwd, so `dpokit` imports even when not installed
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=repo
    )
    assert result.returncode == 0, result.stderr
    good, bad = ast.literal_eval(result.stdout.strip())
    assert good > 0 > bad
