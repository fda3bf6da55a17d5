"""`dpokit demo` without a model: the report, plots and console table from synthetic results, the
win rate, and the training config the demo builds. The pipeline itself: tests/integration/test_demo.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit.apps import report
from dpokit.apps.demo import DemoSettings, build_config
from dpokit.apps.report import DemoResult, StageResult
from dpokit.eval.scoring import win_rate
from tests.conftest import PRESETS

JUDGES = ["vader", "textblob"]


def synthetic_result(n: int = 5) -> DemoResult:
    """Results shaped like a real run's: base, mid, final with made-up numbers."""
    prompts = [f"Write a short review of film {i}." for i in range(n)]

    def stage(name: str, step: int, shift: float, kl: float, acc: float | None) -> StageResult:
        scores = {j: [round(0.1 * i - 0.2 + shift, 3) for i in range(n)] for j in JUDGES}
        return StageResult(
            name=name, step=step, scores={j: sum(v) / n for j, v in scores.items()},
            win_rate={j: 0.5 + shift for j in JUDGES}, kl=kl, kl_sem=kl / 10, mean_length=30.0 - 10 * shift,
            heldout_accuracy=acc, heldout_margin=None if acc is None else 2 * acc,
            responses=[f"{name} response {i} | with a pipe\nand a newline" for i in range(n)], response_scores=scores,
        )  # fmt: skip

    settings = {**vars(DemoSettings()), "examples": 3}
    cfg = build_config(DemoSettings(config=str(PRESETS / "demo.yaml")), Path("runs/x")).to_dict()
    return DemoResult(
        stages=[stage("base", 0, 0.0, 0.0, None), stage("mid", 20, 0.2, 3.5, 0.7), stage("final", 40, 0.3, 9.0, 0.8)],
        prompts=prompts, settings=settings, config=cfg, train_pairs=400, eval_pairs=100, steps=40,
        timings={"train": 300.0, "evaluate": 120.0, "total": 450.0}, machine="test",
    )  # fmt: skip


def synthetic_metrics(steps: int = 40) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for s in range(2, steps + 1, 2):
        rows.append({"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.05 * s, "rewards/accuracies": min(1.0, 0.5 + 0.01 * s),
                     "logps/chosen": -80.0 + 0.1 * s, "logps/rejected": -80.0 - 0.3 * s, "rewards/chosen": 0.01 * s,
                     "rewards/rejected": -0.04 * s})  # fmt: skip
        if s % 20 == 0:
            rows[-1].update({"eval/loss": 0.6, "eval/rewards/accuracies": 0.7 + s / 400, "eval/rewards/margins": 1.0,
                             "eval/logps/chosen": -70.0, "eval/logps/rejected": -75.0})  # fmt: skip
    return rows


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 0.7, -1.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert math.isnan(win_rate([], []))


def test_report_and_plots_written(tmp_path: Path) -> None:
    demo = synthetic_result()
    written = report.write_report(demo, synthetic_metrics(), tmp_path)
    for name in ("report", "curves", "score_vs_kl"):
        assert Path(written[name]).is_file(), name
    for png in ("training_curves.png", "score_vs_kl.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| final (step 40) |" in md.splitlines()[md.splitlines().index("## Before / after") + 2]
    assert "80%" in md and "0.800" in md  # final win rate and held-out accuracy
    assert "![Training curves](training_curves.png)" in md and "![Judge score vs KL](score_vs_kl.png)" in md
    assert "\\|" in md  # a pipe inside a response does not break the example table
    assert "| KL(policy \\|\\| base), nats/response |" in md  # nor the || of the KL row
    # JSON round trip: results.json can be re-rendered later
    again = DemoResult.from_json(json.loads(json.dumps(demo.to_json())))
    assert report.render_markdown(again, written) == md


def test_console_table_fits_one_screen() -> None:
    demo = synthetic_result()
    text = report.render_console(demo)
    lines = text.splitlines()
    assert len(lines) <= 50 and max(len(line) for line in lines) <= 120
    assert "win rate vs base, vader" in text and "held-out pair accuracy" in text
    assert text.count("prompt: ") == 3  # three examples, base | final side by side
    assert any(" | " in line and "[base vader" in line and "[final vader" in line for line in lines)


def test_example_indices_include_a_loss() -> None:
    demo = synthetic_result()
    final = demo.stages[-1].response_scores["vader"]
    final[4] = -1.0  # the final model does worse than base on prompt 4
    picked = report.example_indices(demo, 3)
    assert len(picked) == 3 and 4 in picked


def test_build_config_adds_midpoint_checkpoint(tmp_path: Path) -> None:
    cfg = build_config(DemoSettings(config=str(PRESETS / "demo.yaml"), overrides=["train.max_steps=10"]), tmp_path)
    assert cfg.train.save_every == 5 and cfg.train.eval_every == 5 and cfg.train.keep_checkpoints >= 2
    assert cfg.train.output_dir == str(tmp_path / "model") and cfg.lora.enabled
