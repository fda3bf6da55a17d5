"""`dpokit iterate`: iterative (online) DPO with AI feedback, round after round.

Round k (k = 1 .. ``iterate.rounds``):

1. the policy round k starts from (the starting model for k = 1, else round k-1's) samples
   ``iterate.n_samples`` responses to ``iterate.prompts_per_round`` training prompts;
2. the judge (``iterate.judge``: vader, textblob, rm:PATH, module:function) scores them and the best vs
   the worst response of a prompt becomes a pair when the score gap is at least ``iterate.min_gap``
   (`dpokit.apps.pairs.build_pairs`, what `dpokit pairs` runs) -> ``OUT/round-k/pairs.jsonl``;
3. DPO (`dpokit.training.loop.train`, the whole training config: model, lora, loss, train) trains on
   these pairs, starting from the previous policy -> ``OUT/round-k/model``. With LoRA the round saves
   a merged model (``model/merged``), which is round k+1's ``model.name_or_path``: the next adapters
   start from this policy. The reference (``iterate.reference``) is ``previous`` (the policy the round
   starts from: the LoRA base with adapters off, or a frozen copy) or ``original`` (the starting
   model, loaded as a frozen copy: ``reference.mode=copy``, ``reference.name_or_path``);
4. the new policy samples one response per held-out prompt (fixed seed, the same for every round,
   as `dpokit demo` does), judged by the same judge, and its sequence-level KL to the starting model
   is estimated from those samples (`dpokit.eval.generate_eval.measure`, the demo's measure); the
   samples, scores and log-ratios go to ``OUT/round-k/heldout.jsonl``.

Round 0 is the starting model measured the same way. OUT = ``train.output_dir``; it receives
``rounds.jsonl`` (one JSON row per round, written as each ends) and ``iterate.md`` (the table and
what it means), and the table is printed. Rounds run in this process; besides training, at most the
policy and the starting model (for the KL) are loaded at once.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dpokit.apps.pairs import PairStats, build_pairs
from dpokit.config import Config
from dpokit.errors import ConfigError, DpokitError

Log = Callable[[str], Any]
ROWS_FILE = "rounds.jsonl"
DOC_FILE = "iterate.md"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RoundRow:
    """One round's results (a line of rounds.jsonl); round 0 is the starting model."""

    round: int
    policy: str  # the model folder (or name) of the round's policy
    heldout_score: float | None  # mean judge score of its held-out samples
    kl: float | None  # KL(policy || starting model), nats per sequence, from the held-out samples
    kl_sem: float | None
    heldout_length: float  # mean held-out response length, tokens
    sample_score: float | None = None  # mean judge score of the samples the round trained on (its start policy's)
    pairs: int | None = None  # pairs kept
    prompts: int | None = None  # prompts sampled
    mean_gap: float | None = None  # mean judge score gap of the kept pairs
    reference: str = ""  # what the round's DPO reference was
    example: str = ""  # its response to the first held-out prompt
    train_metrics: dict[str, float] = field(default_factory=dict)  # the last logged training row
    seconds: dict[str, float] = field(default_factory=dict)  # pairs, train, heldout


@dataclass
class IterateResult:
    rows: list[RoundRow]
    files: dict[str, str]


# ---- configuration --------------------------------------------------------------------------------
def check_config(cfg: Config) -> Config:
    """The validated config, refused where rounds could not chain (the policy of a round is a plain
    model folder: LoRA runs must be able to merge) or where the user set what iterate decides."""
    cfg.validate()
    if cfg.lora.enabled and cfg.lora.quantize != "none":
        raise ConfigError(
            "dpokit iterate starts each round from the previous round's merged model; lora.quantize cannot merge: "
            "set lora.quantize=none"
        )
    if cfg.reference.name_or_path:
        raise ConfigError(
            "dpokit iterate chooses each round's reference itself (iterate.reference: previous | original); "
            "leave reference.name_or_path unset"
        )
    return cfg


def round_config(cfg: Config, k: int, start: str, out: Path) -> Config:
    """Round k's training config: its pairs, its folder, the policy it starts from and its reference."""
    from dpokit.objectives.dpo import reference_mode

    folder = out / f"round-{k}"
    ref = cfg.reference
    if cfg.iterate.reference == "original" and k > 1 and reference_mode(cfg) != "none":
        ref = replace(ref, mode="copy", name_or_path=cfg.model.name_or_path)
    return replace(
        cfg,
        model=replace(cfg.model, name_or_path=start),
        data=replace(cfg.data, train_files=[str(folder / "pairs.jsonl")]),
        train=replace(cfg.train, output_dir=str(folder / "model"), overwrite=True, resume="no"),
        lora=replace(cfg.lora, merge=cfg.lora.enabled),  # the merged folder is the next round's starting policy
        reference=ref,
    ).validate()


def reference_name(cfg: Config, k: int) -> str:
    """How the report names round k's DPO reference."""
    from dpokit.objectives.dpo import reference_mode

    if reference_mode(cfg) == "none":
        return "none (reference-free loss)"
    if cfg.iterate.reference == "original" or k == 1:
        return "original"
    return f"round {k - 1}"


def policy_folder(result: Any, cfg: Config) -> str:
    """The folder a finished round leaves its policy in: the merged model (LoRA) or the model itself."""
    written = result.written
    key = "merged" if cfg.lora.enabled else "model"
    if key not in written:
        raise DpokitError(f"{cfg.train.output_dir}: training wrote no {key} folder ({', '.join(written)})")
    return written[key]


def round_prompts(prompts: Sequence[str], per_round: int, rounds: int, seed: int) -> list[list[str]]:
    """Round k's prompts (index k-1): consecutive slices of one seeded shuffle, wrapping around, so rounds
    see different prompts until all have been used."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return [[order[(r * per_round + i) % len(order)] for i in range(per_round)] for r in range(rounds)]


def read_prompt_files(files: Sequence[str]) -> list[str]:
    from dpokit.data.files import read_prompts

    return [p for path in files for p in read_prompts(path)]


def prepare_output(cfg: Config) -> Path:
    """OUT (train.output_dir); a folder that holds a previous iterate run is refused unless train.overwrite."""
    out = Path(cfg.train.output_dir)
    if (out / ROWS_FILE).exists() and not cfg.train.overwrite:
        raise ConfigError(f"{out} holds a previous `dpokit iterate` run ({ROWS_FILE}); set train.overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    (out / ROWS_FILE).write_text("", encoding="utf-8")
    return out


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ---- models, judging, pairs ---------------------------------------------------------------------
def load_policy(source: str, cfg: Config) -> tuple[Any, Any]:
    """A plain model for sampling and scoring (no adapters), on this process's device, in eval mode."""
    from dpokit.dist import Dist
    from dpokit.eval.generate_eval import generation_config
    from dpokit.models.loading import load_model_and_tokenizer, resolve_dtype

    device = Dist.local().device
    model, tokenizer = load_model_and_tokenizer(source, generation_config(cfg), resolve_dtype(cfg.model.dtype, device))
    model.to(device).eval()
    if tokenizer.pad_token_id is None:  # the sampler pads prompts on the left
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def texts_judge(judge: Any, prompts: Sequence[str], n: int) -> Callable[[Sequence[str]], list[float]]:
    """A `RowJudge` (prompt, response) as the texts -> scores callable `build_pairs` takes: it scores the
    samples prompt-major, n per prompt, so row i belongs to prompts[i // n]. A row the judge fails on
    stops the round (a pair must not be built from a missing score)."""
    row_prompts = [p for p in prompts for _ in range(n)]

    def score(texts: Sequence[str]) -> list[float]:
        if len(texts) != len(row_prompts):
            raise DpokitError(f"judge {judge.name}: {len(texts)} samples for {len(prompts)} prompts x {n}")
        scored = judge(row_prompts, list(texts))
        if scored.errors:
            raise DpokitError(scored.error_summary())
        return [float(s) for s in scored.scores]

    score.__name__ = judge.name
    return score


def sample_pairs(k: int, model: Any, tokenizer: Any, prompts: Sequence[str], judge: Any, cfg: Config,
                 out: Path) -> PairStats:  # fmt: skip
    """Round k's pairs from ``model`` (the policy it starts from), written to OUT/round-k/pairs.jsonl."""
    it = cfg.iterate
    rows, stats = build_pairs(
        model, tokenizer, prompts, texts_judge(judge, prompts, it.n_samples), n_samples=it.n_samples,
        min_gap=it.min_gap, max_new_tokens=it.max_new_tokens, temperature=it.temperature, top_p=it.top_p,
        seed=it.seed + k, batch_size=it.gen_batch_size,
    )  # fmt: skip
    write_jsonl(out / f"round-{k}" / "pairs.jsonl", rows)
    if not rows and k == 1:  # later rounds stop gracefully (`too_few_pairs`): earlier rounds trained
        raise DpokitError(
            f"round {k}: no pairs kept ({stats.summary()}); try more iterate.n_samples, a lower iterate.min_gap "
            "or longer responses (iterate.max_new_tokens)"
        )
    return stats


def measure_heldout(k: int, model: Any, tokenizer: Any, original: Any, prompts: Sequence[str], judge: Any,
                    cfg: Config) -> Any:  # fmt: skip
    """The demo's measure of one policy on the held-out prompts: judge score, length, and the KL to the
    starting model ``original`` (None: the policy is the starting model, KL 0)."""
    from dpokit.eval.generate_eval import SELF, Candidate, SamplingSettings, measure

    it = cfg.iterate
    sampling = SamplingSettings(
        n=1, max_new_tokens=it.max_new_tokens, temperature=it.temperature, top_p=it.top_p, seed=it.heldout_seed,
        batch_size=it.gen_batch_size, score_batch_size=it.score_batch_size,
    )  # fmt: skip
    reference = SELF if original is None else original
    cand = Candidate(f"round-{k}", model, tokenizer, reference, reference_name="the starting model")
    return measure(cand, prompts, sampling, [judge])


def evaluate_and_sample(k: int, policy: str, cfg: Config, judge: Any, heldout: Sequence[str],
                        next_prompts: Sequence[str] | None, out: Path) -> tuple[Any, PairStats | None, dict[str, float]]:  # fmt: skip
    """Load round k's policy (and the starting model for the KL), measure it on the held-out prompts
    (a `ModelEval`), then sample round k+1's pairs from it (``next_prompts``; None after the last round);
    returns the measure, the pairs' stats and the seconds of both. The held-out samples go to
    OUT/round-k/heldout.jsonl, as `dpokit evaluate --prompts` writes them."""
    from dpokit.eval.generate_eval import sample_rows

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_policy(policy, cfg)
    original = None if k == 0 else load_policy(cfg.model.name_or_path, cfg)[0]
    ev = measure_heldout(k, model, tokenizer, original, heldout, judge, cfg)
    del original
    gc.collect()
    write_jsonl(out / f"round-{k}" / "heldout.jsonl", sample_rows(ev, heldout))
    seconds["heldout"] = time.perf_counter() - start
    stats = None
    if next_prompts is not None:
        start = time.perf_counter()
        stats = sample_pairs(k + 1, model, tokenizer, next_prompts, judge, cfg, out)
        seconds["pairs"] = time.perf_counter() - start
    del model
    gc.collect()
    return ev, stats, seconds


def train_round(cfg: Config, k: int, log: Log) -> tuple[str, dict[str, float], float]:
    """DPO of round k (in this process); returns the policy folder, the last logged row and the seconds."""
    from dpokit.training.loop import train

    start = time.perf_counter()
    log(f"[iterate] round {k}: DPO from {cfg.model.name_or_path} -> {cfg.train.output_dir}")
    result = train(cfg)
    if result.stopped_by:
        raise DpokitError(f"round {k}: training was stopped at step {result.steps}; the iteration is incomplete")
    gc.collect()
    metrics = {name: float(v) for name, v in result.final_metrics.items() if isinstance(v, (int, float))}
    return policy_folder(result, cfg), metrics, time.perf_counter() - start


# ---- the command ----------------------------------------------------------------------------------
def run_iterate(cfg: Config, doc: str | None = None, log: Log = _stderr) -> IterateResult:
    """Round 0 (the starting model), then ``iterate.rounds`` rounds; writes OUT/round-k/{pairs.jsonl,
    model/}, OUT/rounds.jsonl, OUT/iterate.md (and ``doc``, a copy of it); prints the table."""
    from dpokit.data.files import read_prompts
    from dpokit.eval.judges import load_judge
    from dpokit.models import sources

    cfg = check_config(cfg)
    it = cfg.iterate
    out = prepare_output(cfg)
    per_round = round_prompts(read_prompt_files(it.prompt_files), it.prompts_per_round, it.rounds, it.seed)
    heldout = read_prompts(it.heldout_file)[: it.heldout_prompts]
    judge = load_judge(it.judge, cfg, it.score_batch_size)  # a bad judge fails before any model loads
    sources.materialize_gguf(cfg.model.name_or_path, log=log)  # a GGUF start is dequantised once, reused
    rows: list[RoundRow] = []
    policy, stats, pair_seconds, stopped = cfg.model.name_or_path, None, 0.0, None
    for k in range(it.rounds + 1):
        stopped = too_few_pairs(cfg, k, stats)
        if stopped:  # the judge no longer separates the policy's samples: nothing left to learn from
            log(f"[iterate] {stopped}")
            break
        row = RoundRow(round=k, policy=policy, heldout_score=None, kl=None, kl_sem=None, heldout_length=0.0)
        if k > 0:
            row.seconds["pairs"], row.reference = pair_seconds, reference_name(cfg, k)
            policy, row.train_metrics, row.seconds["train"] = train_round(round_config(cfg, k, policy, out), k, log)
        then = f", then round {k + 1}'s pairs" if k < it.rounds else ""
        log(f"[iterate] round {k}: held-out samples of {policy}{then}")
        next_prompts = per_round[k] if k < it.rounds else None
        ev, next_stats, seconds = evaluate_and_sample(k, policy, cfg, judge, heldout, next_prompts, out)
        row.policy, row.heldout_score, row.kl, row.kl_sem, row.heldout_length, row.example = (
            policy, ev.mean_score.get(judge.name), ev.kl, ev.kl_sem, ev.mean_length, ev.samples[0][0].text
        )
        row.seconds["heldout"], pair_seconds = seconds["heldout"], seconds.get("pairs", 0.0)
        if stats is not None:
            row.sample_score, row.pairs, row.prompts, row.mean_gap = (
                stats.mean_sample_score, stats.kept, stats.prompts, stats.mean_gap
            )
        stats = next_stats
        rows.append(row)
        with (out / ROWS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(row)) + "\n")
        log(f"[iterate] round {k}: " + " | ".join(table_cells(row)))
    return finish(cfg, rows, out, doc, heldout[0], stopped)


def too_few_pairs(cfg: Config, k: int, stats: PairStats | None) -> str | None:
    """Why round k cannot train (fewer kept pairs than one optimizer step takes), or None."""
    step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    if k == 0 or stats is None or stats.kept >= step:
        return None
    return (f"round {k} kept {stats.kept} pair(s) from {stats.prompts} prompts, fewer than one optimizer step's {step}: "
            f"the judge no longer separates the samples of round {k - 1}'s policy by iterate.min_gap "
            f"({cfg.iterate.min_gap:g}); stopped after round {k - 1}")  # fmt: skip


def finish(cfg: Config, rows: list[RoundRow], out: Path, doc: str | None, first_prompt: str,
           stopped: str | None = None) -> IterateResult:  # fmt: skip
    """Write iterate.md (and the ``doc`` copy), print the table (and why the rounds stopped early)."""
    text = render_markdown(cfg, rows, first_prompt, stopped)
    files = {"rows": str(out / ROWS_FILE), "markdown": str(out / DOC_FILE)}
    (out / DOC_FILE).write_text(text, encoding="utf-8")
    if doc:
        Path(doc).parent.mkdir(parents=True, exist_ok=True)
        Path(doc).write_text(text, encoding="utf-8")
        files["doc"] = doc
    print(markdown_table(cfg.iterate.judge, rows))
    if stopped:
        print(f"stopped early: {stopped}")
    print(f"wrote {files['rows']}, {files['markdown']}" + (f", {doc}" if doc else ""))
    return IterateResult(rows, files)


# ---- the report -----------------------------------------------------------------------------------
def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def table_cells(row: RoundRow) -> list[str]:
    kl = "0" if row.round == 0 else f"{_num(row.kl, '.2f')} ± {_num(row.kl_sem, '.2f')}"
    pairs = "—" if row.pairs is None else f"{row.pairs} / {row.prompts}"
    minutes = sum(row.seconds.values()) / 60
    return [
        str(row.round), _num(row.heldout_score, "+.3f"), kl, _num(row.heldout_length, ".1f"),
        "—" if row.sample_score is None else _num(row.sample_score, "+.3f"), pairs,
        row.reference or "—", f"{minutes:.1f}",
    ]  # fmt: skip


def markdown_table(judge: str, rows: Sequence[RoundRow]) -> str:
    head = [
        "round", f"held-out {judge}", "KL(policy ‖ start), nats ± s.e.", "held-out length", f"round samples {judge}",
        "pairs kept / prompts", "DPO reference", "minutes",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(cfg: Config, rows: Sequence[RoundRow], first_prompt: str, stopped: str | None = None) -> str:
    """OUT/iterate.md: what ran, the table, what its columns mean, the files, one example per round."""
    from dpokit.eval.scoring import KL_ESTIMATOR

    it, t = cfg.iterate, cfg.train
    how = f"LoRA (r {cfg.lora.r}, merged after each round)" if cfg.lora.enabled else "full fine-tuning"
    total = sum(sum(r.seconds.values()) for r in rows) / 60
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    kl_note = (
        "unbiased: sampled at temperature 1, top-p 1" if it.temperature == 1 and it.top_p == 1
        else f"sampled at temperature {it.temperature:g}, top-p {it.top_p:g}: the mean log-ratio under that "
        "distribution, a proxy of the KL, as in `dpokit demo`"
    )  # fmt: skip
    lines = [
        "# dpokit iterate: iterative DPO with AI feedback",
        "",
        f"Starting model `{cfg.model.name_or_path}`; {it.rounds} rounds. Each round samples {it.prompts_per_round} "
        f"prompts of {', '.join(f'`{p}`' for p in it.prompt_files)} x {it.n_samples} responses from the policy it "
        f"starts from, lets the `{it.judge}` judge score them, keeps best vs worst where the gap is >= {it.min_gap:g}, "
        f"and trains {steps} of DPO ({cfg.loss.type}, beta {cfg.loss.beta:g}, lr {t.lr:g}, "
        f"{t.micro_batch_size * t.grad_accum_steps} pairs per step, {how}) from that policy; reference: "
        f"`{it.reference}`.",
        "",
        markdown_table(it.judge, rows),
        "",
        *([f"**Stopped early**: {stopped}.", ""] if stopped else []),
        f"*held-out {it.judge}*: mean judge score of one response per prompt to the first {it.heldout_prompts} "
        f"prompts of `{it.heldout_file}`, sampled with the same seed ({it.heldout_seed}) for every round. "
        f"*KL*: {KL_ESTIMATOR}, against the starting model, over those samples ({kl_note}). "
        f"*round samples*: mean judge score of the {it.n_samples} samples per prompt the round's pairs came from, "
        "drawn from the policy the round started from (round k's row: round k-1's policy). Round 0 is the "
        f"starting model. Lengths in tokens. Sampling: temperature {it.temperature:g}, top-p {it.top_p:g}, "
        f"{it.max_new_tokens} new tokens at most. Total {total:.0f} min.",
        "",
        f"Files: `{t.output_dir}/round-k/pairs.jsonl` (the round's pairs), `round-k/model/` (its DPO run), "
        f"`round-k/heldout.jsonl` (held-out samples, scores, log-ratios to the start), `{ROWS_FILE}`.",
        "",
        f"Each round's response to the first held-out prompt, *{_one_line(first_prompt)}*:",
        "",
        *[f"- round {r.round}: {_one_line(r.example)}" for r in rows],
        "",
    ]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---- CLI ------------------------------------------------------------------------------------------
def iterate_command(cfg: Config, doc: str | None = None) -> int:
    """Run `dpokit iterate` on a validated config; returns the exit status."""
    run_iterate(cfg, doc=doc)
    return 0
