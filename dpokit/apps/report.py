"""The demo's report: a one-screen before/after table, ``report.md`` and PNG plots.

Pure functions of a `DemoResult` (defined here; `dpokit.apps.demo` fills it) and the training's ``metrics.jsonl`` rows, so they
are tested with synthetic numbers and never need a model. Plots use matplotlib's Agg backend
(files only, no display).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """Measurements of one model (base, midpoint or final) on the held-out prompts."""

    name: str
    step: int
    scores: dict[str, float]  # judge -> mean score over the responses
    win_rate: dict[str, float]  # judge -> share of prompts beating the base response (ties 1/2); base: 0.5
    kl: float  # mean over samples of sum_t log pi - log ref (0 for the base model)
    kl_sem: float  # standard error of that mean
    mean_length: float  # tokens, EOS not counted
    heldout_accuracy: float | None  # implicit-reward accuracy on held-out pairs (None: base, undefined)
    heldout_margin: float | None
    responses: list[str]
    response_scores: dict[str, list[float]]
    # judge -> bootstrap 95% interval of the win rate (None for the base model); absent in older results.json
    win_interval: dict[str, list[float] | None] | None = None
    length_corr: dict[str, float | None] | None = None  # judge -> correlation of score with response length


@dataclass
class DemoResult:
    """Everything the report is written from (also saved as results.json)."""

    stages: list[StageResult]
    prompts: list[str]
    settings: dict[str, Any]
    config: dict[str, Any]
    train_pairs: int
    eval_pairs: int
    steps: int
    timings: dict[str, float]
    machine: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DemoResult:
        stages = [StageResult(**s) for s in d["stages"]]
        return cls(**{**d, "stages": stages})


CURVES = (  # (metrics.jsonl key, panel title) of the training-curve plot
    ("loss", "DPO loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/chosen", "log-prob of responses"),
)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def summary_rows(demo: DemoResult) -> list[list[str]]:
    """The before/after table: one row per measurement, one column per model (base, mid, final)."""
    j1, j2 = demo.settings["judge"], demo.settings["second_judge"]
    stages = demo.stages
    rows = [
        ["", *[f"{s.name} (step {s.step})" for s in stages]],
        [f"mean {j1} score (labelled the pairs)", *[_fmt(s.scores[j1], "+.3f") for s in stages]],
        [f"mean {j2} score (held-out judge)", *[_fmt(s.scores[j2], "+.3f") for s in stages]],
        [f"win rate vs base, {j1} [95% CI]", *["—" if i == 0 else _win(s, j1) for i, s in enumerate(stages)]],
        [f"win rate vs base, {j2} [95% CI]", *["—" if i == 0 else _win(s, j2) for i, s in enumerate(stages)]],
        ["KL(policy || base), nats/response", *[f"{s.kl:.2f} ± {s.kl_sem:.2f}" if i else "0" for i, s in enumerate(stages)]],
        ["mean response length, tokens", *[f"{s.mean_length:.1f}" for s in stages]],
        [f"corr({j1} score, length)", *[_fmt((s.length_corr or {}).get(j1), "+.2f") for s in stages]],
        ["held-out pair accuracy (implicit reward)", *[_fmt(s.heldout_accuracy, ".3f") if i else "—" for i, s in enumerate(stages)]],
    ]  # fmt: skip
    return rows


def _win(stage: StageResult, judge: str) -> str:
    """"62% [54, 70]": the win rate and, when measured, its bootstrap interval."""
    text = _fmt(100 * stage.win_rate[judge], ".0f") + "%"
    ci = (stage.win_interval or {}).get(judge)
    return text + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _table_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table_markdown(rows: list[list[str]]) -> str:
    # a literal | (as in "KL(policy || base)") would end the cell
    head, *body = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if c == 0 else "---:" for c in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def example_indices(demo: DemoResult, n: int) -> list[int]:
    """Prompts to show: the biggest judge gains of the final model over the base, then the first
    prompt where it lost (so the examples are not only the flattering ones)."""
    if not demo.stages or n <= 0:
        return []
    j = demo.settings["judge"]
    base, final = demo.stages[0].response_scores[j], demo.stages[-1].response_scores[j]
    gains = sorted(range(len(base)), key=lambda i: final[i] - base[i], reverse=True)
    picked = gains[: max(0, n - 1)]
    losses = [i for i in range(len(base)) if final[i] < base[i] and i not in picked]
    picked.append(losses[0] if losses else gains[min(n - 1, len(gains) - 1)])
    return list(dict.fromkeys(picked))[:n]


def render_console(demo: DemoResult, width: int = 118) -> str:
    """The one-screen summary printed at the end of `dpokit demo`."""
    j = demo.settings["judge"]
    base, final = demo.stages[0], demo.stages[-1]
    parts = [
        "",
        f"DPO demo: {demo.config['model']['name_or_path']}, LoRA r={demo.config['lora']['r']}, "
        f"beta={demo.config['loss']['beta']}, {demo.steps} steps on {demo.train_pairs} pairs; "
        f"{len(demo.prompts)} held-out prompts; {demo.timings.get('total', 0) / 60:.1f} min",
        "",
        _table_text(summary_rows(demo)),
        "",
    ]
    col = (width - 3) // 2
    for i in example_indices(demo, int(demo.settings.get("examples", 3))):
        parts.append(textwrap.shorten(f"prompt: {demo.prompts[i]}", width))
        left = textwrap.wrap(f"[base {j} {base.response_scores[j][i]:+.2f}] {base.responses[i]}", col)[:4]
        right = textwrap.wrap(f"[final {j} {final.response_scores[j][i]:+.2f}] {final.responses[i]}", col)[:4]
        for k in range(max(len(left), len(right))):
            a = left[k] if k < len(left) else ""
            b = right[k] if k < len(right) else ""
            parts.append(f"{a.ljust(col)} | {b}")
        parts.append("")
    return "\n".join(parts)


# ---- plots ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display and never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss, reward margin, reward accuracy and chosen/rejected log-probs against the step;
    held-out (eval/...) values as markers on the same panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    for ax, (key, title) in zip(axes.flat, CURVES):
        keys = [key, "logps/rejected"] if key == "logps/chosen" else [key]
        for k in keys:
            label = k.split("/")[-1] if len(keys) > 1 else "train"
            ax.plot([r["step"] for r in train if k in r], [r[k] for r in train if k in r], marker=".", label=label)
            held = [r for r in evals if f"eval/{k}" in r]
            if held:
                ax.plot([r["step"] for r in held], [r[f"eval/{k}"] for r in held], "o--",
                        label=f"held-out {label}" if len(keys) > 1 else "held-out")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DPO training (metrics.jsonl)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_vs_kl(stages: list[StageResult], judges: list[str], path: Path) -> Path:
    """Mean judge score against KL(policy || reference) for each evaluated model: the frontier
    the DPO paper plots (reward gained per nat of divergence)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [s.kl for s in stages]
    for k, (judge, marker) in enumerate(zip(judges, ("o", "s"))):
        ys = [s.scores[judge] for s in stages]
        ax.plot(xs, ys, marker=marker, label=judge)
        if k == 0:  # one label per model; both judges share its x (the KL)
            for i, (s, x, y) in enumerate(zip(stages, xs, ys)):
                ax.annotate(f"{s.name} (step {s.step})", (x, y), textcoords="offset points",
                            xytext=(-10, 8 + 10 * (i % 2)), fontsize=8, ha="right" if i else "left")  # fmt: skip
    ax.errorbar(xs, [s.scores[judges[0]] for s in stages], xerr=[s.kl_sem for s in stages], fmt="none", ecolor="gray")
    ax.set_xlabel("KL(policy || base), nats per response (sampled estimate)")
    ax.set_ylabel("mean sentiment score on held-out prompts")
    ax.set_title("judge score vs KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- report.md --------------------------------------------------------------------------------
def render_markdown(demo: DemoResult, plots: dict[str, str]) -> str:
    s, cfg = demo.settings, demo.config
    j1, j2 = s["judge"], s["second_judge"]
    base, final = demo.stages[0], demo.stages[-1]
    t, lo, lora, d = cfg["train"], cfg["loss"], cfg["lora"], cfg["data"]
    lines = [
        "# dpokit demo: DPO towards positive movie reviews",
        "",
        f"Model `{cfg['model']['name_or_path']}` trained with LoRA DPO (r={lora['r']}, alpha={lora['alpha']}) on "
        f"{demo.train_pairs} preference pairs the model sampled itself and `{j1}` labelled; `{j2}` labelled nothing "
        "and checks whether the model learned sentiment rather than the labeller's quirks. Neither judge is in the loss.",
        "",
        f"Training: {demo.steps} steps x {t['micro_batch_size'] * t['grad_accum_steps']} pairs, lr {t['lr']:g} "
        f"({t['scheduler']}, {t['warmup_steps']} warm-up steps), beta {lo['beta']}, loss `{lo['type']}`, "
        f"max_length {d['max_length']}, mixed precision `{t['mixed_precision']}`.",
        f"Evaluation: one response per prompt for {len(demo.prompts)} held-out prompts from each model, temperature "
        f"{s['temperature']}, top-p {s['top_p']}, {s['max_new_tokens']} new tokens at most, seed {s['seed']} for every "
        f"model; held-out accuracy over {demo.eval_pairs} held-out pairs.",
        "",
        "## Before / after",
        "",
        _table_markdown(summary_rows(demo)),
        "",
        "*Win rate*: share of prompts where the model's response scores higher than the base model's response to the "
        "same prompt (ties count half), with a percentile bootstrap 95% interval over prompts (1000 resamples, seed 0). "
        "*corr*: Pearson correlation of the judge's score with the response length (a length bias shows here). "
        "*KL*: mean over the samples of the summed per-token log-ratio "
        "log pi - log ref of the sampled tokens (the base model with the adapters off is the reference). The samples "
        f"are drawn at temperature {s['temperature']} / top-p {s['top_p']}, so this is the log-ratio under the "
        "sampling distribution, a close proxy of KL(pi || ref) rather than an unbiased estimate. "
        "*Held-out accuracy*: share of held-out pairs whose implicit reward beta log pi/ref ranks the judge's "
        "choice first (undefined for the base model, whose implicit reward is 0).",
        "",
        "## Plots",
        "",
    ]
    for title, name in (("Training curves", "curves"), ("Judge score vs KL", "score_vs_kl")):
        if name in plots:
            lines += [f"![{title}]({Path(plots[name]).name})", ""]
    lines += ["## Examples", ""]
    for i in example_indices(demo, int(s.get("examples", 3))):
        lines += [
            f"**Prompt:** {demo.prompts[i]}",
            "",
            "| | response | " + j1 + " | " + j2 + " |",
            "|---|---|---:|---:|",
        ]
        for stage in (base, final):
            text = stage.responses[i].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {stage.name} | {text} | {stage.response_scores[j1][i]:+.2f} | {stage.response_scores[j2][i]:+.2f} |"
            )
        lines.append("")
    lines += [
        "## Timings",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.0f} |" for k, v in demo.timings.items()],
        "",
        f"Machine: {demo.machine}.",
        "",
    ]
    return "\n".join(lines)


def write_report(demo: DemoResult, rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, str]:
    """Write the plots and report.md into ``out_dir``; returns {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if rows:
        written["curves"] = str(plot_training_curves(rows, out / "training_curves.png"))
    judges = [demo.settings["judge"], demo.settings["second_judge"]]
    written["score_vs_kl"] = str(plot_score_vs_kl(demo.stages, judges, out / "score_vs_kl.png"))
    path = out / "report.md"
    path.write_text(render_markdown(demo, written), encoding="utf-8")
    written["report"] = str(path)
    return written
