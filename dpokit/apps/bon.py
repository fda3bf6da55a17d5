"""Best-of-N sampling: the no-training baseline of the RLHF-vs-DPO comparison.

For each prompt the policy samples N responses, a reward model (any judge spec) scores them and the
highest-scored one is kept. Best-of-N needs no training at all, so it answers "how much of what RL
or DPO buys could sampling and a reward model buy alone, and at what KL?". Its KL from the policy is
known in closed form (`bon_kl`), which puts each N on the same reward-vs-KL axes as the trained models.

How the levels are measured (`run_bon`): the sampler (`dpokit.eval.sampling.generate_samples`) draws
max(ns) responses per prompt ONCE and the reward judge scores each of them once; level n uses the
FIRST n samples of every prompt. The subsets are nested, so (per prompt) the kept reward can only
grow with n, the levels differ only in N and not in sampling luck, and no level samples again. The
kept responses are then scored by the evaluation judges, each distinct (prompt, sample) once, even
when several levels keep it.

CLI: ``dpokit bon --model M --reward SPEC --n 1,4,16 --prompts P --out DIR`` (`add_bon_arguments` +
`bon_command`) writes summary.json, summary.md and samples.jsonl (the kept response per prompt and n).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.data.files import read_prompts
from dpokit.errors import DpokitError
from dpokit.eval.judges import JudgeScores, RowJudge, load_judge

if TYPE_CHECKING:  # both import torch: loaded when the command runs, not for `dpokit --help`
    from dpokit.eval.generate_eval import SamplingSettings
    from dpokit.eval.sampling import Sample

DEFAULT_NS = "1,4,16"
DEFAULT_JUDGES = "vader,textblob"
Key = tuple[int, int]  # (prompt index i, sample index j): one drawn response


def bon_kl(n: int) -> float:
    """``log n - (n - 1) / n`` nats: the analytic KL(best-of-n || base policy).

    This is the formula the RLHF literature plots best-of-n against (Stiennon et al. 2020); Beirami
    et al. 2024 ("Theoretical guarantees on the best-of-n alignment policy") prove it is an UPPER
    BOUND on the actual KL, not its value: the actual KL is smaller, by a lot when the base policy
    puts much of its mass on a few responses (short answers, low temperature). So it is reported as
    "KL bound". The base policy is the sampling distribution (temperature / top-p included).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DpokitError(f"best-of-n needs a positive integer n, got {n!r}")
    return math.log(n) - (n - 1) / n


@dataclass
class BonPick:
    """The response a level kept for one prompt, with what it scored (one samples.jsonl row)."""

    prompt_index: int
    sample_index: int  # j < n: which of the prompt's first n samples won
    reward: float  # the reward judge's score (the maximum over the n; never a failed row)
    n_tokens: int  # response length in tokens, EOS not counted (`Sample.n_tokens`)
    scores: dict[str, float | None]  # evaluation judge -> score; None where the judge failed on it


@dataclass
class BonLevel:
    """One N: its analytic KL bound, the reward it reached (proxy) and what the judges think of it.

    Means are over the kept responses (one per prompt that had at least one scored sample among its
    first n); a prompt without one is left out and counted in ``skipped_prompts``.
    """

    n: int
    kl: float  # bon_kl(n), nats; an upper bound (see bon_kl)
    proxy: float | None  # mean reward-judge score of the kept responses (None: nothing kept)
    scores: dict[str, float | None]  # evaluation judge name -> mean score of the kept (None: all failed)
    mean_length: float | None  # tokens, mean over the kept responses
    responses: list[str]  # the kept responses, in prompt order (aligned with ``picks``)
    skipped_prompts: int  # prompts whose first n samples all failed the reward judge
    reward_errors: int  # failed reward rows among the n x prompts samples of this level
    picks: list[BonPick] = field(default_factory=list)
    judge_errors: dict[str, int] = field(default_factory=dict)  # judge -> kept responses it failed on

    def summary(self) -> dict[str, Any]:
        """The level without the per-prompt rows (those go to samples.jsonl)."""
        return {k: v for k, v in asdict(self).items() if k not in ("responses", "picks")}


# ---- selection ----------------------------------------------------------------------------------
def check_ns(ns: Iterable[int]) -> list[int]:
    """The levels, sorted and without repeats; each must be a positive integer (a DpokitError says
    which is not), so a typo fails before anything is loaded."""
    values = list(ns)
    bad = [n for n in values if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad or not values:
        raise DpokitError(f"best-of-n levels must be positive integers; not: {bad or 'no level at all'}")
    return sorted(set(values))


def parse_ns(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16] (sorted, repeats dropped); anything else raises a DpokitError."""
    values: list[int] = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            value = 0
        if value < 1:
            raise DpokitError(f"--n: '{part.strip()}' is not a positive integer; give a comma list such as 1,4,16")
        values.append(value)
    return check_ns(values)


def pick_best(rewards: Sequence[float | None]) -> int | None:
    """Index of the highest reward; ties go to the lowest index (deterministic, and a larger n never
    changes an earlier winner it does not beat); None entries (failed rows) are never picked. None
    when no entry was scored."""
    best: int | None = None
    best_value = -math.inf
    for j, value in enumerate(rewards):
        if value is not None and (best is None or value > best_value):
            best, best_value = j, value
    return best


def reward_table(
    reward: RowJudge, prompts: Sequence[str], samples: Sequence[Sequence[Sample]]
) -> list[list[float | None]]:
    """``table[i][j]``: the reward judge's score of sample j of prompt i (None where it failed), from
    one judge call over every sample. A reward that fails on every sample is a broken judge, not a
    property of the policy, so it raises with the judge's own error summary."""
    row_prompts = [prompts[i] for i, group in enumerate(samples) for _ in group]
    texts = [s.text for group in samples for s in group]
    judged: JudgeScores = reward(row_prompts, texts)
    if texts and not judged.valid():
        raise DpokitError(f"reward judge '{reward.name}' failed on all {len(texts)} samples: {judged.error_summary()}")
    table: list[list[float | None]] = []
    start = 0
    for group in samples:
        table.append(list(judged.scores[start : start + len(group)]))
        start += len(group)
    return table


def judge_picks(
    prompts: Sequence[str], samples: Sequence[Sequence[Sample]], keys: Iterable[Key], judges: Sequence[RowJudge]
) -> dict[str, dict[Key, float | None]]:
    """judge name -> {(i, j): score}: every distinct kept response scored once per judge (one call
    each), however many levels kept it; a reward-model judge is the expensive case this saves."""
    distinct = sorted(set(keys))
    row_prompts = [prompts[i] for i, _ in distinct]
    texts = [samples[i][j].text for i, j in distinct]
    out: dict[str, dict[Key, float | None]] = {}
    for judge in judges:
        scores = judge(row_prompts, texts).scores if distinct else []
        out[judge.name] = dict(zip(distinct, scores))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _level(
    n: int, winners: Sequence[int | None], samples: Sequence[Sequence[Sample]], rewards: Sequence[Sequence[float | None]],
    judged: dict[str, dict[Key, float | None]],
) -> BonLevel:  # fmt: skip
    """Assemble one level from its winners (per prompt: the kept sample index, None = skipped)."""
    picks: list[BonPick] = []
    for i, j in enumerate(winners):
        value = None if j is None else rewards[i][j]
        if j is not None and value is not None:  # a winner always has a reward (pick_best)
            picks.append(BonPick(i, j, value, samples[i][j].n_tokens, {name: s[(i, j)] for name, s in judged.items()}))
    scores: dict[str, float | None] = {}
    errors: dict[str, int] = {}
    for name in judged:
        valid = [v for v in (p.scores[name] for p in picks) if v is not None]
        scores[name] = _mean(valid)
        errors[name] = len(picks) - len(valid)
    return BonLevel(
        n=n, kl=bon_kl(n), proxy=_mean([p.reward for p in picks]), scores=scores,
        mean_length=_mean([float(p.n_tokens) for p in picks]),
        responses=[samples[p.prompt_index][p.sample_index].text for p in picks],
        skipped_prompts=sum(j is None for j in winners),
        reward_errors=sum(r is None for row in rewards for r in row[:n]), picks=picks, judge_errors=errors,
    )  # fmt: skip


def bon_levels(
    prompts: Sequence[str], samples: Sequence[Sequence[Sample]], reward: RowJudge, ns: Sequence[int],
    judges: Sequence[RowJudge],
) -> list[BonLevel]:  # fmt: skip
    """`run_bon` after sampling: ``samples[i]`` holds at least max(ns) samples of prompt i, in draw
    order; level n keeps the best of ``samples[i][:n]``. Separate so the selection is testable
    without a model."""
    levels = check_ns(ns)
    if len(samples) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} sample groups")
    short = [i for i, group in enumerate(samples) if len(group) < levels[-1]]
    if short:
        raise ValueError(f"prompt {short[0]} has {len(samples[short[0]])} samples, level n={levels[-1]} needs more")
    rewards = reward_table(reward, prompts, samples)
    winners = {n: [pick_best(row[:n]) for row in rewards] for n in levels}
    kept = ((i, j) for picked in winners.values() for i, j in enumerate(picked) if j is not None)
    judged = judge_picks(prompts, samples, kept, judges)
    return [_level(n, winners[n], samples, rewards, judged) for n in levels]


def run_bon(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    reward: RowJudge,
    ns: Sequence[int],
    judges: Sequence[RowJudge],
    sampling: SamplingSettings,
) -> list[BonLevel]:
    """Best-of-n for every n in ``ns`` (sorted, repeats dropped), from ONE sampling pass.

    ``sampling`` gives the sampler its settings (seed, temperature, top-p, lengths, batch size); its
    ``n`` is ignored: max(ns) responses are drawn per prompt and level n uses the first n of them.
    Per prompt, the kept reward is therefore non-decreasing in n; the mean over prompts is too as
    long as no prompt is skipped at a small n and kept at a larger one (rows the reward failed on).
    """
    from dpokit.eval.sampling import generate_samples  # torch: loaded when sampling, not for `--help`

    levels = check_ns(ns)
    samples = generate_samples(
        model, tokenizer, list(prompts), n=levels[-1], max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, batch_size=sampling.batch_size,
    )  # fmt: skip
    return bon_levels(prompts, samples, reward, levels, judges)


# ---- outputs ------------------------------------------------------------------------------------
def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def bon_table(levels: Sequence[BonLevel], reward: str, judges: Sequence[str]) -> str:
    """The markdown table: one row per n (n | KL bound | proxy | each judge | mean length)."""
    head = ["n", "KL bound, nats", f"proxy ({reward})", *[f"{j} score" for j in judges], "mean length, tokens"]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for lv in levels:
        cells = [str(lv.n), f"{lv.kl:.3f}", _num(lv.proxy, "+.3f"), *[_num(lv.scores.get(j), "+.3f") for j in judges],
                 _num(lv.mean_length, ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(levels: Sequence[BonLevel], info: dict[str, Any]) -> str:
    """summary.md: what was sampled, the table, and what the KL column means; counts of failures."""
    sm = info["sampling"]
    lines = [
        "# dpokit bon",
        "",
        f"`{info['model']}` on {info['n_prompts']} prompts from `{info['prompts']}`: {max(info['ns'])} samples per "
        f"prompt drawn once (temperature {sm['temperature']}, top-p {sm['top_p']}, {sm['max_new_tokens']} new tokens "
        f"at most, seed {sm['seed']}); level n keeps the `{info['reward']}` best of each prompt's first n samples.",
        "",
        bon_table(levels, info["reward"], info["judges"]),
        "",
        "*KL bound*: log n - (n-1)/n, an upper bound on KL(best-of-n || policy) (Beirami et al. 2024). "
        "*proxy*: mean reward of the kept responses (what best-of-n optimises); the judges' columns are the "
        "evaluation.",
        "",
    ]
    for lv in levels:
        failed = {name: k for name, k in lv.judge_errors.items() if k}
        if lv.skipped_prompts or lv.reward_errors or failed:
            lines.append(
                f"- n={lv.n}: {lv.skipped_prompts} prompt(s) skipped (no scored sample), {lv.reward_errors} reward "
                f"error(s)" + "".join(f", {name} failed on {k}" for name, k in failed.items())
            )
    return "\n".join(lines) + "\n"


def write_outputs(
    levels: Sequence[BonLevel], prompts: Sequence[str], info: dict[str, Any], out: Path
) -> dict[str, str]:
    """summary.json (``info`` + the levels), summary.md, samples.jsonl (one row per level and kept response)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "markdown": out / "summary.md", "samples": out / "samples.jsonl"}
    summary = {**info, "kl": "log n - (n-1)/n, an upper bound", "levels": [lv.summary() for lv in levels]}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(levels, info), encoding="utf-8")
    with paths["samples"].open("w", encoding="utf-8") as f:
        for lv in levels:
            for pick, text in zip(lv.picks, lv.responses):
                row = {"n": lv.n, "prompt_index": pick.prompt_index, "sample": pick.sample_index,
                       "prompt": prompts[pick.prompt_index], "response": text, "tokens": pick.n_tokens,
                       "reward": pick.reward, "scores": pick.scores}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {k: str(v) for k, v in paths.items()}


# ---- the `dpokit bon` command -------------------------------------------------------------------
def add_bon_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit bon` options to ``parser`` (nothing heavy is imported: `dpokit --help` stays fast)."""
    add = parser.add_argument
    add("--model", required=True, help="policy: HF folder, LoRA adapter folder, .gguf, Hub id or alias")
    add("--reward", required=True, metavar="SPEC", help="judge picking the best: rm:PATH, vader, textblob, mod:func")
    add("--n", default=DEFAULT_NS, metavar="N,N,...", help=f"best-of-n levels, comma list (default: {DEFAULT_NS})")
    add("--prompts", required=True, metavar="FILE", help='.jsonl with {"prompt": ...} lines, or .txt; builtin: paths')
    add("--limit", type=int, default=None, metavar="K", help="use only the first K prompts")
    add("--judges", default=DEFAULT_JUDGES, metavar="SPEC,...",
        help=f"evaluation judges of the kept responses, comma list (default: {DEFAULT_JUDGES})")  # fmt: skip
    add("--max-new-tokens", type=int, default=48)
    add("--temperature", type=float, default=1.0, help="default 1.0: best-of-n of the policy itself")
    add("--top-p", type=float, default=1.0)
    add("--seed", type=int, default=0, help="sampling seed")
    add("--batch-size", type=int, default=16, help="sequences per generate call and rows per reward-model forward")
    add("--out", default="runs/bon", help="folder for summary.json, summary.md, samples.jsonl (default: runs/bon)")


def _specs(text: str) -> list[str]:
    """``"vader, textblob,vader"`` -> ["vader", "textblob"]: a judge named twice is scored once."""
    specs: list[str] = []
    for part in text.split(","):
        if part.strip() and part.strip() not in specs:
            specs.append(part.strip())
    return specs


def bon_command(args: argparse.Namespace) -> int:
    """Run `dpokit bon` from parsed arguments: check the cheap things (levels, judges, prompts)
    before the model loads, sample and select, write the outputs, print the table; returns 0."""
    ns = parse_ns(args.n)
    if args.limit is not None and args.limit < 1:
        raise DpokitError(f"--limit must be >= 1, got {args.limit}")
    from dpokit.config import Config
    from dpokit.eval.generate_eval import SamplingSettings, generation_config, load_candidate

    cfg = generation_config(Config())  # left-padded generation: sdpa, never the varlen kernel
    reward = load_judge(args.reward, cfg, args.batch_size)
    judges = [load_judge(spec, cfg, args.batch_size) for spec in _specs(args.judges)]
    prompts = read_prompts(args.prompts)[: args.limit]
    sampling = SamplingSettings(
        n=ns[-1], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        batch_size=args.batch_size, score_batch_size=args.batch_size,
    )  # fmt: skip
    policy = load_candidate("policy", args.model, cfg, None)  # an adapter folder loads on its base
    print(f"[bon] sampling {len(prompts)} prompts x {ns[-1]} ({policy.source})", file=sys.stderr)
    levels = run_bon(policy.model, policy.tokenizer, prompts, reward, ns, judges, sampling)
    info = {
        "model": args.model, "reward": reward.name, "prompts": args.prompts, "n_prompts": len(prompts), "ns": ns,
        "judges": [j.name for j in judges], "sampling": asdict(sampling),
    }  # fmt: skip
    files = write_outputs(levels, prompts, info, Path(args.out))
    print(bon_table(levels, reward.name, info["judges"]))
    print(f"written: {', '.join(files.values())}")
    return 0
