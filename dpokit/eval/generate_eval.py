"""`dpokit evaluate --prompts`: judged evaluation by generation.

Every model samples responses to the same prompts with the same settings and seed (the one
sampler, `dpokit.eval.sampling.generate_samples`), judges score them (`dpokit.eval.judges`), and
each model gets, per judge, its mean score, its win rate against the baseline's response to the
same prompt (ties half; sample j against the baseline's sample j) with a seeded percentile
bootstrap 95% interval over prompts, and the correlation of score with response length (a judge
or a policy that rewards length shows here); plus the mean response length and the sequence-level
KL(model || reference) with its estimator (`dpokit.eval.scoring.KL_ESTIMATOR`) and standard error.
The reference of a LoRA adapter is its base (adapters off); of any other model, the baseline.

`measure` is the part `dpokit demo` reuses (its base / midpoint / final stages are `Candidate`s of
one LoRA model); `evaluate_prompts` loads models from sources and writes ``samples.jsonl``,
``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.eval import scoring
from dpokit.eval.judges import JudgeScores, RowJudge, load_judge
from dpokit.eval.sampling import Sample, generate_samples

SELF = "self"  # Candidate.reference: the model is its own reference (KL 0, nothing computed)
ADAPTER = "adapter"  # ... the base of a PEFT model, with the adapters disabled


@dataclass
class SamplingSettings:
    """How every model samples; the same for all of them, so differences are not sampling luck."""

    n: int = 1  # samples per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0  # 1 with top_p 1: samples from the model itself, so the KL estimate is unbiased
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16  # sequences per generate call
    score_batch_size: int = 16  # sequences per log-prob forward (the KL estimate)


@dataclass
class Candidate:
    """A model to measure. ``reference``: SELF, ADAPTER, a model object, or None (no reference with
    the same tokenizer: the KL is not reported). ``adapters_off``: sample from a PEFT model's base."""

    name: str
    model: Any
    tokenizer: Any
    reference: Any = SELF
    adapters_off: bool = False
    source: str = ""
    reference_name: str = ""  # how the report names the reference


@dataclass
class ModelEval:
    """One model's measurements; rows are (prompt i, sample j) in that order (``i * n + j``)."""

    name: str
    source: str
    samples: list[list[Sample]]
    scores: dict[str, list[float | None]]  # judge -> per row; None where the judge failed on the row
    errors: dict[str, dict[int, str]]  # judge -> row -> why
    mean_score: dict[str, float | None]
    win_rate: dict[str, float | None]  # against the baseline (0.5 for the baseline itself)
    win_interval: dict[str, list[float] | None]  # bootstrap 95% interval of the win rate
    kl: float | None
    kl_sem: float | None
    reference: str
    logratios: list[float] | None  # per row: sum_t log pi - log ref
    mean_length: float
    length_corr: dict[str, float | None]  # judge -> Pearson correlation of score with length (tokens)

    def by_prompt(self, judge: str) -> list[list[float | None]]:
        n = len(self.samples[0]) if self.samples else 1
        flat = self.scores[judge]
        return [flat[i * n : (i + 1) * n] for i in range(len(self.samples))]

    def summary(self) -> dict[str, Any]:
        """Everything but the samples and per-row values (those go to samples.jsonl)."""
        skip = {"samples", "scores", "logratios"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---- measuring one model ----------------------------------------------------------------------
def measure(
    cand: Candidate,
    prompts: Sequence[str],
    sampling: SamplingSettings,
    judges: Sequence[RowJudge],
    baseline: ModelEval | None = None,
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
) -> ModelEval:
    """Sample ``cand`` on ``prompts``, judge the responses, and compare with ``baseline`` (None: this
    is the baseline; its win rate is 1/2 by definition)."""
    samples = _sample(cand, prompts, sampling)
    flat = [s for group in samples for s in group]
    row_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    judged: dict[str, JudgeScores] = {j.name: j(row_prompts, [s.text for s in flat]) for j in judges}
    lengths = [float(s.n_tokens) for s in flat]
    ratios = _logratios(cand, flat, sampling.score_batch_size)
    kl, kl_sem = scoring.mean_and_sem(ratios) if ratios is not None else (None, None)
    ev = ModelEval(
        name=cand.name, source=cand.source, samples=samples, scores={k: v.scores for k, v in judged.items()},
        errors={k: v.errors for k, v in judged.items()}, mean_score={}, win_rate={}, win_interval={}, kl=kl,
        kl_sem=kl_sem, reference=cand.reference_name or _reference_name(cand.reference), logratios=ratios,
        mean_length=sum(lengths) / len(lengths) if lengths else float("nan"), length_corr={},
    )  # fmt: skip
    for name, js in judged.items():
        valid = [(s, n) for s, n in zip(js.scores, lengths) if s is not None]
        ev.mean_score[name] = sum(s for s, _ in valid) / len(valid) if valid else None
        ev.length_corr[name] = scoring.correlation([s for s, _ in valid], [n for _, n in valid])
        if baseline is None:
            ev.win_rate[name], ev.win_interval[name] = 0.5, None
            continue
        outcomes = scoring.prompt_outcomes(ev.by_prompt(name), baseline.by_prompt(name))
        ev.win_rate[name] = sum(outcomes) / len(outcomes) if outcomes else None
        ev.win_interval[name] = list(scoring.bootstrap_interval(outcomes, n_boot, bootstrap_seed)) if outcomes else None
    return ev


def _sample(cand: Candidate, prompts: Sequence[str], st: SamplingSettings) -> list[list[Sample]]:
    context = cand.model.disable_adapter() if cand.adapters_off else contextlib.nullcontext()
    with context:
        return generate_samples(
            cand.model, cand.tokenizer, list(prompts), n=st.n, max_new_tokens=st.max_new_tokens,
            temperature=st.temperature, top_p=st.top_p, seed=st.seed, batch_size=st.batch_size,
        )  # fmt: skip


def _logratios(cand: Candidate, flat: list[Sample], batch_size: int) -> list[float] | None:
    """Per-sample log pi - log ref; zeros for a model that is its own reference, None without one."""
    if cand.reference is None:
        return None
    if isinstance(cand.reference, str) and cand.reference == SELF:
        return [0.0] * len(flat)
    reference = None if isinstance(cand.reference, str) and cand.reference == ADAPTER else cand.reference
    return scoring.logratios(cand.model, flat, batch_size, reference)


def _reference_name(reference: Any) -> str:
    if reference is None:
        return "none (different tokenizer)"
    if isinstance(reference, str):
        return {SELF: "itself", ADAPTER: "its base (adapters off)"}[reference]
    return "the baseline"


# ---- the command --------------------------------------------------------------------------------
@dataclass
class PromptEvalSettings:
    """`dpokit evaluate --prompts`: what to sample from which models, and how to judge it."""

    prompts: str
    models: list[tuple[str, str]]  # (name, source): folder, LoRA adapter, .gguf, alias or Hub id
    baseline: str | None = None  # a model name; default: the first model
    judges: list[str] = field(default_factory=lambda: ["vader"])
    out: str = "runs/evaluate"
    n_prompts: int | None = None  # the first N prompts only
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    n_boot: int = 1000
    bootstrap_seed: int = 0


@dataclass
class PromptEvalResult:
    settings: PromptEvalSettings
    prompts: list[str]
    models: list[ModelEval]
    timings: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)


def evaluate_prompts(
    settings: PromptEvalSettings, cfg: Config | None = None, log: Callable[[str], Any] = print
) -> PromptEvalResult:
    """Load the models one at a time (the baseline first, kept for the KL of full models), measure
    each, write samples.jsonl, summary.json and summary.md into ``settings.out``."""
    from dpokit.data.files import read_prompts

    names = _check_settings(settings)
    cfg = generation_config(cfg or Config())
    prompts = read_prompts(settings.prompts)[: settings.n_prompts]
    judges = [load_judge(j, cfg, settings.sampling.score_batch_size) for j in settings.judges]  # fail early
    base_name = settings.baseline or names[0]
    order = [base_name] + [n for n in names if n != base_name]
    sources = dict(settings.models)
    timings: dict[str, float] = {}
    evals: dict[str, ModelEval] = {}
    baseline: Candidate | None = None
    for name in order:
        start = time.perf_counter()
        cand = load_candidate(name, sources[name], cfg, baseline)
        log(f"[evaluate] {name}: sampling {len(prompts)} prompts x {settings.sampling.n} ({cand.source})")
        evals[name] = measure(cand, prompts, settings.sampling, judges, evals.get(base_name),
                              settings.n_boot, settings.bootstrap_seed)  # fmt: skip
        timings[name] = time.perf_counter() - start
        if baseline is None:
            baseline = cand
        else:
            del cand
            gc.collect()
    result = PromptEvalResult(settings, prompts, [evals[n] for n in names], timings)
    result.files = write_outputs(result, Path(settings.out))
    return result


def _check_settings(settings: PromptEvalSettings) -> list[str]:
    names = [name for name, _ in settings.models]
    if not names:
        raise DpokitError("evaluate --prompts needs at least one --model NAME=PATH")
    if len(set(names)) != len(names):
        raise DpokitError(f"model names must differ, got {', '.join(names)}")
    if settings.baseline is not None and settings.baseline not in names:
        raise DpokitError(f"--baseline {settings.baseline} is not one of the models: {', '.join(names)}")
    if settings.n_prompts is not None and settings.n_prompts < 1:
        raise DpokitError(f"--n-prompts must be >= 1, got {settings.n_prompts}")
    if settings.sampling.n < 1 or not settings.judges:
        raise DpokitError("need --samples-per-prompt >= 1 and at least one --judge")
    return names


def generation_config(cfg: Config) -> Config:
    """Left-padded prompts generate with plain SDPA and transformers' own masks, never dpokit's varlen."""
    if cfg.model.attn_implementation in ("auto", "varlen"):
        cfg = cfg.override(["model.attn_implementation=sdpa"])
    return cfg


def load_candidate(name: str, source: str, cfg: Config, baseline: Candidate | None) -> Candidate:
    """Load a model (an adapter folder on its base, whose reference is that base); a full model's
    reference is ``baseline`` (None: it is the baseline, its own reference), when the tokenizers agree."""
    from dpokit.dist import Dist
    from dpokit.eval.pairs import load_for_eval
    from dpokit.models.loading import resolve_dtype

    device = Dist.local().device
    model, tokenizer, is_adapter = load_for_eval(source, cfg, resolve_dtype(cfg.model.dtype, device))
    model.to(device).eval()
    if tokenizer.pad_token_id is None:  # the sampler pads prompts on the left
        tokenizer.pad_token = tokenizer.eos_token
    if is_adapter:
        return Candidate(name, model, tokenizer, ADAPTER, source=source, reference_name="its base (adapters off)")
    if baseline is None:
        return Candidate(name, model, tokenizer, SELF, source=source, reference_name="itself")
    if tokenizer.get_vocab() != baseline.tokenizer.get_vocab():
        return Candidate(name, model, tokenizer, None, source=source)
    return Candidate(name, model, tokenizer, baseline.model, source=source, reference_name=f"baseline {baseline.name}")


# ---- outputs ------------------------------------------------------------------------------------
def write_outputs(result: PromptEvalResult, out: Path) -> dict[str, str]:
    """samples.jsonl (one line per model, prompt and sample), summary.json, summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out / "samples.jsonl", "summary": out / "summary.json", "markdown": out / "summary.md"}
    with paths["samples"].open("w", encoding="utf-8") as f:
        for ev in result.models:
            for row in sample_rows(ev, result.prompts):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = summary_json(result)
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(result), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def sample_rows(ev: ModelEval, prompts: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    flat = [(i, j, s) for i, group in enumerate(ev.samples) for j, s in enumerate(group)]
    for k, (i, j, s) in enumerate(flat):
        row: dict[str, Any] = {
            "model": ev.name, "prompt_index": i, "sample": j, "prompt": prompts[i], "response": s.text,
            "tokens": s.n_tokens, "finished": s.finished, "scores": {name: v[k] for name, v in ev.scores.items()},
            "logratio": None if ev.logratios is None else ev.logratios[k],
        }  # fmt: skip
        errors = {name: e[k] for name, e in ev.errors.items() if k in e}
        if errors:
            row["errors"] = errors
        rows.append(row)
    return rows


def summary_json(result: PromptEvalResult) -> dict[str, Any]:
    st = result.settings
    return {
        "prompts": st.prompts, "n_prompts": len(result.prompts), "baseline": st.baseline or st.models[0][0],
        "judges": list(st.judges), "sampling": asdict(st.sampling), "kl_estimator": scoring.KL_ESTIMATOR,
        "bootstrap": {"resamples": st.n_boot, "seed": st.bootstrap_seed, "level": 0.95, "unit": "prompt"},
        "models": [ev.summary() for ev in result.models], "timings_s": result.timings,
    }  # fmt: skip


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def table_rows(models: Sequence[ModelEval], judges: Sequence[str], baseline: str) -> list[list[str]]:
    """One row per measurement, one column per model (as the demo's before/after table)."""
    rows = [["", *[ev.name for ev in models]]]
    for j in judges:
        rows.append([f"mean {j} score", *[_num(ev.mean_score.get(j), "+.3f") for ev in models]])
    for j in judges:
        rows.append([f"win rate vs {baseline}, {j} [95% CI]", *[_win(ev, j, baseline) for ev in models]])
    rows.append(["KL(model ‖ reference), nats ± s.e.", *[_kl(ev) for ev in models]])
    rows.append(["reference", *[ev.reference for ev in models]])
    rows.append(["mean length, tokens", *[f"{ev.mean_length:.1f}" for ev in models]])
    for j in judges:
        rows.append([f"corr({j} score, length)", *[_num(ev.length_corr.get(j), "+.2f") for ev in models]])
    errors = [sum(len(e) for e in ev.errors.values()) for ev in models]
    if any(errors):
        rows.append(["judge errors (rows)", *[str(n) for n in errors]])
    return rows


def _win(ev: ModelEval, judge: str, baseline: str) -> str:
    if ev.name == baseline:
        return "—"
    rate, ci = ev.win_rate.get(judge), ev.win_interval.get(judge)
    text = _num(None if rate is None else 100 * rate, ".0f") + "%"
    return text + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _kl(ev: ModelEval) -> str:
    if ev.kl is None:
        return "n/a"
    return "0" if ev.reference == "itself" else f"{ev.kl:.2f} ± {ev.kl_sem:.2f}"


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if c == 0 else "---:" for c in range(len(head))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in body])


def render_markdown(result: PromptEvalResult) -> str:
    st, sm = result.settings, result.settings.sampling
    baseline = st.baseline or st.models[0][0]
    lines = [
        "# dpokit evaluate --prompts",
        "",
        f"{len(result.prompts)} prompts from `{st.prompts}`, {sm.n} sample(s) each per model; temperature "
        f"{sm.temperature}, top-p {sm.top_p}, {sm.max_new_tokens} new tokens at most, seed {sm.seed} for every model.",
        f"Models: {', '.join(f'`{ev.name}` = `{ev.source}`' for ev in result.models)}; baseline `{baseline}`.",
        "",
        markdown_table(table_rows(result.models, st.judges, baseline)),
        "",
        f"*Win rate*: share of (prompt, sample j) where the model's response scores higher than the baseline's "
        f"sample j on the same prompt, ties half; interval: percentile bootstrap over prompts ({st.n_boot} "
        f"resamples, seed {st.bootstrap_seed}). *KL*: {scoring.KL_ESTIMATOR}; unbiased for KL(pi || ref) at "
        "temperature 1 and top-p 1, otherwise the log-ratio under the sampling distribution. *corr*: Pearson "
        "correlation of the judge's score with the response length over the model's samples (length bias).",
        "",
    ]
    for ev in result.models:
        for judge, errors in ev.errors.items():
            if errors:
                lines.append(f"- `{ev.name}`: " + JudgeScores(judge, ev.scores[judge], errors).error_summary())
    return "\n".join(lines) + "\n"
