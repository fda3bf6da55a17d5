"""`dpokit demo`: the report from synthetic results, the pipeline end to end on the tiny random
llama, and (slow) the real demo on SmolLM2-135M-Instruct.

The real demo (~10 min on a quiet 2-core CPU):

    python -m pytest --runslow tests/integration/test_demo.py -k real
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpokit.apps import report
from dpokit.apps.demo import DemoSettings, build_config, win_rate
from dpokit.apps.report import DemoResult, StageResult
from tests.conftest import PRESETS, REVIEWS

REPO = Path(__file__).resolve().parents[2]
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


# ---- end to end --------------------------------------------------------------------------------
def _write_pairs(path: Path, prompts: list[str]) -> Path:
    good = ["a wonderful film, great acting and a beautiful ending", "I love this movie, amazing and fun"]
    bad = ["a boring film with awful acting", "terrible plot, I hate the dull ending"]
    with path.open("w") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": good[i % 2]}],
                   "rejected": [{"role": "assistant", "content": bad[i % 2]}]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from a second thread, and on a busy machine two threads that wait
    for each other make it several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("textblob")
    pytest.importorskip("matplotlib")
    from dpokit.cli import main
    from dpokit.data.files import read_prompts

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    review = read_prompts(REVIEWS / "train_prompts.jsonl")[:16]
    train = _write_pairs(tmp_path / "pairs.jsonl", review)
    held = _write_pairs(tmp_path / "eval_pairs.jsonl", read_prompts(REVIEWS / "eval_prompts.jsonl")[:12])
    out = tmp_path / "run"
    code = main([
        "demo", "--quick", "--out", str(out), "--config", str(PRESETS / "demo.yaml"),
        "--eval-prompts", str(REVIEWS / "eval_prompts.jsonl"),
        "model.name_or_path=tiny-random-llama", f"data.train_files=[{train}]", f"data.eval_files=[{held}]",
        "train.progress_bar=false",
    ])  # fmt: skip
    assert code == 0
    for name in ("report.md", "training_curves.png", "score_vs_kl.png", "results.json", "model/metrics.jsonl",
                 "model/adapter_model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    res = DemoResult.from_json(json.loads((out / "results.json").read_text()))
    assert [s.name for s in res.stages] == ["base", "mid", "final"] and [s.step for s in res.stages] == [0, 2, 4]
    assert res.eval_pairs == 8  # --quick evaluates a subset of the held-out pairs
    base, mid, final = res.stages
    assert base.kl == 0.0 and base.heldout_accuracy is None
    for s in (mid, final):
        assert len(s.responses) == len(res.prompts) == 6
        assert math.isfinite(s.kl) and s.heldout_accuracy is not None and 0 <= s.heldout_accuracy <= 1
        assert 0 <= s.win_rate["vader"] <= 1 and set(s.scores) == set(JUDGES)
    assert final.kl != 0.0  # lr 1e-3 moved the adapters: the policy differs from the reference

    # The final adapter (saved by peft) and the last checkpoint (saved by the trainer) hold the same
    # LoRA weights, and the demo's two loading paths must put exactly those into the model.
    import torch

    from dpokit.apps.demo import _load_lora_model, _load_stage_weights
    from dpokit.train import checkpoint as ckpt

    cfg = build_config(DemoSettings(config=str(PRESETS / "demo.yaml"), quick=True,
                                    overrides=["model.name_or_path=tiny-random-llama", "train.max_steps=4"]), out)  # fmt: skip
    model, _ = _load_lora_model("tiny-random-llama", cfg)
    saved = ckpt.load_checkpoint(out / "model" / "checkpoints" / ckpt.folder_name(4)).weights
    _load_stage_weights(model, out / "model", 4, final=True)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad}.keys() == saved.keys()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), saved[name], msg=name)
    _load_stage_weights(model, out / "model", 2, final=False)  # the midpoint differs from the end
    assert any(not torch.equal(p.detach(), saved[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_demo_real(tmp_path: Path) -> None:
    """The documented demo, in full: `dpokit demo` on SmolLM2-135M-Instruct (CPU, ~10 min)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dpokit", "demo", "--out", str(out), "train.progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = DemoResult.from_json(json.loads((out / "results.json").read_text()))
    final = res.stages[-1]
    assert final.win_rate["vader"] > 0.6, report.render_console(res)
    assert final.heldout_accuracy is not None and final.heldout_accuracy > 0.65
    assert final.kl > 0
    assert "win rate vs base" in proc.stdout
