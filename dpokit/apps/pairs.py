"""AI-feedback preference pairs: sample responses, let a judge rank them, keep best vs worst.

For every prompt the model samples ``n_samples`` responses; the judge scores them; the highest and
lowest scored become ``chosen`` / ``rejected`` -- but only when the judge actually separates them
(score gap >= ``min_gap``). A pair the judge cannot tell apart would teach DPO noise.

Rows use the conversational format for chat models (the format `dpokit.data` reads)::

    {"prompt": [{"role": "user", "content": p}],
     "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}],
     "chosen_score": 0.81, "rejected_score": -0.34}

and plain strings for ``prompt`` / ``chosen`` / ``rejected`` for models without a chat template.

The sampling stage (`dpokit.apps.sample`) is `dpokit sample`'s, which writes the responses for people
to label instead (`dpokit agreement --merge` turns their labels into pairs); `judge_responses` is
the judging stage.

CLI: ``dpokit pairs --model M --prompts P --judge J --out FILE`` (wired through
`add_pairs_arguments` + `pairs_command`; its settings and their defaults: `PairsSettings`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpokit.apps.sample import (
    SampleSettings,
    add_sampling_arguments,
    chat_prompt,
    is_chat,
    load_prompts,
    load_sampler,
    sample_chunks,
    sample_responses,
    settings_from_args,
)
from dpokit.errors import DpokitError
from dpokit.eval.judges import JUDGES, get_judge

Judge = Callable[[Sequence[str]], list[float]]


@dataclass
class PairsSettings(SampleSettings):
    """What `dpokit pairs` reads, how it samples (the fields of `SampleSettings`, the sampling stage it
    shares with `dpokit sample`) and how it judges. The field defaults are the command's defaults,
    written only here and in `SampleSettings`: `add_pairs_arguments` and `build_pairs` take theirs
    from these fields."""

    n_samples: int = 4  # responses sampled per prompt (the judge keeps the best and the worst)
    judge: str = "vader"
    min_gap: float = 0.1  # minimum judge score gap to keep a pair


@dataclass
class PairStats:
    """Counts and score sums for a pair-building run; mergeable across chunks."""

    judge: str = ""
    min_gap: float = 0.0
    n_samples: int = 0
    prompts: int = 0
    kept: int = 0
    dropped_small_gap: int = 0
    dropped_empty: int = 0  # fewer than two non-empty responses
    empty_responses: int = 0
    samples_scored: int = 0
    score_sum: float = 0.0  # over every non-empty sample: the model's baseline sentiment
    gap_sum: float = 0.0  # over kept pairs
    chosen_sum: float = 0.0
    rejected_sum: float = 0.0
    seconds: float = field(default=0.0, compare=False)

    @property
    def dropped(self) -> int:
        return self.dropped_small_gap + self.dropped_empty

    @property
    def mean_gap(self) -> float:
        return self.gap_sum / self.kept if self.kept else 0.0

    @property
    def mean_chosen_score(self) -> float:
        return self.chosen_sum / self.kept if self.kept else 0.0

    @property
    def mean_rejected_score(self) -> float:
        return self.rejected_sum / self.kept if self.kept else 0.0

    @property
    def mean_sample_score(self) -> float:
        return self.score_sum / self.samples_scored if self.samples_scored else 0.0

    def merge(self, other: PairStats) -> None:
        """Add another chunk's counts into this one."""
        for name in (
            "prompts", "kept", "dropped_small_gap", "dropped_empty", "empty_responses", "samples_scored",
            "score_sum", "gap_sum", "chosen_sum", "rejected_sum", "seconds",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            dropped=self.dropped,
            mean_gap=self.mean_gap,
            mean_chosen_score=self.mean_chosen_score,
            mean_rejected_score=self.mean_rejected_score,
            mean_sample_score=self.mean_sample_score,
        )
        return d

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.prompts} prompts kept as pairs "
            f"(dropped: {self.dropped_small_gap} gap < {self.min_gap:g}, {self.dropped_empty} empty); "
            f"judge {self.judge}: mean gap {self.mean_gap:.3f}, chosen {self.mean_chosen_score:+.3f}, "
            f"rejected {self.mean_rejected_score:+.3f}, all samples {self.mean_sample_score:+.3f}"
        )


def _resolve_judge(judge: str | Judge) -> tuple[Judge, str]:
    if isinstance(judge, str):
        return get_judge(judge), judge
    return judge, getattr(judge, "__name__", type(judge).__name__)


def make_row(prompt: str, chosen: str, rejected: str, chosen_score: float, rejected_score: float,
             conversational: bool) -> dict[str, Any]:  # fmt: skip
    """One output row, in the conversational or the plain-text format."""
    if conversational:
        row: dict[str, Any] = {
            "prompt": chat_prompt(prompt, True),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    row.update(chosen_score=float(chosen_score), rejected_score=float(rejected_score))
    return row


def select_pair(responses: Sequence[str], scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices (best, worst) among the non-empty responses, or None if there are fewer than two.

    Ties go to the earliest sample, so the choice is deterministic.
    """
    usable = [k for k, text in enumerate(responses) if text.strip()]
    if len(usable) < 2:
        return None
    best = max(usable, key=lambda k: (scores[k], -k))
    worst = min(usable, key=lambda k: (scores[k], k))
    return best, worst


def build_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    judge: str | Judge,
    n_samples: int = PairsSettings.n_samples,
    min_gap: float = PairsSettings.min_gap,
    max_new_tokens: int = PairsSettings.max_new_tokens,
    temperature: float = PairsSettings.temperature,
    top_p: float = PairsSettings.top_p,
    seed: int = PairsSettings.seed,
    batch_size: int = PairsSettings.batch_size,
    conversational: bool | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], PairStats]:
    """Sample, judge and pair responses for ``prompts``; returns (rows, stats).

    ``judge`` is a registered judge name (``"vader"``, ``"textblob"``) or any callable mapping a
    list of texts to scores. ``conversational`` defaults to whether the tokenizer has a chat template.
    The sampling defaults are `PairsSettings`'s, those of `dpokit pairs`.
    """
    if n_samples < 2:
        raise DpokitError(f"building pairs needs n_samples >= 2, got {n_samples}")
    if min_gap < 0:
        raise DpokitError(f"min_gap must be >= 0, got {min_gap}")
    judge_fn, judge_name = _resolve_judge(judge)
    if conversational is None:
        conversational = is_chat(tokenizer)
    start = time.perf_counter()
    responses = sample_responses(
        model, tokenizer, prompts, n=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    rows, stats = judge_responses(prompts, responses, judge_fn, judge_name, min_gap, conversational)
    stats.seconds = time.perf_counter() - start
    return rows, stats


def judge_responses(
    prompts: Sequence[str], responses: Sequence[Sequence[str]], judge: str | Judge, judge_name: str | None = None,
    min_gap: float = PairsSettings.min_gap, conversational: bool = True,
) -> tuple[list[dict[str, Any]], PairStats]:  # fmt: skip
    """The judging stage: score every response (one judge call), then per prompt keep the best vs
    the worst non-empty response when their gap is >= ``min_gap``; returns (rows, stats)."""
    judge_fn, name = _resolve_judge(judge)
    judge_name = judge_name or name
    n_samples = len(responses[0]) if responses else 0
    start = time.perf_counter()
    flat = [text for group in responses for text in group]
    flat_scores = [float(s) for s in judge_fn(flat)] if flat else []
    if len(flat_scores) != len(flat):
        raise DpokitError(f"judge {judge_name} returned {len(flat_scores)} scores for {len(flat)} texts")

    stats = PairStats(judge=judge_name, min_gap=min_gap, n_samples=n_samples, prompts=len(prompts))
    rows: list[dict[str, Any]] = []
    offsets = [0]
    for group in responses:
        offsets.append(offsets[-1] + len(group))
    for i, prompt in enumerate(prompts):
        group = list(responses[i])
        scores = flat_scores[offsets[i] : offsets[i + 1]]
        for text, score in zip(group, scores):
            if text.strip():
                stats.samples_scored += 1
                stats.score_sum += score
            else:
                stats.empty_responses += 1
        picked = select_pair(group, scores)
        if picked is None:
            stats.dropped_empty += 1
            continue
        best, worst = picked
        gap = scores[best] - scores[worst]
        if gap < min_gap or group[best] == group[worst]:
            stats.dropped_small_gap += 1
            continue
        rows.append(make_row(prompt, group[best], group[worst], scores[best], scores[worst], conversational))
        stats.kept += 1
        stats.gap_sum += gap
        stats.chosen_sum += scores[best]
        stats.rejected_sum += scores[worst]
    stats.seconds = time.perf_counter() - start
    return rows, stats


# ---- the `dpokit pairs` command -------------------------------------------------------------


def run_pairs_command(settings: PairsSettings) -> PairStats:
    """Load the model, build pairs for the prompts and write JSONL to ``settings.out``.

    The sampling stage is `dpokit sample`'s (`dpokit.apps.sample.sample_chunks`): prompts are
    processed ``chunk_prompts`` at a time, chunk k sampled with seed ``seed + k``; each chunk is judged
    and its rows flushed before the next, so a long run that is interrupted keeps what it made.
    Prints a summary and returns the stats.
    """
    st = settings
    if st.n_samples < 2:
        raise DpokitError(f"building pairs needs n_samples >= 2, got {st.n_samples}")
    if st.min_gap < 0:
        raise DpokitError(f"min_gap must be >= 0, got {st.min_gap}")
    judge_fn = get_judge(st.judge)  # fail on a bad judge name before the slow model load
    prompts = load_prompts(st)
    lm, tokenizer = load_sampler(st)
    conversational = is_chat(tokenizer)

    out_path = Path(st.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total = PairStats(judge=st.judge, min_gap=st.min_gap, n_samples=st.n_samples)
    start = time.perf_counter()
    with out_path.open("w", encoding="utf-8") as f:
        postfix = lambda: {"kept": total.kept, "gap": f"{total.mean_gap:.2f}"}  # noqa: E731
        for chunk in sample_chunks(lm, tokenizer, prompts, st, "pairs", postfix):
            rows, stats = judge_responses(chunk.prompts, chunk.responses, judge_fn, st.judge, st.min_gap, conversational)
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            total.merge(stats)
    total.seconds = time.perf_counter() - start  # sampling included
    print(total.summary())
    print(f"wrote {total.kept} pairs to {out_path} in {total.seconds:.0f}s")
    if total.kept == 0:
        print("warning: no pairs kept; try more --n-samples, a lower --min-gap or longer responses", file=sys.stderr)
    return total


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit pairs` options to ``parser``; each ``dest`` is the `PairsSettings` field it sets."""
    d = PairsSettings  # the class: its attributes are the field defaults
    add_sampling_arguments(parser, d, "output JSONL file of preference pairs")
    add = parser.add_argument
    add("--judge", default=d.judge, choices=sorted(JUDGES), help=f"sentiment judge (default: {d.judge})")
    add("--n-samples", type=int, default=d.n_samples, help=f"responses sampled per prompt (default: {d.n_samples})")
    add("--min-gap", type=float, default=d.min_gap, help=f"minimum judge score gap for a pair (default: {d.min_gap})")


def pairs_command(args: argparse.Namespace) -> int:
    """Run `dpokit pairs` from parsed arguments; returns the exit status."""
    run_pairs_command(settings_from_args(PairsSettings, args))
    return 0
