"""AI-feedback preference pairs: sample responses, let a judge rank them, keep best vs worst.

For every prompt the model samples ``n_samples`` responses; the judge scores them; the highest and
lowest scored become ``chosen`` / ``rejected`` -- but only when the judge actually separates them
(score gap >= ``min_gap``). A pair the judge cannot tell apart would teach DPO noise.

Rows use the conversational format for chat models (the format `dpokit.data` reads)::

    {"prompt": [{"role": "user", "content": p}],
     "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}],
     "chosen_score": 0.81, "rejected_score": -0.34}

and plain strings for ``prompt`` / ``chosen`` / ``rejected`` for models without a chat template.

CLI: ``dpokit pairs --model M --prompts P --judge J --out FILE`` (wired through
`add_pairs_arguments` + `pairs_command`; its settings and their defaults: `PairsSettings`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dpokit.data.files import read_prompts
from dpokit.errors import DpokitError
from dpokit.eval.judges import JUDGES, get_judge
from dpokit.models import sources

Judge = Callable[[Sequence[str]], list[float]]


@dataclass
class PairsSettings:
    """What `dpokit pairs` reads and how it samples. The field defaults are the command's defaults,
    written only here: `add_pairs_arguments` and `build_pairs` take theirs from these fields."""

    model: str  # a model folder, .gguf file or alias (any `dpokit.models.sources` source)
    prompts: str  # .jsonl with {"prompt": ...} lines, or .txt
    out: str  # the JSONL file of preference pairs to write
    judge: str = "vader"
    n_samples: int = 4  # responses sampled per prompt
    min_gap: float = 0.1  # minimum judge score gap to keep a pair
    seed: int = 0
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # sequences generated together
    limit: int | None = None  # use only the first N prompts
    dtype: str = "auto"
    device: str | None = None  # default: cuda if available
    chunk_prompts: int = 64  # prompts per chunk; rows are written after each chunk
    allow_pickle: bool = False
    trust_remote_code: bool = False
    progress: bool = True


_LIBRARY_ONLY = {"chunk_prompts"}  # settings `dpokit pairs` has no option for


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
            "prompt": [{"role": "user", "content": prompt}],
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
        conversational = bool(getattr(tokenizer, "chat_template", None))

    from dpokit.eval.sampling import generate_samples  # torch: loaded when pairs are built, not for `--help`

    start = time.perf_counter()
    samples = generate_samples(
        model, tokenizer, list(prompts), n=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    responses = [[s.text for s in group] for group in samples]
    flat = [text for group in responses for text in group]
    flat_scores = [float(s) for s in judge_fn(flat)] if flat else []
    if len(flat_scores) != len(flat):
        raise DpokitError(f"judge {judge_name} returned {len(flat_scores)} scores for {len(flat)} texts")

    stats = PairStats(judge=judge_name, min_gap=min_gap, n_samples=n_samples, prompts=len(prompts))
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        group = responses[i]
        scores = flat_scores[i * n_samples : (i + 1) * n_samples]
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

    Prompts are processed ``chunk_prompts`` at a time and rows are flushed after each chunk, so a long
    run that is interrupted keeps what it made. Chunk k samples with seed ``seed + k``. Prints a
    summary and returns the stats.
    """
    import torch

    from dpokit.models.loading import resolve_dtype

    st = settings
    judge_fn = get_judge(st.judge)  # fail on a bad judge name before the slow model load
    prompts = read_prompts(st.prompts)
    if st.limit is not None:
        if st.limit < 1:
            raise DpokitError(f"--limit must be >= 1, got {st.limit}")
        prompts = prompts[: st.limit]
    device = st.device or ("cuda" if torch.cuda.is_available() else "cpu")

    load_start = time.perf_counter()
    # a GGUF file is dequantized once into a cached folder (what training and evaluation load too)
    source = sources.materialize_gguf(sources.resolve_source(st.model), log=lambda m: print(m, file=sys.stderr))
    lm = sources.load_model(
        source, dtype=resolve_dtype(st.dtype, device), allow_pickle=st.allow_pickle,
        trust_remote_code=st.trust_remote_code,
    ).to(device)  # fmt: skip
    tokenizer = sources.load_tokenizer(source, trust_remote_code=st.trust_remote_code)
    print(f"loaded {source} in {time.perf_counter() - load_start:.1f}s", file=sys.stderr)

    out_path = Path(st.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total = PairStats(judge=st.judge, min_gap=st.min_gap, n_samples=st.n_samples)
    bar = None
    if st.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="pairs", unit="prompt")
    try:
        with out_path.open("w", encoding="utf-8") as f:
            for k, begin in enumerate(range(0, len(prompts), st.chunk_prompts)):
                chunk = prompts[begin : begin + st.chunk_prompts]
                rows, stats = build_pairs(
                    lm, tokenizer, chunk, judge_fn, n_samples=st.n_samples, min_gap=st.min_gap,
                    max_new_tokens=st.max_new_tokens, temperature=st.temperature, top_p=st.top_p, seed=st.seed + k,
                    batch_size=st.batch_size,
                )  # fmt: skip
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                total.merge(stats)
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(kept=total.kept, gap=f"{total.mean_gap:.2f}")
    finally:
        if bar is not None:
            bar.close()
    print(total.summary())
    print(f"wrote {total.kept} pairs to {out_path} in {total.seconds:.0f}s")
    if total.kept == 0:
        print("warning: no pairs kept; try more --n-samples, a lower --min-gap or longer responses", file=sys.stderr)
    return total


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit pairs` options to ``parser``; each ``dest`` is the `PairsSettings` field it sets."""
    d = PairsSettings  # the class: its attributes are the field defaults
    add = parser.add_argument
    add("--model", required=True, help="model folder, .gguf file or alias (smollm2-135m-instruct)")
    add("--prompts", required=True, help='prompts: .jsonl with {"prompt": ...} lines, or .txt')
    add("--judge", default=d.judge, choices=sorted(JUDGES), help=f"sentiment judge (default: {d.judge})")
    add("--out", required=True, help="output JSONL file of preference pairs")
    add("--n-samples", type=int, default=d.n_samples, help=f"responses sampled per prompt (default: {d.n_samples})")
    add("--min-gap", type=float, default=d.min_gap, help=f"minimum judge score gap for a pair (default: {d.min_gap})")
    add("--seed", type=int, default=d.seed)
    add("--max-new-tokens", type=int, default=d.max_new_tokens)
    add("--temperature", type=float, default=d.temperature)
    add("--top-p", type=float, default=d.top_p)
    add("--batch-size", type=int, default=d.batch_size, help=f"sequences generated together (default: {d.batch_size})")
    add("--limit", type=int, default=d.limit, help="use only the first N prompts")
    add("--dtype", default=d.dtype, help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16")
    add("--device", default=d.device, help="cpu or cuda (default: cuda if available)")
    add("--allow-pickle", action="store_true", default=d.allow_pickle, help="allow loading pytorch_model.bin weights")
    add("--trust-remote-code", action="store_true", default=d.trust_remote_code)
    add("--no-progress", dest="progress", action="store_false", default=d.progress, help="no progress bar")


def pairs_command(args: argparse.Namespace) -> int:
    """Run `dpokit pairs` from parsed arguments; returns the exit status."""
    # every settings field but the library-only ones has an option of the same dest
    given = {f.name: getattr(args, f.name) for f in fields(PairsSettings) if f.name not in _LIBRARY_ONLY}
    run_pairs_command(PairsSettings(**given))
    return 0
