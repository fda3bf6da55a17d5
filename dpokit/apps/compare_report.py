"""`dpokit compare`'s numbers -> verdict, markdown report and plots.

Pure functions of the measured points (`Point`: one checkpoint of one run, on the held-out prompts)
and of ``results.json``'s dictionary, so the frontier arithmetic, the verdict and the tables are
tested with hand-computed numbers and never need a model (tests/unit/test_compare.py). Plots use
matplotlib's Agg backend (files only).

The frontier of a method is the upper-left envelope of its checkpoints in (KL, gold) space: a
checkpoint is on it when no checkpoint of that method has at most its KL and a higher gold score.
Every frontier starts at the base policy (KL 0, the base's gold): every method starts from it. Two methods are compared by interpolating each frontier linearly at matched KLs, only where both
frontiers have points on both sides (the overlap of their KL ranges), never by extrapolating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# method key -> (label in tables and plots, matplotlib marker, colour); the order is the report's
METHODS: dict[str, tuple[str, str, str]] = {
    "dpo": ("DPO", "o", "tab:blue"),
    "sft": ("Preferred-FT", "s", "tab:green"),
    "ppo": ("PPO", "^", "tab:red"),
    "rloo": ("RLOO", "v", "tab:orange"),
    "bon": ("Best-of-N", "D", "tab:purple"),
}
GRID = 5  # matched KLs at which two frontiers are compared (evenly spaced over their overlap)


@dataclass
class Point:
    """One measured model: a checkpoint of a run (or a Best-of-N level, or the base model)."""

    method: str  # a METHODS key, or "base"
    run: str  # the stage folder, e.g. "dpo-beta0.1-s1"
    setting: str  # e.g. "beta=0.1"
    seed: int
    label: str  # "mid", "final", "n=4", "base"
    step: int
    kl: float | None  # nats, sequence-level KL(policy || base); Best-of-N: the analytic bound
    gold: float | None  # mean gold-judge score (VADER: labelled the pairs, the ground truth)
    heldout: float | None  # mean held-out judge score (TextBlob: labelled nothing)
    proxy: float | None  # mean reward-model score (what PPO / RLOO / Best-of-N optimise)
    kl_sem: float | None = None
    kl_bound: bool = False  # True when ``kl`` is an upper bound (Best-of-N), not an estimate
    mean_length: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # win rates etc.: kept in results.json

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Point:
        return cls(**d)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ---- frontier arithmetic ---------------------------------------------------------------------
def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (KL, gold) points no other point beats with at most the same KL, sorted by KL: gold
    strictly rises along it. Non-finite points are left out."""
    pts = sorted(((k, g) for k, g in points if math.isfinite(k) and math.isfinite(g)), key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float]] = []
    for kl, gold in pts:
        if not out or gold > out[-1][1]:
            out.append((kl, gold))
    return out


def interpolate(front: Sequence[tuple[float, float]], kl: float) -> float:
    """Gold on the frontier at ``kl`` by linear interpolation between its neighbouring points; ``kl``
    must lie within the frontier's KL range (no extrapolation)."""
    if not front or kl < front[0][0] or kl > front[-1][0]:
        raise ValueError(f"KL {kl} outside the frontier's range")
    for (k0, g0), (k1, g1) in zip(front, front[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return front[-1][1]  # a one-point frontier (kl equals its KL)


@dataclass
class FrontierComparison:
    """Method a against method b at matched KLs over the overlap of their frontiers' KL ranges."""

    a: str
    b: str
    verdict: str  # "above" (a's gold higher at every matched KL), "below", "crosses", "not comparable"
    lo: float | None = None  # the overlap [lo, hi], nats
    hi: float | None = None
    kls: list[float] = field(default_factory=list)
    diffs: list[float] = field(default_factory=list)  # gold(a) - gold(b) at each KL in ``kls``
    range_a: list[float] | None = None
    range_b: list[float] | None = None

    @property
    def mean_diff(self) -> float | None:
        return sum(self.diffs) / len(self.diffs) if self.diffs else None


def compare_frontiers(
    a: str, front_a: Sequence[tuple[float, float]], b: str, front_b: Sequence[tuple[float, float]], n: int = GRID
) -> FrontierComparison:
    """Gold(a) - gold(b) at ``n`` evenly spaced KLs of the overlap (one KL when the overlap is a
    point; without its lower end when both frontiers start at the same point, the base policy, where
    they are equal by construction); "not comparable" when a frontier is empty or the ranges do not overlap."""
    if not front_a or not front_b:
        return FrontierComparison(a, b, "not comparable")
    ra, rb = [front_a[0][0], front_a[-1][0]], [front_b[0][0], front_b[-1][0]]
    lo, hi = max(ra[0], rb[0]), min(ra[1], rb[1])
    if lo > hi:
        return FrontierComparison(a, b, "not comparable", range_a=ra, range_b=rb)
    kls = [lo] if hi == lo else [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    if front_a[0] == front_b[0] and hi > lo:  # both start at the base policy: equal there by construction
        kls = [lo + (hi - lo) * i / n for i in range(1, n + 1)]
    diffs = [interpolate(front_a, k) - interpolate(front_b, k) for k in kls]
    verdict = "above" if all(d > 0 for d in diffs) else "below" if all(d < 0 for d in diffs) else "crosses"
    return FrontierComparison(a, b, verdict, lo, hi, kls, diffs, ra, rb)


def method_points(points: Sequence[Point], method: str) -> list[Point]:
    return [p for p in points if p.method == method and _finite(p.kl) and _finite(p.gold)]


def method_frontier(points: Sequence[Point], method: str, base: Point | None = None) -> list[tuple[float, float]]:
    """A method's frontier over its checkpoints, starting at the base policy (KL 0, the base's gold): every
    method starts there, so every frontier is defined from KL 0 (the DPO paper's curves start at the SFT model)."""
    start = [(0.0, float(base.gold))] if base is not None and _finite(base.gold) else []
    return frontier(start + [(float(p.kl), float(p.gold)) for p in method_points(points, method)])


def best_within(points: Sequence[Point], budget: float | None = None) -> Point | None:
    """The point with the highest gold among those with KL <= ``budget`` (None: any KL); of equal golds,
    the one with the lowest KL (it got there at less cost)."""
    ok = [p for p in points if _finite(p.gold) and _finite(p.kl) and (budget is None or p.kl <= budget)]
    return max(ok, key=lambda p: (p.gold, -p.kl)) if ok else None


def auto_budget(points: Sequence[Point]) -> float | None:
    """The default KL budget: the smallest within which every method has a checkpoint (the largest of
    the methods' smallest KLs), so "best gold within the budget" never compares with an empty set."""
    lows = [min(float(p.kl) for p in pts) for m in METHODS if (pts := method_points(points, m))]
    return max(lows) if lows else None


def proxy_trend(points: Sequence[Point], base: Point | None) -> dict[str, Any] | None:
    """Does optimising the proxy stop helping gold? Along the method's points sorted by KL (the base
    first, at KL 0): where gold peaks, and what the proxy did after the peak."""
    pts = sorted([p for p in ([base] if base else []) + list(points) if _finite(p.kl) and _finite(p.gold)],
                 key=lambda p: p.kl)  # fmt: skip
    if len(pts) < 2:
        return None
    golds = [float(p.gold) for p in pts]
    peak = max(range(len(pts)), key=lambda i: (golds[i], i))  # ties: the later point (the gain held)
    last = pts[-1]
    out = {"peak_kl": pts[peak].kl, "peak_gold": pts[peak].gold, "peak_proxy": pts[peak].proxy, "last_kl": last.kl,
           "last_gold": last.gold, "last_proxy": last.proxy}  # fmt: skip
    if max(golds) == min(golds):
        out["verdict"] = "gold flat"
    elif peak == len(pts) - 1:
        out["verdict"] = "gold still rising"
    elif _finite(last.proxy) and _finite(pts[peak].proxy) and last.proxy > pts[peak].proxy:
        out["verdict"] = "proxy up, gold down"
    else:
        out["verdict"] = "both down"
    return out


def seed_spread(points: Sequence[Point]) -> list[dict[str, Any]]:
    """Per (method, setting) run with several seeds: the final checkpoint's gold and KL per seed
    and their spread (max - min). Best-of-N has no seeds of its own here."""
    finals: dict[tuple[str, str], dict[int, Point]] = {}
    for p in points:
        if p.label == "final" and _finite(p.gold):
            finals.setdefault((p.method, p.setting), {})[p.seed] = p
    out = []
    for (method, setting), by_seed in finals.items():
        if len(by_seed) < 2:
            continue
        golds = [float(p.gold) for p in by_seed.values()]
        kls = [float(p.kl) for p in by_seed.values() if _finite(p.kl)]
        out.append({"method": method, "setting": setting, "seeds": sorted(by_seed), "gold": golds,
                    "gold_spread": max(golds) - min(golds), "kl": kls,
                    "kl_spread": max(kls) - min(kls) if kls else None})  # fmt: skip
    return out


def analyse(points: Sequence[Point], base: Point | None, budget: float | None = None) -> dict[str, Any]:
    """Everything the verdict says, from the numbers: best gold per method (overall and within the
    KL budget), DPO's frontier against every other method's, the proxy trend of PPO and Best-of-N,
    and the seed spread. ``budget`` None: `auto_budget`."""
    chosen = budget if budget is not None else auto_budget(points)
    present = [m for m in METHODS if method_points(points, m)]
    best = {m: best_within(method_points(points, m)) for m in present}
    within = {m: best_within(method_points(points, m), chosen) for m in present}
    fronts = {m: method_frontier(points, m, base) for m in present}
    comparisons = [
        compare_frontiers("dpo", fronts["dpo"], m, fronts[m]) for m in present if m != "dpo" and "dpo" in fronts
    ]
    # Best-of-N's own n=1 is the base policy's sample: it starts there, not at the base's evaluation draw
    trends = {
        m: proxy_trend(method_points(points, m), None if m == "bon" else base) for m in ("ppo", "bon") if m in present
    }
    return {
        "kl_budget": chosen, "kl_budget_auto": budget is None,
        "best": {m: asdict(p) if p else None for m, p in best.items()},
        "best_within_budget": {m: asdict(p) if p else None for m, p in within.items()},
        "frontiers": {m: [list(x) for x in f] for m, f in fronts.items()},
        "comparisons": [{**asdict(c), "mean_diff": c.mean_diff} for c in comparisons],
        "proxy_trend": trends, "seed_spread": seed_spread(points),
    }  # fmt: skip


# ---- text -------------------------------------------------------------------------------------
def num(value: float | None, spec: str = "+.3f") -> str:
    return "n/a" if not _finite(value) else format(value, spec)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub table; ``align``: one character per column, "l" left, anything else right."""
    seps = [":---" if (align[i : i + 1] or "r") == "l" else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(seps) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if not _finite(value) else f"{value:,.0f} MB"


def _seconds(value: float | None) -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def method_rows(method: str, points: Sequence[Point], stages: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per run of ``method`` (per level for Best-of-N, whose levels share one sampling pass):
    the best checkpoint by gold, what the other judges and the KL say there, and what the run cost
    (training wall time, peak memory, models held, tokens generated)."""
    rows = []
    for st in stages:
        if st["method"] != method:
            continue
        run = [p for p in points if p.run == st["name"]]
        groups = [([p], p.setting) for p in run] if method == "bon" else [(run, st["setting"] or "-")]
        for pts, setting in groups:
            best = best_within(pts)
            rows.append([
                setting, str(st["seed"]), num(best.gold if best else None) + (f" ({best.label})" if best else ""),
                num(best.kl if best else None, ".2f") + (" (bound)" if best and best.kl_bound else ""),
                num(best.proxy if best else None), num(best.heldout if best else None), _seconds(st.get("wall_s")),
                _mb(st.get("peak_rss_mb")), str(st.get("models_in_memory", "n/a")), _tokens(st.get("generated_tokens")),
            ])  # fmt: skip
    return rows


METHOD_HEAD = ["setting", "seed", "best gold (VADER)", "its KL, nats", "proxy (RM) there", "TextBlob there",
               "training wall time", "peak RSS", "models in memory", "generated tokens"]  # fmt: skip


def _tokens(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"≈{value:,.0f}"


def comparison_sentence(c: dict[str, Any]) -> str:
    """One verdict line of a frontier comparison."""
    a, b = METHODS[c["a"]][0], METHODS[c["b"]][0]
    if c["verdict"] == "not comparable":
        ranges = ""
        if c.get("range_a") and c.get("range_b"):
            ra, rb = c["range_a"], c["range_b"]
            ranges = f": KL ranges [{ra[0]:.2f}, {ra[1]:.2f}] and [{rb[0]:.2f}, {rb[1]:.2f}] nats do not overlap"
        return f"{a} vs {b}: not comparable{ranges}."
    where = f"KL {c['lo']:.2f}" if c["lo"] == c["hi"] else f"KL [{c['lo']:.2f}, {c['hi']:.2f}] nats"
    diffs = ", ".join(f"{d:+.3f}" for d in c["diffs"])
    word = {"above": "lies above", "below": "lies below", "crosses": "crosses"}[c["verdict"]]
    return (f"{a}'s frontier {word} {b}'s over {where}: gold({a}) - gold({b}) = {diffs} at "
            f"{len(c['diffs'])} matched KL(s), mean {c['mean_diff']:+.3f}.")  # fmt: skip


def trend_sentence(method: str, t: dict[str, Any] | None) -> str:
    label = METHODS[method][0]
    if not t:
        return f"{label}: too few points to say."
    peak = f"gold peaked at {t['peak_gold']:+.3f} (KL {t['peak_kl']:.2f}, proxy {num(t['peak_proxy'])})"
    if t["verdict"] == "gold flat":
        return f"{label}: gold did not move ({t['last_gold']:+.3f}) up to KL {t['last_kl']:.2f}; proxy {num(t['last_proxy'])} there."
    if t["verdict"] == "gold still rising":
        return (f"{label}: gold still rising at the largest KL measured ({t['last_kl']:.2f}: gold {t['last_gold']:+.3f}, "
                f"proxy {num(t['last_proxy'])}); no sign that optimising the proxy stopped helping gold in this range.")  # fmt: skip
    after = f"then {t['last_gold']:+.3f} at KL {t['last_kl']:.2f}"
    if t["verdict"] == "proxy up, gold down":
        return f"{label}: {peak}, {after} while the proxy kept rising to {num(t['last_proxy'])}: optimising the proxy stopped helping gold."
    return f"{label}: {peak}, {after}; the proxy fell too ({num(t['last_proxy'])})."


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The verdict bullets, every number taken from ``results['analysis']``."""
    an = results["analysis"]
    lines = []
    rm = results.get("reward_model") or {}
    lines.append(f"- Reward model (the proxy): held-out pair accuracy {num(rm.get('accuracy'), '.3f')} "
                 f"on {rm.get('eval_pairs', 'n/a')} pairs.")  # fmt: skip
    how = "the smallest within which every method has a checkpoint" if an["kl_budget_auto"] else "set by --kl-budget"
    lines.append(f"- KL budget {num(an['kl_budget'], '.2f')} nats ({how}); best gold per method in the table below.")
    lines += [f"- {comparison_sentence(c)}" for c in an["comparisons"]]
    lines += [f"- {trend_sentence(m, t)}" for m, t in an["proxy_trend"].items()]
    for s in an["seed_spread"]:
        lines.append(f"- Seed spread, {METHODS[s['method']][0]} {s['setting']}: final gold "
                     f"{', '.join(f'{g:+.3f}' for g in s['gold'])} (spread {s['gold_spread']:.3f}), "
                     f"KL spread {num(s['kl_spread'], '.2f')} nats.")  # fmt: skip
    return lines


def best_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per method: the best gold within the KL budget and overall, with the run and KL where it was reached."""
    an = results["analysis"]
    rows = []
    for m, p in an["best_within_budget"].items():
        best = an["best"][m]
        inside = f"{p['gold']:+.3f} ({p['run']} {p['label']}, KL {p['kl']:.2f})" if p else "no checkpoint"
        rows.append(
            [METHODS[m][0], inside, f"{best['gold']:+.3f} ({best['run']} {best['label']}, KL {best['kl']:.2f})"]
        )
    return rows


def stage_rows(stages: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[st["name"], _seconds(st.get("wall_s")), _seconds(st.get("eval_s")), _mb(st.get("peak_rss_mb")),
             st.get("status", "")] for st in stages]  # fmt: skip


def render_doc(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The markdown report (docs/rlhf-vs-dpo.md): command, verdict, plots, one table per method,
    stage timings and how everything was measured."""
    points = [Point.from_json(p) for p in results["points"]]
    base = Point.from_json(results["base"]) if results.get("base") else None
    lines = [
        "# RLHF vs DPO on movie-review sentiment (the DPO paper's Figure 2, rebuilt small)", "",
        "Generated by (do not edit by hand; rerun the command, it resumes finished stages):", "",
        f"    {results['command']}", "",
        f"{results['finished']}; the stages took {results.get('stages_total_s', 0.0) / 60:.1f} min in all (training + "
        f"evaluation, whichever invocation ran them), this invocation {results['total_s'] / 60:.1f} min. "
        f"{results['machine']}.", "",
        *setup_lines(results), "", "## Verdict (computed from the numbers below)", "", *verdict_lines(results), "",
        markdown_table(["method", f"best gold at KL <= {num(results['analysis']['kl_budget'], '.2f')}", "best gold overall"],
                       best_rows(results), "l"), "",
    ]  # fmt: skip
    if base:
        lines += [f"Base model: gold {num(base.gold)}, TextBlob {num(base.heldout)}, proxy {num(base.proxy)}.", ""]
    for key, title in (("frontier", "Gold reward vs KL"), ("proxy", "Proxy vs gold vs TextBlob as KL grows")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    for m, (label, _, _) in METHODS.items():
        if any(s["method"] == m for s in results["stages"]):
            lines += [
                f"## {label}",
                "",
                markdown_table(METHOD_HEAD, method_rows(m, points, results["stages"]), "ll"),
                "",
            ]
    lines += ["## Stages", "", markdown_table(["stage", "training", "evaluation", "peak RSS", "status"],
                                              stage_rows(results["stages"]), "l"), ""]  # fmt: skip
    lines += ["## How it was measured", "", *method_notes(results), ""]
    return "\n".join(lines)


def setup_lines(results: dict[str, Any]) -> list[str]:
    st = results["settings"]
    return [
        f"Policy `{st['model']}` (LoRA), preference pairs `{st['pairs']}`; *gold* is the VADER judge, which labelled "
        f"the shipped review pairs and plays the paper's ground-truth reward. Every model samples the same {st['n_prompts']} held-out prompts "
        f"(`{st['eval_prompts']}`) with the same seed ({st['seed']}), temperature {st['temperature']}, top-p "
        f"{st['top_p']}, at most {st['max_new_tokens']} new tokens; *TextBlob* labelled nothing (a check for learning "
        f"VADER's quirks); *proxy* is the learned reward model, which PPO, RLOO and Best-of-N optimise. "
        f"Runs: {st['runs']}.",
    ]


def method_notes(results: dict[str, Any]) -> list[str]:
    floor = results.get("runtime_floor_mb")
    floor_text = f" (a child that loads nothing: {_mb(floor)})" if floor else ""
    return [
        "- *KL*: sequence-level KL(policy || base), the mean over the held-out samples of sum_t log pi - log ref "
        "(k1 estimator; the reference is the base model, i.e. the LoRA adapters switched off); unbiased because "
        "the samples come from the policy at temperature 1, top-p 1. Best-of-N's KL is log n - (n-1)/n, an upper "
        "bound (Beirami et al. 2024), so its points may sit further right than they are.",
        "- *Frontier*: per method, the base policy (KL 0, where every method starts) and the checkpoints no other "
        "checkpoint of that method beats at lower or equal KL; two frontiers are compared by linear interpolation at "
        f"{GRID} evenly spaced KLs of the overlap of their KL ranges (no extrapolation; KL 0, where both equal the base, "
        "left out); *above* means higher gold at every matched KL.",
        "- *Training wall time* and *peak RSS*: each training stage (and Best-of-N's sampling and selection) runs in "
        "its own child process, forked from a server that imported torch, transformers and dpokit once "
        "(`multiprocessing` forkserver; the parent's models are not in it); the wall time is the child's, from fork "
        "to exit, and the peak RSS its `VmHWM` (the high-water mark of its resident memory, read from "
        f"/proc/self/status as it ends), which includes the imported runtime{floor_text}. Evaluation runs in the "
        "parent and is timed apart. Best-of-N's wall time covers all its levels (one sampling pass).",
        "- *Models in memory*: models held during training. DPO: 1 (LoRA; the reference is the same model with "
        "the adapters off); Preferred-FT: 1; reward model: 1; PPO: 3 (policy, value model, reward model; reference "
        "= adapters off); RLOO: 2 (policy, reward model); Best-of-N: 2 (policy, reward model).",
        "- *Generated tokens*: tokens sampled while training (RL rollouts) or selecting (Best-of-N, estimated as "
        "N x prompts x the mean length of the first sample per prompt); DPO and Preferred-FT generate nothing.",
        "- *Proxy, gold and TextBlob there*: the judges' mean scores at the run's best-gold checkpoint.",
    ]


# ---- plots ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(points: Sequence[Point], base: Point | None, path: Path) -> Path:
    """Gold vs KL: every checkpoint, one marker and colour per method, a run's points joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    labelled: set[str] = set()
    for run in dict.fromkeys(p.run for p in points):
        pts = sorted([p for p in points if p.run == run and _finite(p.kl) and _finite(p.gold)], key=lambda p: p.step)
        if not pts or pts[0].method not in METHODS:
            continue
        label, marker, colour = METHODS[pts[0].method]
        ax.plot([p.kl for p in pts], [p.gold for p in pts], marker=marker, color=colour, alpha=0.8,
                fillstyle="none" if pts[0].kl_bound else "full",
                label=None if label in labelled else label + (" (KL bound)" if pts[0].kl_bound else ""))  # fmt: skip
        labelled.add(label)
    if base and _finite(base.gold):
        ax.plot([0.0], [base.gold], marker="*", color="black", markersize=12, linestyle="none", label="base")
    ax.set_xlabel("KL(policy || base), nats")
    ax.set_ylabel("gold reward (mean VADER score)")
    ax.set_title("Gold reward vs KL (DPO paper Fig. 2 left, rebuilt)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_proxy(
    points: Sequence[Point], base: Point | None, path: Path, methods: Sequence[str] = ("ppo", "bon")
) -> Path:
    """Per method: gold and TextBlob (left axis) and the proxy (right axis, reward-model units)
    against KL, the method's checkpoints sorted by KL with the base at KL 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    for ax, m in zip(axes[0], methods):
        start = [base] if base and m != "bon" else []  # Best-of-N starts at its own n=1 (the base policy)
        pts = sorted(start + method_points(points, m), key=lambda p: p.kl)
        kls = [p.kl for p in pts]
        ax.plot(kls, [p.gold for p in pts], "o-", color="tab:blue", label="gold (VADER)")
        ax.plot(kls, [p.heldout for p in pts], "s--", color="tab:green", label="TextBlob")
        right = ax.twinx()
        right.plot(kls, [p.proxy for p in pts], "^:", color="tab:red", label="proxy (reward model)")
        right.set_ylabel("proxy (reward model score)", color="tab:red")
        bound = m == "bon"
        ax.set_xlabel("KL, nats" + (" (upper bound)" if bound else ""))
        ax.set_ylabel("mean judge score")
        ax.set_title(f"{METHODS[m][0]}: proxy vs gold vs TextBlob")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        extra = right.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
