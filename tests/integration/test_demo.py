"""`dpokit demo`: the pipeline end to end on the tiny random llama, and (slow) the real demo on
SmolLM2-135M-Instruct. The report, win rate and config without a model: tests/unit/test_demo_report.py.

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
from dpokit.apps.demo import DemoSettings, build_config
from dpokit.apps.report import DemoResult
from tests.conftest import PRESETS, REVIEWS

REPO = Path(__file__).resolve().parents[2]
JUDGES = ["vader", "textblob"]


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
        # measured by `dpokit evaluate --prompts`'s code: a bootstrap interval around the win rate
        lo, hi = s.win_interval["vader"]
        assert 0 <= lo <= s.win_rate["vader"] <= hi <= 1 and set(s.length_corr) == set(JUDGES)
    assert base.win_interval == {"vader": None, "textblob": None}
    assert final.kl != 0.0  # lr 1e-3 moved the adapters: the policy differs from the reference

    # The final adapter (saved by peft) and the last checkpoint (saved by the trainer) hold the same
    # LoRA weights, and the demo's two loading paths must put exactly those into the model.
    import torch

    from dpokit.apps.demo import load_lora_model, load_stage_weights
    from dpokit.training import checkpoint as ckpt

    cfg = build_config(DemoSettings(config=str(PRESETS / "demo.yaml"), quick=True,
                                    overrides=["model.name_or_path=tiny-random-llama", "train.max_steps=4"]), out)  # fmt: skip
    model, _ = load_lora_model("tiny-random-llama", cfg)
    saved = ckpt.load_checkpoint(out / "model" / "checkpoints" / ckpt.folder_name(4)).weights
    load_stage_weights(model, out / "model", 4, final=True)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad}.keys() == saved.keys()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), saved[name], msg=name)
    load_stage_weights(model, out / "model", 2, final=False)  # the midpoint differs from the end
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
