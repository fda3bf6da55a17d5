"""Noisy labels, measured: DPO, cDPO, robust DPO and IPO when a share of the preference labels is wrong.

    python bench/noise.py [--out runs/noise] [--flips 0,0.1,0.2,0.4] [--steps 30] [--doc docs/label-noise.md]

The demo's review pairs (builtin:reviews/pairs.jsonl, labelled by the vader judge: the true labels)
get a seeded random share of their labels flipped (chosen and rejected swapped). On each flip level
this trains, from SmolLM2-135M-Instruct with the demo preset's LoRA set-up and fewer steps:

    dpo     sigmoid loss, label_smoothing 0
    cdpo    conservative DPO: sigmoid, label_smoothing = the flip rate (the rate is known here)
    robust  robust DPO (Chowdhury et al. 2024): unbiased under flips at that rate
    ipo     IPO, which the paper motivates as less prone to over-fit deterministic preferences

and measures (a) the implicit reward's accuracy on the 120 held-out pairs with their TRUE labels, and
(b) the vader judge's win rate of the trained model's responses against the base model's on the same
held-out prompts (same sampling seed for all). At 0% flips cDPO and robust DPO are plain DPO
(label_smoothing 0), so they are not run again. The reference log-probs are precomputed once per
flip level and shared by its runs through the reference cache (`reference.precompute`).

Writes OUT/results.jsonl (one row per run, appended as runs finish: a killed study resumes and skips
the runs it has), OUT/label-noise.png, and the markdown report to --doc.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from dpokit import resources
from dpokit.apps import demo
from dpokit.config import Config
from dpokit.data.files import read_prompts
from dpokit.eval.judges import load_judge
from dpokit.models import sources
from dpokit.training.loop import train

TRAIN = "builtin:reviews/pairs.jsonl"
METHODS = {  # name -> (loss.type, label_smoothing = flip rate?)
    "dpo": ("sigmoid", False),
    "cdpo": ("sigmoid", True),
    "robust": ("robust", True),
    "ipo": ("ipo", False),
}


def flipped_file(out: Path, rate: float, seed: int) -> tuple[Path, int]:
    """The training pairs with round(rate * N) labels swapped (a seeded choice); (path, flips)."""
    lines = [ln for ln in resources.resolve_builtin(TRAIN).read_text(encoding="utf-8").splitlines() if ln.strip()]
    k = round(rate * len(lines))
    chosen_rows = set(random.Random(seed).sample(range(len(lines)), k))
    rows = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        if i in chosen_rows:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        rows.append(json.dumps(row))
    path = out / f"flip-{int(rate * 100):02d}" / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, k


def run_config(args: argparse.Namespace, data: Path, method: str, rate: float, out_dir: Path) -> Config:
    loss_type, smooth = METHODS[method]
    cfg = Config.from_preset("demo")
    return cfg.override([
        f"data.train_files=[{data}]", f"loss.type={loss_type}", f"loss.label_smoothing={rate if smooth else 0.0}",
        f"train.max_steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.output_dir={out_dir}", "train.overwrite=true", "train.resume=no", "train.save_every=0",
        "train.eval_every=0", "train.progress_bar=false", f"train.log_every={max(1, args.steps // 5)}",
        "reference.precompute=true", f"reference.cache_dir={args.out / 'refcache'}",
    ]).validate()  # fmt: skip


def final_eval(out_dir: Path) -> dict[str, Any]:
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    return evals[-1] if evals else {}


def runs_to_do(flips: list[float]) -> list[tuple[float, str]]:
    """Every (flip rate, method); at 0% flips only the methods whose loss differs from DPO's."""
    return [(r, m) for r in flips for m in METHODS if r > 0 or not METHODS[m][1]]


def study(args: argparse.Namespace) -> list[dict[str, Any]]:
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done = [json.loads(ln) for ln in results_path.read_text().splitlines()] if results_path.is_file() else []
    have = {(r["flip"], r["method"]) for r in done}
    settings = demo.DemoSettings(n_prompts=args.n_prompts)
    prompts = read_prompts(settings.eval_prompts)[: settings.n_prompts]
    base_cfg = Config.from_preset("demo")
    sources.materialize_gguf(base_cfg.model.name_or_path, log=print)
    model, tokenizer = demo.load_lora_model(base_cfg.model.name_or_path, base_cfg)
    judges = [load_judge(settings.judge)]
    t0 = time.perf_counter()
    _, base = demo.measure_stage("base", 0, model, tokenizer, prompts, settings, None, {}, judges)
    print(f"[noise] base model sampled and judged in {time.perf_counter() - t0:.0f} s", flush=True)
    files = {r: flipped_file(args.out, r, args.seed) for r in args.flips}
    for rate, method in runs_to_do(args.flips):
        if (rate, method) in have:
            continue
        t0 = time.perf_counter()
        out_dir = args.out / f"flip-{int(rate * 100):02d}" / method
        train(run_config(args, files[rate][0], method, rate, out_dir))
        t_train = time.perf_counter() - t0
        heldout = final_eval(out_dir)
        demo.load_stage_weights(model, out_dir, args.steps, final=True)
        stage, _ = demo.measure_stage(method, args.steps, model, tokenizer, prompts, settings, base, heldout, judges)
        row = {"flip": rate, "method": method, "flipped_pairs": files[rate][1], "steps": args.steps,
               "heldout_accuracy": stage.heldout_accuracy, "heldout_margin": stage.heldout_margin,
               "win_rate": stage.win_rate[settings.judge], "win_interval": stage.win_interval[settings.judge],
               "judge_score": stage.scores[settings.judge], "kl": stage.kl,
               "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(f"[noise] {json.dumps(row)}", flush=True)
        with results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
    return done


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = sorted((r["flip"], r) for r in _with_zero(rows, method))
        if not pts:
            continue
        xs = [100 * f for f, _ in pts]
        axes[0].plot(xs, [r["heldout_accuracy"] for _, r in pts], marker="o", label=method)
        axes[1].plot(xs, [r["win_rate"] for _, r in pts], marker="o", label=method)
    axes[0].set(xlabel="labels flipped (%)", ylabel="held-out accuracy (true labels)", title="implicit reward accuracy")
    axes[1].set(xlabel="labels flipped (%)", ylabel="win rate vs base (vader)", title="judged responses")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_zero(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """The method's rows; cDPO and robust DPO take plain DPO's row at 0% flips (the same loss)."""
    own = [r for r in rows if r["method"] == method]
    if METHODS[method][1]:
        own += [r for r in rows if r["method"] == "dpo" and r["flip"] == 0]
    return own


def render(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float, png: str) -> str:
    flips = sorted({r["flip"] for r in rows})
    head = "| method | " + " | ".join(f"{100 * f:.0f}% flipped" for f in flips) + " |"
    lines = ["## Held-out accuracy against the true labels (120 pairs)", "", head, "|---|" + "---|" * len(flips)]
    win = [f"## Vader win rate against the base model ({args.n_prompts} held-out prompts)", "", head,
           "|---|" + "---|" * len(flips)]  # fmt: skip
    kl = ["## KL(policy || base) per response, nats, from the same samples (the price of the win rate)", "", head,
          "|---|" + "---|" * len(flips)]  # fmt: skip
    for method in METHODS:
        by_flip = {r["flip"]: r for r in _with_zero(rows, method)}
        lines.append(f"| {method} | " + " | ".join(_cell(by_flip.get(f), "heldout_accuracy") for f in flips) + " |")
        win.append(f"| {method} | " + " | ".join(_cell(by_flip.get(f), "win_rate") for f in flips) + " |")
        kl.append(f"| {method} | " + " | ".join(_cell(by_flip.get(f), "kl", ".1f") for f in flips) + " |")
    train_s, runs_s = sum(r["train_s"] for r in rows), sum(r["total_s"] for r in rows)
    return "\n".join([
        "# Label noise: DPO, cDPO, robust DPO and IPO with flipped preference labels", "",
        f"Generated by `python bench/noise.py --steps {args.steps} --n-prompts {args.n_prompts}` "
        f"on {platform.machine()}, {torch.get_num_threads()} torch threads: {len(rows)} runs took {runs_s / 60:.0f} min "
        f"({train_s / 60:.0f} min training, the rest sampling and judging)"
        + (f"; the study's last invocation {wall / 60:.0f} min wall (a resumed study skips the runs it has)" if wall else "")
        + ". Each run: SmolLM2-135M-Instruct, the demo preset's LoRA "
        f"(r 16, all linears), bf16 autocast, beta 0.1, {args.steps} steps x 8 pairs from the 477 review pairs "
        f"with the given share of labels swapped (seed {args.seed}); cDPO and robust DPO use label_smoothing = the flip rate.",
        "", *lines, "", *win, "", *kl, "", f"![held-out accuracy and win rate against the flip rate]({png})", "",
        "## What the numbers say (computed from the tables)", "", *findings(rows, args), "",
    ])  # fmt: skip


def findings(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Plain statements read off the results: DPO's loss of accuracy with noise, the best method per
    level, and how large a win-rate difference has to be before it is more than sampling noise."""
    out = []
    dpo = {r["flip"]: r for r in rows if r["method"] == "dpo"}
    if len(dpo) > 1:
        lo, hi = min(dpo), max(dpo)
        out.append(f"- Plain DPO's held-out accuracy goes from {dpo[lo]['heldout_accuracy']:.3f} at {100 * lo:.0f}% "
                   f"flipped labels to {dpo[hi]['heldout_accuracy']:.3f} at {100 * hi:.0f}%; its win rate from "
                   f"{dpo[lo]['win_rate']:.3f} to {dpo[hi]['win_rate']:.3f}.")  # fmt: skip
    for flip in sorted({r["flip"] for r in rows if r["flip"] > 0}):
        level = [r for r in rows if r["flip"] == flip]
        acc = max(level, key=lambda r: r["heldout_accuracy"])
        win = max(level, key=lambda r: r["win_rate"])
        spread = max(r["heldout_accuracy"] for r in level) - min(r["heldout_accuracy"] for r in level)
        out.append(f"- {100 * flip:.0f}% flipped: best held-out accuracy {acc['method']} ({acc['heldout_accuracy']:.3f}; "
                   f"the four methods span {spread:.3f}, i.e. {spread * 120:.0f} of 120 pairs); best win rate "
                   f"{win['method']} ({win['win_rate']:.3f} at KL {win['kl']:.1f}; plain DPO's KL here "
                   f"{dpo[flip]['kl']:.1f}).")  # fmt: skip
    ipo = [r["kl"] for r in rows if r["method"] == "ipo"]
    if ipo:
        out.append(f"- IPO regresses the length-normalised log-ratio margin towards 1/(2 beta) = 5 at beta 0.1: it moves "
                   f"the policy much further (KL {min(ipo):.0f}-{max(ipo):.0f} nats) than the sigmoid losses, so its "
                   "win rates are bought at another KL and compare with theirs only through the KL table.")  # fmt: skip
    out.append("- A held-out accuracy over 120 pairs has a standard error of about 0.04 (at 0.6-0.7), so most "
               "differences between methods at one flip level are within two standard errors.")
    half = 1.96 * 0.5 / args.n_prompts**0.5
    out.append(f"- With {args.n_prompts} prompts a win rate's 95% interval is about +-{half:.2f}: win-rate differences "
               "smaller than that are not evidence of a difference. One seed per cell: a study of one flip draw.")
    return out


def _cell(row: dict[str, Any] | None, key: str, fmt: str = ".3f") -> str:
    if row is None or row.get(key) is None:
        return "-"
    return format(row[key], fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/noise"))
    p.add_argument("--flips", default="0,0.1,0.2,0.4", help="comma-separated shares of labels to flip")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (8 pairs each)")
    p.add_argument("--n-prompts", type=int, default=48, help="held-out prompts sampled per model for the win rate")
    p.add_argument("--seed", type=int, default=0, help="which labels are flipped")
    p.add_argument("--doc", type=Path, default=Path("docs/label-noise.md"))
    p.add_argument("--report-only", action="store_true", help="only re-render the doc and plot from OUT/results.jsonl")
    args = p.parse_args()
    args.flips = [float(x) for x in args.flips.split(",")]
    wall = time.perf_counter()
    if args.report_only:  # re-render from OUT/results.jsonl: no model, no runs
        rows = [json.loads(ln) for ln in (args.out / "results.jsonl").read_text().splitlines() if ln.strip()]
    else:
        rows = study(args)
    png = args.doc.with_suffix(".png")
    plot(rows, png)
    wall_s = 0.0 if args.report_only else time.perf_counter() - wall
    args.doc.write_text(render(rows, args, wall_s, png.name), encoding="utf-8")
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
