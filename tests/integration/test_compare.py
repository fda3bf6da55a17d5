"""`dpokit compare --quick`: every stage of the RLHF-vs-DPO comparison on the tiny random Llama (reward
model, DPO x 3 betas, Preferred-FT, PPO x 2, RLOO, Best-of-N), the report, results.json and plots, and
that a second call reuses every finished stage. The arithmetic and the report from synthetic numbers:
tests/unit/test_compare.py. The full run (SmolLM2-135M-Instruct, ~75 min on 2 CPU cores) writes
docs/rlhf-vs-dpo.md: `dpokit compare`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from dpokit.apps.compare import main
from dpokit.apps.compare_report import METHODS


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_compare_quick_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("textblob")
    pytest.importorskip("matplotlib")
    out, doc = tmp_path / "compare", tmp_path / "docs" / "rlhf-vs-dpo.md"
    assert main(["--quick", "--out", str(out), "--doc", str(doc)]) == 0
    first = capsys.readouterr().err
    assert "floor: ran in" in first and "bon: ran in" in first and "skipped" not in first

    res = json.loads((out / "results.json").read_text())
    points = res["points"]
    assert {p["method"] for p in points} == set(METHODS)  # every method was measured
    for p in [res["base"], *points]:
        for key in ("kl", "gold", "heldout", "proxy"):
            assert _finite(p[key]), (p["run"], p["label"], key)
    assert {p["label"] for p in points if p["method"] != "bon"} == {"step 1", "final"}
    assert [p["label"] for p in points if p["method"] == "bon"] == ["n=1", "n=4", "n=16"]
    assert res["base"]["kl"] == 0.0
    assert any(p["kl"] != 0.0 for p in points if p["method"] in ("ppo", "rloo"))  # RL moved the policy
    assert 0.0 <= res["reward_model"]["accuracy"] <= 1.0
    for st in res["stages"]:
        if st["method"] not in ("base",):
            assert _finite(st["wall_s"]) and st["peak_rss_mb"] > 50, st["name"]
    tokens = {st["method"]: st["generated_tokens"] for st in res["stages"] if st["method"] in METHODS}
    assert tokens["dpo"] == tokens["sft"] == 0 and tokens["ppo"] > 0 and tokens["rloo"] > 0 and tokens["bon"] > 0
    assert {"kl_budget", "comparisons", "proxy_trend", "best"} <= set(res["analysis"])

    text = doc.read_text()
    assert "dpokit compare --quick --out" in text and "## Verdict" in text
    for label, _, _ in METHODS.values():
        assert f"## {label}" in text
    for png in ("rlhf-vs-dpo-frontier.png", "rlhf-vs-dpo-proxy.png"):
        assert (doc.parent / png).stat().st_size > 0 and f"]({png})" in text
    assert (out / "report.md").is_file() and (out / "frontier.png").is_file() and (out / "proxy.png").is_file()

    # a rerun trains and evaluates nothing: every stage is finished (run_complete.json + eval.json)
    start = time.perf_counter()
    assert main(["--quick", "--out", str(out), "--no-doc"]) == 0
    again = capsys.readouterr().err
    stage_lines = [line for line in again.splitlines() if line.startswith("[compare ") and "] " in line]
    assert stage_lines and all("finished earlier, skipped" in line for line in stage_lines), again
    assert time.perf_counter() - start < 30
    assert json.loads((out / "results.json").read_text())["points"] == points

    # other evaluation settings: every checkpoint is measured again, nothing is trained again; Best-of-N,
    # whose sampling of the evaluation prompts is the stage, samples again
    assert main(["--quick", "--out", str(out), "--no-doc", "--n-prompts", "4"]) == 0
    third = capsys.readouterr().err
    ran = [line.split("] ", 1)[1].split(":", 1)[0] for line in third.splitlines() if ": ran in" in line]
    assert ran == ["bon"], third
    assert "dpo-beta0.1: evaluated in" in third and "ppo-kl0.05: evaluated in" in third
    assert json.loads((out / "results.json").read_text())["settings"]["n_prompts"] == 4
