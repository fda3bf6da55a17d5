"""Judges: the lexicon judges land obvious sentences on the right side, offline; `load_judge` specs
(rm:PATH, module:function, file.py:function) and per-row errors of user callables."""

from __future__ import annotations

import ast
import builtins
import re
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


# ---- load_judge: specs, callables and their per-row errors ------------------------------------
# module-level callables for `tests.unit.test_judges:NAME` specs
def text_length(texts):
    return [len(t) for t in texts]


def prompt_overlap(prompts, responses):
    return [float(len(set(p.split()) & set(r.split()))) for p, r in zip(prompts, responses)]


def picky(texts):
    """Raises on any batch holding 'boom'; returns a non-number for 'text' and NaN for 'nan'."""
    if any("boom" in t for t in texts):
        raise ValueError("cannot judge boom")
    return [{"text": "high", "nan": float("nan")}.get(t, len(t)) for t in texts]


def wrong_count(texts):
    return [1.0]


def a_number(texts):
    return 3.0


def test_load_judge_builtin_and_callables() -> None:
    from dpokit.eval.judges import load_judge

    vader = load_judge("VADER")
    out = vader(["p", "p"], POSITIVE[:1] + NEGATIVE[:1])
    assert out.judge == "vader" and out.errors == {} and out.scores[0] > 0.3 > -0.3 > out.scores[1]
    by_text = load_judge("tests.unit.test_judges:text_length")
    assert by_text(["ignored", "ignored"], ["ab", "abcd"]).scores == [2.0, 4.0]
    by_pair = load_judge("tests.unit.test_judges:prompt_overlap")  # two parameters: gets (prompts, responses)
    assert by_pair(["a good film", "x"], ["a good one", "y"]).scores == [2.0, 0.0]


def test_callable_errors_are_per_row_and_the_rest_is_kept() -> None:
    from dpokit.eval.judges import load_judge

    judge = load_judge("tests.unit.test_judges:picky")
    got = judge(["p"] * 5, ["fine", "boom", "text", "nan", "ok!"])
    assert got.scores == [4.0, None, None, None, 3.0]
    assert sorted(got.errors) == [1, 2, 3]
    assert "raised ValueError: cannot judge boom" in got.errors[1]
    assert "str" in got.errors[2] and "not a number" in got.errors[2]
    assert "not a finite number" in got.errors[3]
    assert got.valid() == [4.0, 3.0]
    summary = got.error_summary()
    assert "3 of 5 rows failed" in summary and "row 1: raised ValueError" in summary
    # a whole batch answered with the wrong count: each row is asked alone, one value is not a list
    assert load_judge("tests.unit.test_judges:wrong_count")(["p"] * 3, ["a", "b", "c"]).scores == [1.0, 1.0, 1.0]
    bare = load_judge("tests.unit.test_judges:a_number")(["p", "p"], ["a", "b"])
    assert bare.scores == [None, None] and "not a list of one number" in bare.errors[0]


def test_callable_from_a_file(tmp_path: Path) -> None:
    from dpokit.eval.judges import load_judge

    path = tmp_path / "my_judge.py"
    path.write_text("import numpy as np\ndef score(texts):\n    return np.array([t.count('!') for t in texts])\n")
    assert load_judge(f"{path}:score")(["p", "p"], ["wow!!", "meh"]).scores == [2.0, 0.0]  # numpy scalars are numbers


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("gpt4", "choose one of: textblob, vader, or rm:PATH"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("tests.unit.test_judges:missing", "has no callable 'missing'"),
        ("/no/such/file.py:f", "does not exist"),
        ("rm:", "give the reward model's folder"),
    ],
)
def test_bad_judge_specs_say_what_is_wrong(spec: str, says: str) -> None:
    from dpokit.eval.judges import load_judge

    with pytest.raises(DpokitError, match=re.escape(says)):
        load_judge(spec)


def test_reward_model_judge(tmp_path: Path) -> None:
    """rm:PATH scores (prompt, response) rows with dpokit.models.reward.reward_scores."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from dpokit.config import Config
    from dpokit.dist import Dist
    from dpokit.eval.judges import load_judge
    from dpokit.models import reward
    from dpokit.models.tiny import ASSET_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER))
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(conf).save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    cfg = Config().override(["model.dtype=float32"])
    judge = load_judge(f"rm:{tmp_path / 'rm'}", cfg, batch_size=2, dist=Dist.local("cpu"))
    prompts, responses = ["Review the film.", "Review the film.", "Say hi."], ["Great!", "Awful.", "hi"]
    got = judge(prompts, responses)
    model, tokenizer = reward.load_reward_model(str(tmp_path / "rm"), cfg, torch.float32)
    want = reward.reward_scores(model, tokenizer, prompts, responses, 3, Dist.local("cpu"))
    assert got.errors == {} and got.scores == pytest.approx(want, abs=1e-5)
    assert len(set(got.scores)) == 3  # the rows were scored apart
