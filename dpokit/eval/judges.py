"""Judges: score responses, offline. Never part of a training loss.

A judge labels sampled responses when building preference pairs (`dpokit pairs`), measures models
on prompts (`dpokit evaluate --prompts`, `dpokit demo`) and scores given rows (`dpokit score`).
DPO only sees the chosen/rejected labels a judge produced.

Three kinds, named by a spec string (`load_judge`):

* ``vader`` / ``textblob``: lexicon sentiment in [-1, 1]. VADER's lexicon ships inside
  ``vaderSentiment``, and TextBlob's default ``PatternAnalyzer`` reads ``en-sentiment.xml`` from inside
  the ``textblob`` package (it needs no NLTK corpora; only TextBlob's tokenizers/taggers would, and we
  do not use them);
* ``rm:PATH``: a reward model (`dpokit.models.reward`: a `dpokit reward` output, its merged folder,
  or any one-output sequence classifier), which scores prompt + response;
* ``module:function`` (or ``path/to/file.py:function``): a Python callable taking a list of texts,
  or (prompts, responses), and returning one number per row. A call that raises, or a value that is
  not a finite number, becomes that row's error (`JudgeScores.errors`, by row index); the other
  rows keep their scores.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError

Judge = Callable[[Sequence[str]], list[float]]  # texts -> scores: the lexicon judges, `get_judge`
Prompt = str | list[dict[str, Any]]  # text, or chat messages (conversational data)


@dataclass(frozen=True)
class JudgeSpec:
    """How to build a built-in judge, and what it needs installed."""

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
SPEC_FORMS = "rm:PATH (a reward model folder), module:function or file.py:function (a Python callable)"


@functools.cache
def _build(name: str) -> Judge:
    return JUDGES[name].factory()


def _unknown(name: str) -> DpokitError:
    return DpokitError(f"unknown judge '{name}'; choose one of: {', '.join(sorted(JUDGES))}, or {SPEC_FORMS}")


def get_judge(name: str) -> Judge:
    """The built-in judge called ``name`` (built once and cached): ``judge(texts) -> scores`` in [-1, 1]."""
    key = name.strip().lower()
    if key not in JUDGES:
        raise _unknown(name)
    return _build(key)


# ---- judges of (prompt, response) rows, with per-row errors -------------------------------------
@dataclass
class JudgeScores:
    """One judge's scores of N rows: ``scores[i]`` is None where row i failed (``errors[i]`` says why)."""

    judge: str
    scores: list[float | None]
    errors: dict[int, str] = field(default_factory=dict)

    def valid(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    def error_summary(self, shown: int = 3) -> str:
        """'2 rows failed: row 3: ValueError: ...; row 7: ...' (empty when none did)."""
        if not self.errors:
            return ""
        first = "; ".join(f"row {i}: {msg}" for i, msg in sorted(self.errors.items())[:shown])
        more = f"; {len(self.errors) - shown} more" if len(self.errors) > shown else ""
        return f"judge {self.judge}: {len(self.errors)} of {len(self.scores)} rows failed ({first}{more})"


@dataclass
class RowJudge:
    """A judge of (prompt, response) rows: ``judge(prompts, responses) -> JudgeScores``."""

    name: str
    score_rows: Callable[[Sequence[Prompt], Sequence[str]], JudgeScores]

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> JudgeScores:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_rows(prompts, responses)


def load_judge(spec: str, cfg: Any = None, batch_size: int = 16, dist: Any = None) -> RowJudge:
    """The judge a spec names: ``vader`` | ``textblob`` | ``rm:PATH`` | ``module:function`` |
    ``file.py:function``. A reward model loads here (so a bad path fails before any sampling), with
    ``cfg``'s model settings (dtype, allow_pickle, ...), and scores ``batch_size`` rows per forward on
    ``dist`` (default: this process, CUDA when available). Unknown names raise, listing the choices."""
    text = spec.strip()
    if text.lower().startswith("rm:"):
        return _reward_model_judge(text, text[3:], cfg, batch_size, dist)
    if ":" in text:
        return _callable_judge(text)
    lexicon = get_judge(text)  # raises for an unknown name, listing the choices
    return RowJudge(
        text.lower(), lambda _prompts, responses: _checked(text.lower(), lexicon(list(responses)), len(responses))
    )


def _checked(name: str, values: Any, n: int) -> JudgeScores:
    """Scores from a whole-batch call; a wrong count is the judge's bug, not a row's, so it raises."""
    values = list(values)
    if len(values) != n:
        raise DpokitError(f"judge {name} returned {len(values)} scores for {n} rows")
    scores: list[float | None] = []
    errors: dict[int, str] = {}
    for i, value in enumerate(values):
        number, problem = _as_number(value)
        scores.append(number)
        if problem:
            errors[i] = problem
    return JudgeScores(name, scores, errors)


def _as_number(value: Any) -> tuple[float | None, str | None]:
    """(float, None) for a finite real number (a numpy / torch scalar too), else (None, why not)."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        try:
            value = value.item()  # numpy / torch scalar; a multi-element array raises and is reported
        except (ValueError, RuntimeError) as exc:
            return None, f"returned {type(value).__name__} ({exc}), not a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"returned {type(value).__name__} {value!r:.60}, not a number"
    number = float(value)
    if not math.isfinite(number):
        return None, f"returned {number}, not a finite number"
    return number, None


def _reward_model_judge(spec: str, path: str, cfg: Any, batch_size: int, dist: Any) -> RowJudge:
    from dpokit.config import Config
    from dpokit.dist import Dist
    from dpokit.models.loading import resolve_dtype
    from dpokit.models.reward import load_reward_model, reward_scores

    if not path.strip():
        raise DpokitError(f"judge '{spec}': give the reward model's folder after rm:, e.g. rm:runs/rm")
    cfg = cfg or Config()
    dist = dist or Dist.local()
    model, tokenizer = load_reward_model(path.strip(), cfg, resolve_dtype(cfg.model.dtype, dist.device))
    model.to(dist.device)

    def score_rows(prompts: Sequence[Prompt], responses: Sequence[str]) -> JudgeScores:
        values = reward_scores(model, tokenizer, list(prompts), list(responses), batch_size, dist)
        return _checked(spec, values, len(responses))

    return RowJudge(spec, score_rows)


def _callable_judge(spec: str) -> RowJudge:
    """``module:function`` -> a guarded RowJudge; takes (prompts, responses) when the function has two
    required positional parameters, else the list of response texts."""
    fn = _import_callable(spec)
    takes_prompts = _required_positional(fn) >= 2

    def call(prompts: Sequence[Prompt], responses: Sequence[str]) -> Any:
        return fn(list(prompts), list(responses)) if takes_prompts else fn(list(responses))

    def score_rows(prompts: Sequence[Prompt], responses: Sequence[str]) -> JudgeScores:
        try:
            values = list(call(prompts, responses))
        except Exception:  # noqa: BLE001 - a user's judge may raise anything: find the rows that do
            values = None
        if values is not None and len(values) == len(responses):
            return _checked(spec, values, len(responses))
        return _row_by_row(spec, call, prompts, responses)

    return RowJudge(spec, score_rows)


def _row_by_row(
    spec: str, call: Callable[..., Any], prompts: Sequence[Prompt], responses: Sequence[str]
) -> JudgeScores:
    """After a whole-batch call failed: each row alone, so one bad row costs only its own score."""
    scores: list[float | None] = []
    errors: dict[int, str] = {}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            out = call([prompt], [response])
        except Exception as exc:  # noqa: BLE001 - reported with the row's index, the other rows go on
            scores.append(None)
            errors[i] = f"raised {type(exc).__name__}: {exc}"
            continue
        try:  # a list, tuple, numpy array, tensor...; a bare number or a string is not one value per row
            values = None if isinstance(out, (str, bytes)) else list(out)
        except TypeError:
            values = None
        if values is None or len(values) != 1:
            scores.append(None)
            errors[i] = f"returned {type(out).__name__} {out!r:.60} for one row, not a list of one number"
            continue
        number, problem = _as_number(values[0])
        scores.append(number)
        if problem:
            errors[i] = problem
    return JudgeScores(spec, scores, errors)


def _import_callable(spec: str) -> Callable[..., Any]:
    """``pkg.module:function`` (importable, the current folder included) or ``path/file.py:function``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise _unknown(spec)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise DpokitError(f"judge '{spec}': file '{path}' does not exist")
            loader = importlib.util.spec_from_file_location(f"dpokit_judge_{path.stem}", path)
            if loader is None or loader.loader is None:
                raise DpokitError(f"judge '{spec}': cannot import '{path}'")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # the `dpokit` script does not put the current folder on the path
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except DpokitError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is reported the same way
        raise DpokitError(f"judge '{spec}': cannot import '{module_name}' ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DpokitError(f"judge '{spec}': '{module_name}' has no callable '{attr}'")
    return fn


def _required_positional(fn: Callable[..., Any]) -> int:
    """Positional parameters without a default (1 when the signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)
