"""Sentiment judges: score texts in [-1, 1] (negative .. positive).

A judge labels sampled responses when building preference pairs (`dpokit pairs`) and measures the
policy's sentiment in the movie-review demo. It is never part of the training loss: DPO only sees
the chosen/rejected labels the judge produced.

Both judges are lexicon-based and run offline: VADER's lexicon ships inside ``vaderSentiment``, and
TextBlob's default ``PatternAnalyzer`` reads ``en-sentiment.xml`` from inside the ``textblob``
package (it needs no NLTK corpora; only TextBlob's tokenizers/taggers would, and we do not use them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dpokit.errors import DpokitError

Judge = Callable[[Sequence[str]], list[float]]


@dataclass(frozen=True)
class JudgeSpec:
    """How to build a judge, and what it needs installed."""

    factory: Callable[[], Judge]
    package: str  # pip name of the optional dependency
    description: str


def _missing(package: str, judge: str, exc: ImportError) -> DpokitError:
    return DpokitError(
        f"judge '{judge}' needs the optional package '{package}' ({exc}); "
        f"install the demo extras: pip install 'dpokit[demo]'"
    )


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):  # a bare string would be scored character by character
        raise DpokitError("a judge scores a list of texts, not a single string")


def _vader() -> Judge:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise _missing("vaderSentiment", "vader", exc) from exc
    analyzer = SentimentIntensityAnalyzer()

    def judge(texts: Sequence[str]) -> list[float]:
        _check_texts(texts)
        # "compound" is VADER's normalised overall score, already in [-1, 1]
        return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

    return judge


def _textblob() -> Judge:
    try:
        from textblob.en.sentiments import PatternAnalyzer
    except ImportError as exc:
        raise _missing("textblob", "textblob", exc) from exc
    analyzer = PatternAnalyzer()  # lexicon only; no NLTK data is read

    def judge(texts: Sequence[str]) -> list[float]:
        _check_texts(texts)
        return [float(analyzer.analyze(t).polarity) for t in texts]

    return judge


JUDGES: dict[str, JudgeSpec] = {
    "vader": JudgeSpec(_vader, "vaderSentiment", "VADER compound sentiment score in [-1, 1]"),
    "textblob": JudgeSpec(_textblob, "textblob", "TextBlob (pattern lexicon) polarity in [-1, 1]"),
}


@functools.cache
def _build(name: str) -> Judge:
    return JUDGES[name].factory()


def get_judge(name: str) -> Judge:
    """The judge called ``name`` (built once and cached): ``judge(texts) -> scores`` in [-1, 1]."""
    key = name.strip().lower()
    if key not in JUDGES:
        raise DpokitError(f"unknown judge '{name}'; choose one of: {', '.join(sorted(JUDGES))}")
    return _build(key)
