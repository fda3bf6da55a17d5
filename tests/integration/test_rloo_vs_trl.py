"""The RLOO benchmark (bench/rloo_vs_trl.py) end to end at 3 steps: dpokit's `train_rl` (rl.algorithm=rloo)
and TRL's `RLOOTrainer` each train the tiny random Llama on the toy reward in their own worker process, and
both report a finite reward for every step, a step time and a peak RSS; the report is written.

Slow (~40 s on 2 CPU cores: two worker processes, each importing torch, transformers and TRL).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.mark.slow
def test_rloo_vs_trl_three_steps(tmp_path: Path) -> None:
    out, raw = tmp_path / "report.md", tmp_path / "runs.json"
    cmd = [sys.executable, str(REPO / "bench" / "rloo_vs_trl.py"), "--steps", str(STEPS), "--seeds", "0",
           "--out", str(out), "--json", str(raw), "--run-root", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = json.loads(raw.read_text(encoding="utf-8"))["runs"]
    assert sorted(r["tool"] for r in runs) == ["dpokit", "trl"]
    for run in runs:
        result = run["result"]
        assert result["ok"], result
        assert len(result["reward"]) == STEPS, (run["tool"], result["reward"])
        assert all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in result["reward"]), (run["tool"], result["reward"])
        assert len(result["step_s"]) == STEPS and all(s > 0 for s in result["step_s"])
        assert result["peak_rss"] > 0
        assert math.isfinite(run["summary"]["reward_last"])

    text = out.read_text(encoding="utf-8")
    assert "| dpokit | 1 |" in text and "| trl | 1 |" in text
    assert ".venv/bin/python bench/rloo_vs_trl.py" in text
