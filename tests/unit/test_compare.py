"""`dpokit compare` without a model: the frontier arithmetic and the verdict with hand-computed numbers,
the tables and the report from synthetic results, and the plan the pipeline runs. The pipeline
itself: tests/integration/test_compare.py."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from dpokit.apps import compare as C
from dpokit.apps import compare_report as R
from dpokit.apps.compare_report import Point
from dpokit.config import Config


def _p(method: str, run: str, label: str, kl: float, gold: float, proxy: float = 0.0, seed: int = 1,
       setting: str = "x", step: int = 1) -> Point:  # fmt: skip
    return Point(method, run, setting, seed, label, step, kl, gold, gold / 2, proxy, kl_bound=method == "bon")


# ---- frontier arithmetic ---------------------------------------------------------------------
def test_frontier_keeps_the_upper_left_envelope() -> None:
    pts = [(3.0, 0.7), (1.0, 0.3), (0.0, 0.0), (2.0, 0.4), (1.0, 0.5), (4.0, math.nan)]
    # (1, 0.3) loses to (1, 0.5) at the same KL; (2, 0.4) to (1, 0.5) at a lower KL; NaN is left out
    assert R.frontier(pts) == [(0.0, 0.0), (1.0, 0.5), (3.0, 0.7)]


def test_interpolate_is_linear_between_neighbours_and_never_extrapolates() -> None:
    front = [(0.0, 0.0), (2.0, 0.4), (4.0, 0.5)]
    assert R.interpolate(front, 1.0) == pytest.approx(0.2)
    assert R.interpolate(front, 3.0) == pytest.approx(0.45)
    assert R.interpolate(front, 4.0) == pytest.approx(0.5)
    assert R.interpolate([(2.0, 0.1)], 2.0) == 0.1  # a one-point frontier at its own KL
    with pytest.raises(ValueError):
        R.interpolate(front, 4.5)


def test_compare_frontiers_at_matched_kls_over_the_overlap() -> None:
    a = [(0.0, 0.0), (2.0, 0.4), (4.0, 0.5)]
    b = [(1.0, 0.1), (3.0, 0.3), (5.0, 0.6)]
    c = R.compare_frontiers("dpo", a, "ppo", b)
    # overlap [1, 4], 5 KLs 1, 1.75, 2.5, 3.25, 4: a = .2 .35 .425 .4625 .5; b = .1 .175 .25 .3375 .45
    assert (c.lo, c.hi) == (1.0, 4.0) and c.kls == [1.0, 1.75, 2.5, 3.25, 4.0]
    assert c.diffs == pytest.approx([0.1, 0.175, 0.175, 0.125, 0.05])
    assert c.verdict == "above" and c.mean_diff == pytest.approx(0.125)
    assert R.compare_frontiers("ppo", b, "dpo", a).verdict == "below"


def test_compare_frontiers_crossing_disjoint_and_single_point() -> None:
    crossing = R.compare_frontiers("dpo", [(0.0, 0.0), (4.0, 0.4)], "ppo", [(0.0, 0.1), (4.0, 0.3)])
    assert crossing.verdict == "crosses" and crossing.diffs[0] == pytest.approx(-0.1)
    assert crossing.diffs[-1] == pytest.approx(0.1)
    apart = R.compare_frontiers("dpo", [(0.0, 0.0), (1.0, 1.0)], "ppo", [(2.0, 0.0), (3.0, 1.0)])
    assert apart.verdict == "not comparable" and apart.range_a == [0.0, 1.0] and apart.range_b == [2.0, 3.0]
    assert R.compare_frontiers("dpo", [], "ppo", [(1.0, 1.0)]).verdict == "not comparable"
    touch = R.compare_frontiers("dpo", [(0.0, 0.0), (2.0, 0.2)], "ppo", [(2.0, 0.1), (3.0, 0.5)])
    assert touch.kls == [2.0] and touch.diffs == pytest.approx([0.1]) and touch.verdict == "above"


def test_best_within_budget_and_the_automatic_budget() -> None:
    pts = [_p("dpo", "d", "mid", 1.0, 0.2), _p("dpo", "d", "final", 5.0, 0.6),
           _p("ppo", "p", "mid", 2.0, 0.3), _p("ppo", "p", "final", 3.0, 0.1)]  # fmt: skip
    assert R.best_within(pts).gold == 0.6
    assert R.best_within(pts, 2.0).gold == 0.3
    assert R.best_within(pts, 0.5) is None
    # every method has a checkpoint within 2.0 (ppo's smallest KL), not within less
    assert R.auto_budget(pts) == 2.0


def test_proxy_trend_verdicts() -> None:
    base = _p("base", "base", "base", 0.0, 0.0, proxy=0.0)
    rising = [_p("ppo", "p", "mid", 1.0, 0.2, 1.0), _p("ppo", "p", "final", 2.0, 0.3, 2.0)]
    assert R.proxy_trend(rising, base)["verdict"] == "gold still rising"
    over = [_p("ppo", "p", "mid", 1.0, 0.4, 1.0), _p("ppo", "p", "final", 2.0, 0.1, 3.0)]
    t = R.proxy_trend(over, base)
    assert t is not None and t["verdict"] == "proxy up, gold down" and (t["peak_kl"], t["peak_gold"]) == (1.0, 0.4)
    both = [_p("ppo", "p", "mid", 1.0, 0.4, 2.0), _p("ppo", "p", "final", 2.0, 0.1, 1.0)]
    assert R.proxy_trend(both, base)["verdict"] == "both down"
    flat = [_p("ppo", "p", "final", 1.0, 0.0, 1.0)]
    assert R.proxy_trend(flat, base)["verdict"] == "gold flat"
    assert R.proxy_trend([], None) is None


def test_seed_spread_of_final_checkpoints() -> None:
    pts = [_p("dpo", "d", "final", 2.0, 0.5, setting="beta=0.1"), _p("dpo", "d2", "final", 3.0, 0.3, seed=2, setting="beta=0.1"),
           _p("dpo", "d", "mid", 1.0, 0.9, setting="beta=0.1"), _p("sft", "s", "final", 1.0, 0.2)]  # fmt: skip
    (spread,) = R.seed_spread(pts)  # sft has one seed: no spread
    assert spread["seeds"] == [1, 2] and spread["gold_spread"] == pytest.approx(0.2) and spread["kl_spread"] == 1.0


# ---- tables and the report ----------------------------------------------------------------------
def test_markdown_table_alignment_and_pipes() -> None:
    text = R.markdown_table(["a", "b"], [["x|y", "1"]], "l")
    assert text.splitlines() == ["| a | b |", "| :--- | ---: |", "| x\\|y | 1 |"]


STAGES = [
    {"name": "dpo-beta0.1", "method": "dpo", "setting": "beta=0.1", "seed": 1, "wall_s": 290.0, "peak_rss_mb": 1234.4,
     "models_in_memory": 1, "generated_tokens": 0, "eval_s": 70.0, "status": "ran"},
    {"name": "ppo-kl0.05", "method": "ppo", "setting": "kl=0.05", "seed": 1, "wall_s": 900.0, "peak_rss_mb": 2000.0,
     "models_in_memory": 3, "generated_tokens": 20000, "eval_s": 70.0, "status": "reused"},
    {"name": "bon", "method": "bon", "setting": "N=1,4", "seed": 1, "wall_s": 100.0, "peak_rss_mb": 1500.0,
     "models_in_memory": 2, "generated_tokens": 1234.6, "eval_s": 0.0, "status": "ran"},
]  # fmt: skip
POINTS = [
    _p("dpo", "dpo-beta0.1", "mid", 2.0, 0.3, 0.5), _p("dpo", "dpo-beta0.1", "final", 4.0, 0.5, 0.8),
    _p("ppo", "ppo-kl0.05", "mid", 1.0, 0.1, 1.0), _p("ppo", "ppo-kl0.05", "final", 3.0, 0.2, 2.0),
    _p("bon", "bon", "n=1", 0.0, 0.0, 0.1), _p("bon", "bon", "n=4", math.log(4) - 0.75, 0.15, 0.9),
]  # fmt: skip


def test_method_rows() -> None:
    (dpo,) = R.method_rows("dpo", POINTS, STAGES)
    assert dpo == ["beta=0.1", "1", "+0.500 (final)", "4.00", "+0.800", "+0.250", "4.8 min", "1,234 MB", "1", "0"]
    (ppo,) = R.method_rows("ppo", POINTS, STAGES)
    assert ppo[2:4] == ["+0.200 (final)", "3.00"] and ppo[6] == "15.0 min" and ppo[9] == "20,000"
    bon = R.method_rows("bon", POINTS, STAGES)  # one row per level, the cost of the one pass on each
    assert [r[0] for r in bon] == ["x", "x"] and bon[1][3] == "0.64 (bound)" and bon[1][9] == "≈1,235"


def _results() -> dict[str, Any]:
    base = _p("base", "base", "base", 0.0, 0.0, 0.0)
    settings = {"model": "m", "pairs": "p.jsonl", "n_prompts": 4, "eval_prompts": "e.jsonl", "seed": 0,
                "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "runs": "DPO and PPO"}  # fmt: skip
    return {
        "command": "dpokit compare --out x", "finished": "today", "total_s": 120.0, "machine": "test machine",
        "settings": settings, "reward_model": {"accuracy": 0.75, "eval_pairs": 120}, "runtime_floor_mb": 400.0,
        "base": asdict(base), "points": [asdict(p) for p in POINTS], "stages": STAGES,
        "analysis": R.analyse(POINTS, base, None),
    }  # fmt: skip


def test_analysis_and_verdict_lines_are_computed_from_the_numbers() -> None:
    res = _results()
    an = res["analysis"]
    assert an["kl_budget"] == 2.0 and an["kl_budget_auto"]  # dpo's smallest KL; ppo and bon reach lower
    assert an["best_within_budget"]["ppo"]["gold"] == 0.1 and an["best"]["dpo"]["gold"] == 0.5
    by_pair = {(c["a"], c["b"]): c for c in an["comparisons"]}
    # every frontier starts at the base (0, 0): dpo (0, 0) (2, .3) (4, .5); ppo (0, 0) (1, .1) (3, .2). Overlap [0, 3],
    # the shared origin left out: KL .6 1.2 1.8 2.4 3: dpo .09 .18 .27 .34 .4, ppo .06 .11 .14 .17 .2
    assert by_pair["dpo", "ppo"]["verdict"] == "above"
    assert by_pair["dpo", "ppo"]["diffs"] == pytest.approx([0.03, 0.07, 0.13, 0.17, 0.2])
    # bon (0, 0) (log 4 - .75 = .636, .15): slope .236 per nat against dpo's .15 over [0, .636]
    assert by_pair["dpo", "bon"]["verdict"] == "below"
    text = "\n".join(R.verdict_lines(res))
    assert "held-out pair accuracy 0.750 on 120 pairs" in text
    assert "DPO's frontier lies above PPO's over KL [0.00, 3.00] nats" in text and "mean +0.120" in text
    assert "DPO's frontier lies below Best-of-N's over KL [0.00, 0.64] nats" in text
    assert "PPO: gold still rising" in text and "- KL budget 2.00 nats (the smallest within which" in text
    assert R.best_rows(res) == [
        ["DPO", "+0.300 (dpo-beta0.1 mid, KL 2.00)", "+0.500 (dpo-beta0.1 final, KL 4.00)"],
        ["PPO", "+0.100 (ppo-kl0.05 mid, KL 1.00)", "+0.200 (ppo-kl0.05 final, KL 3.00)"],
        ["Best-of-N", "+0.150 (bon n=4, KL 0.64)", "+0.150 (bon n=4, KL 0.64)"],
    ]


def test_render_doc_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res = json.loads(json.dumps(_results()))  # what results.json holds
    points = [Point.from_json(p) for p in res["points"]]
    base = Point.from_json(res["base"])
    assert R.plot_frontier(points, base, tmp_path / "f.png").stat().st_size > 0
    assert R.plot_proxy(points, base, tmp_path / "p.png").stat().st_size > 0
    doc = R.render_doc(res, {"frontier": "f.png", "proxy": "p.png"})
    for expected in ("    dpokit compare --out x", "## Verdict", "![Gold reward vs KL](f.png)", "## DPO", "## PPO",
                     "## Best-of-N", "## Stages", "| ppo-kl0.05 | 15.0 min | 70 s | 2,000 MB | reused |", "400 MB"):  # fmt: skip
        assert expected in doc, expected


# ---- the plan ---------------------------------------------------------------------------------
def test_plan_of_the_full_run(tmp_path: Path) -> None:
    profile = C.QUICK  # the presets of the tiny run exist in every checkout; the shape is the full run's
    plan = C.build_plan(profile, C.CompareSettings(seeds=2), tmp_path)
    names = [s.name for s in plan]
    assert names[:7] == ["dpo-beta0.05", "dpo-beta0.1", "dpo-beta0.5", "sft", "ppo-kl0.05", "ppo-kl0.2", "rloo-kl0.05"]
    assert names[7] == "bon" and names[8] == "dpo-beta0.05-s2" and len(plan) == 16
    dpo, ppo, rloo = plan[0], plan[4], plan[6]
    assert "loss.beta=0.05" in dpo.overrides and f"train.save_every={profile.dpo_steps // 2}" in dpo.overrides
    assert "train.resume=auto" in dpo.overrides and "lora.enabled=true" in dpo.overrides
    assert f"rl.reward=rm:{tmp_path / 'reward'}" in ppo.overrides and "rl.algorithm=ppo" in ppo.overrides
    assert (
        "rl.samples_per_prompt=2" in rloo.overrides
        and f"rl.prompts_per_step={profile.rl_prompts // 2}" in rloo.overrides
    )
    assert [s.models_in_memory for s in (dpo, plan[3], ppo, rloo, plan[7])] == [1, 1, 3, 2, 2]
    seeds = {s.name: next(o for o in s.overrides if o.startswith("train.seed=")) for s in plan if s.kind == "dpo"}
    assert seeds["dpo-beta0.05"] != seeds["dpo-beta0.05-s2"]
    assert plan[15].extra["sampling_seed"] == plan[7].extra["sampling_seed"] + 1
    for stage in plan:  # every training config is valid
        if stage.kind != "bon":
            Config.from_preset(stage.preset).override(stage.overrides).validate()


def test_command_line_names_what_differs_from_the_defaults() -> None:
    assert C.command_line(C.CompareSettings(doc=C.DEFAULT_DOC)) == "dpokit compare"
    assert C.command_line(C.CompareSettings(quick=True, out="o", seeds=2)) == "dpokit compare --quick --out o --seeds 2"
    assert C.command_line(C.CompareSettings(doc=None)) == "dpokit compare --no-doc"


def test_generated_tokens_and_reward_accuracy_from_metrics(tmp_path: Path) -> None:
    rows = [
        {"step": 2, "response_length": 10.0},
        {"step": 3, "response_length": 4.5},
        {"step": 3, "eval/reward/accuracy": 0.8},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # rows log the mean over the steps since the previous row: 10 x 16 x 2 steps + 4.5 x 16 x 1 step
    assert C.rl_generated_tokens(tmp_path, 16) == 392
    assert C.reward_accuracy(tmp_path) == 0.8
    assert C.rl_generated_tokens(tmp_path / "missing", 16) is None
