"""DPO's implicit reward against an explicit reward model trained on the same pairs ("Your language
model is secretly a reward model", Rafailov et al. 2023). Writes docs/implicit-vs-explicit.md.

    python bench/implicit_vs_explicit.py                       # trains both (~15 min on 2 CPU cores), then scores
    python bench/implicit_vs_explicit.py --dpo runs/demo/model --rm runs/reward-reviews   # score existing runs only

1. the demo's DPO model: `dpokit train --preset demo` (LoRA DPO of SmolLM2-135M-Instruct, 40 steps on
   builtin:reviews/pairs.jsonl, beta 0.1); its implicit reward is beta * (log pi - log ref), ref = the base;
2. a reward model on the same pairs: `dpokit reward --preset reward-reviews` (the same base and LoRA
   shape with a score head, Bradley-Terry loss, one epoch);
3. `dpokit score` on the held-out pairs (builtin:reviews/eval_pairs.jsonl, never trained on) and on the
   training pairs, with both and with the two lexicon judges (vader labelled the pairs, textblob did not).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/implicit_vs_explicit.py`: make `bench` and `dpokit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

HELD_OUT = "builtin:reviews/eval_pairs.jsonl"
TRAIN = "builtin:reviews/pairs.jsonl"


def train_if_missing(kind: str, folder: Path, preset: str, extra: list[str]) -> str:
    """Run `dpokit train|reward --preset P` into ``folder`` unless a finished run is there; how long it took."""
    done = folder / "run_complete.json"
    if done.is_file():
        print(f"[ive] using the finished {kind} run in {folder}", flush=True)
        return f"an earlier run (finished {json.loads(done.read_text()).get('finished', '?')})"
    cmd = [sys.executable, "-m", "dpokit", kind, "--preset", preset, f"train.output_dir={folder}",
           "train.overwrite=true", "train.progress_bar=false", *extra]  # fmt: skip
    print("[ive] " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=common.REPO)
    return f"{time.perf_counter() - start:.0f} s"


def score_pairs(data: str, dpo: Path, rm: Path) -> dict[str, Any]:
    """`dpokit score` of ``data`` with the implicit reward, the reward model and both judges."""
    from dpokit.config import Config
    from dpokit.eval.score import score

    cfg = Config.from_preset("demo").override(["train.eval_batch_size=16"])  # beta 0.1, max_length 128: training's
    result = score([data], cfg, model=str(dpo), scorers=[f"rm:{rm}", "vader", "textblob"])
    return {"summary": result.summary, "margins": {name: _margins(sides) for name, sides in result.scores.items()}}


def _margins(sides: dict[str, Any]) -> list[float | None]:
    return [None if c is None or r is None else c - r for c, r in zip(sides["chosen"].scores, sides["rejected"].scores)]


def accuracy_cell(margins: list[float | None]) -> str:
    from dpokit.eval.scoring import bootstrap_interval

    correct = [1.0 if m > 0 else 0.0 for m in margins if m is not None]
    lo, hi = bootstrap_interval(correct, n_boot=2000, seed=0)
    return f"{sum(correct) / len(correct):.3f} [{lo:.2f}, {hi:.2f}]"


def logged_eval(dpo: Path) -> str:
    """What the DPO run itself logged on the held-out pairs at its last step (under its bf16 autocast)."""
    path = dpo / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    if not evals:
        return ""
    r = evals[-1]
    return (f"The DPO run's own evaluation of the same held-out pairs at step {r['step']} (metrics.jsonl, bf16 autocast "
            f"as in training; the table is fp32): accuracy {r['eval/rewards/accuracies']:.3f}, margin "
            f"{r['eval/rewards/margins']:+.3f}.")  # fmt: skip


def render(args: argparse.Namespace, held: dict[str, Any], train: dict[str, Any], timings: dict[str, str]) -> str:
    from dpokit.eval.scoring import correlation

    rm = f"rm:{args.rm}"
    names = {"implicit": "DPO implicit reward, beta (log pi - log ref)", rm: "reward model (Bradley-Terry)",
             "vader": "vader (labelled the pairs)", "textblob": "textblob (labelled nothing)"}  # fmt: skip
    hm, tm = held["margins"], train["margins"]

    def agree(a: str, b: str) -> str:
        both = [(x, y) for x, y in zip(hm[a], hm[b]) if x is not None and y is not None]
        return f"{sum((x > 0) == (y > 0) for x, y in both) / len(both):.3f}" if both else "n/a"

    def corr(a: str, b: str) -> str:
        both = [(x, y) for x, y in zip(hm[a], hm[b]) if x is not None and y is not None]
        c = correlation([x for x, _ in both], [y for _, y in both])
        return "n/a" if c is None else f"{c:+.2f}"

    rows = []
    for key, label in names.items():
        s = held["summary"]["scorers"][key]
        rows.append(f"| {label} | {accuracy_cell(hm[key])} | {s['mean_margin']:+.3f} | {accuracy_cell(tm[key])} | "
                    f"{agree(key, 'implicit')} | {corr(key, 'implicit')} | {corr(key, 'vader')} |")  # fmt: skip
    env = common.environment("cpu")
    n_held, n_train = held["summary"]["rows"], train["summary"]["rows"]
    cmd = "python bench/implicit_vs_explicit.py" + ("" if args.trained else f" --dpo {args.dpo} --rm {args.rm}")
    return "\n".join([
        "# DPO's implicit reward vs an explicit reward model",
        "",
        "Generated by (do not edit by hand; rerun the command):",
        "",
        f"    {cmd}",
        "",
        f"{dt.datetime.now():%Y-%m-%d %H:%M}. CPU ({env['cpu']}, {env['cpu_count']} cores), torch {env['torch']}, "
        f"transformers {env['transformers']}. Time: {', '.join(f'{k} {v}' for k, v in timings.items())}.",
        "",
        f"Both models start from SmolLM2-135M-Instruct and see the same {n_train} training pairs "
        f"(`{TRAIN}`: the model's own samples, the more positive by VADER chosen): the DPO policy is the demo's "
        f"(`dpokit train --preset demo`, LoRA, 40 steps, beta 0.1; model `{args.dpo}`), the reward model "
        f"`dpokit reward --preset reward-reviews` (LoRA + score head, Bradley-Terry, one epoch; model `{args.rm}`). "
        f"Scored with `dpokit score` on the {n_held} held-out pairs (`{HELD_OUT}`) and on the training pairs.",
        "",
        "| scorer | held-out accuracy [95% CI] | held-out mean margin | training-pair accuracy [95% CI] | held-out: same "
        "preference as the implicit reward | held-out: margin correlation with the implicit reward | held-out: margin "
        "correlation with vader |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        logged_eval(Path(args.dpo)),
        "",
        "*Accuracy*: share of pairs whose chosen response scores strictly above the rejected one (interval: "
        "percentile bootstrap over pairs, 2000 resamples, seed 0). vader's accuracy is 1 by construction (it chose "
        "the pairs, with a score gap of at least 0.2). *Margin*: chosen minus rejected score, in each scorer's own "
        "units (the implicit reward in nats times beta; the reward model's logit; the lexicon scores in [-1, 1]), "
        "so margins compare within a row, correlations across rows.",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dpo", default="runs/ive/dpo", help="the demo's DPO output (trained here when not finished)")
    p.add_argument("--rm", default="runs/ive/rm", help="the reward model output (trained here when not finished)")
    p.add_argument("--out", default="docs/implicit-vs-explicit.md")
    args = p.parse_args(argv)
    args.trained = args.dpo == p.get_default("dpo") and args.rm == p.get_default("rm")
    timings = {
        "DPO training": train_if_missing("train", Path(args.dpo), "demo", []),
        "reward model training": train_if_missing("reward", Path(args.rm), "reward-reviews", []),
    }
    start = time.perf_counter()
    held = score_pairs(HELD_OUT, Path(args.dpo), Path(args.rm))
    train = score_pairs(TRAIN, Path(args.dpo), Path(args.rm))
    timings["scoring"] = f"{time.perf_counter() - start:.0f} s"
    text = render(args, held, train, timings)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
