"""Best-of-N (dpokit/apps/bon.py) without a model: the analytic KL bound by hand, and the selection
on hand-made samples with fake judges (nested subsets, ties, failed rows, skipped prompts, one
judge call per distinct kept response), the outputs and the command's argument checks."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dpokit.apps.bon import (
    add_bon_arguments,
    bon_command,
    bon_kl,
    bon_levels,
    bon_table,
    check_ns,
    parse_ns,
    pick_best,
    write_outputs,
)
from dpokit.errors import DpokitError
from dpokit.eval.judges import JudgeScores, RowJudge
from dpokit.eval.sampling import Sample


# ---- the analytic KL bound --------------------------------------------------------------------
def test_bon_kl_by_hand() -> None:
    assert bon_kl(1) == 0.0  # log 1 - 0/1
    assert bon_kl(2) == pytest.approx(0.6931471805599453 - 0.5)  # log 2 - 1/2
    assert bon_kl(4) == pytest.approx(0.636294361119890)  # log 4 - 3/4 = 1.386294361119891 - 0.75
    assert bon_kl(16) == pytest.approx(1.835088722239781)  # log 16 - 15/16 = 2.772588722239781 - 0.9375
    assert all(bon_kl(n) < bon_kl(n + 1) for n in range(1, 64))  # more samples, further from the policy


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "4"])
def test_bon_kl_refuses_non_positive_integers(bad: object) -> None:
    with pytest.raises(DpokitError, match="positive integer"):
        bon_kl(bad)  # type: ignore[arg-type]


# ---- levels -----------------------------------------------------------------------------------
def test_parse_ns_sorts_and_drops_repeats() -> None:
    assert parse_ns("16,1,4,4") == [1, 4, 16]
    assert parse_ns(" 2 , 8") == [2, 8]
    assert check_ns([3, 1, 3]) == [1, 3]


@pytest.mark.parametrize("text", ["0", "1,-2", "a", "1.5", "", "1,,4"])
def test_parse_ns_refuses_bad_values(text: str) -> None:
    with pytest.raises(DpokitError, match="--n: .* is not a positive integer"):
        parse_ns(text)


@pytest.mark.parametrize("ns", [[], [0, 1], [True], [1.0]])
def test_check_ns_refuses_bad_levels(ns: list[object]) -> None:
    with pytest.raises(DpokitError, match="positive integers"):
        check_ns(ns)  # type: ignore[arg-type]


# ---- selection --------------------------------------------------------------------------------
def test_pick_best_ties_and_failed_rows() -> None:
    assert pick_best([0.1, 0.5, 0.5, 0.2]) == 1  # a tie goes to the lowest index
    assert pick_best([None, -2.0, None, -1.0]) == 3  # negative rewards are fine; failed rows never win
    assert pick_best([None, None]) is None
    assert pick_best([]) is None


def _sample(text: str, n_tokens: int) -> Sample:
    return Sample(prompt_ids=[1, 2], response_ids=list(range(3, 3 + n_tokens)) + [0], text=text, finished=True)


# REWARDS[i][j]: the reward of sample j of prompt i (None: the reward judge fails on it)
REWARDS: list[list[float | None]] = [
    [0.1, 0.5, 0.5, 0.9],  # winners by n: 0, 1, 1 (tie, lowest index), 3
    [None, 0.2, None, 0.2],  # skipped at n=1 (its only sample failed); then 1, 1, 1 (tie)
    [None, None, None, None],  # never scored: skipped at every n
]
PROMPTS = ["p0", "p1", "p2"]
SAMPLES = [[_sample(f"r{i}{j}", n_tokens=10 * i + j) for j in range(4)] for i in range(3)]


class FakeJudge:
    """A RowJudge body: scores from a table keyed by response text, with a record of every call."""

    def __init__(self, name: str, table: dict[str, float | None]):
        self.name, self.table, self.calls = name, table, []  # calls: the response lists it was given

    def __call__(self, prompts: Sequence[object], responses: Sequence[str]) -> JudgeScores:
        self.calls.append(list(responses))
        scores = [self.table[r] for r in responses]
        return JudgeScores(self.name, scores, {k: "boom" for k, s in enumerate(scores) if s is None})

    def row_judge(self) -> RowJudge:
        return RowJudge(self.name, self)


def _reward() -> FakeJudge:
    return FakeJudge("rm", {SAMPLES[i][j].text: REWARDS[i][j] for i in range(3) for j in range(4)})


def test_levels_use_nested_subsets_ties_and_skip_unscored_prompts() -> None:
    reward = _reward()
    length = FakeJudge("len", {s.text: float(len(s.text)) for g in SAMPLES for s in g})
    picky = FakeJudge("picky", {s.text: (None if s.text == "r11" else 1.0) for g in SAMPLES for s in g})
    levels = bon_levels(PROMPTS, SAMPLES, reward.row_judge(), [4, 1, 2, 3, 2], [length.row_judge(), picky.row_judge()])

    assert [lv.n for lv in levels] == [1, 2, 3, 4]
    kept = {lv.n: [(p.prompt_index, p.sample_index) for p in lv.picks] for lv in levels}
    assert kept == {1: [(0, 0)], 2: [(0, 1), (1, 1)], 3: [(0, 1), (1, 1)], 4: [(0, 3), (1, 1)]}
    assert [lv.responses for lv in levels] == [["r00"], ["r01", "r11"], ["r01", "r11"], ["r03", "r11"]]
    assert [lv.skipped_prompts for lv in levels] == [2, 1, 1, 1]
    assert [lv.reward_errors for lv in levels] == [2, 3, 5, 6]  # failed rows among the first n of each prompt
    assert [lv.proxy for lv in levels] == pytest.approx([0.1, 0.35, 0.35, 0.55])
    assert [lv.kl for lv in levels] == pytest.approx([bon_kl(n) for n in (1, 2, 3, 4)])
    assert [lv.mean_length for lv in levels] == pytest.approx([0.0, 6.0, 6.0, 7.0])  # n_tokens: EOS not counted

    # every sample scored by the reward once, in one call; each distinct kept response judged once
    assert len(reward.calls) == 1 and len(reward.calls[0]) == 12
    assert length.calls == [["r00", "r01", "r03", "r11"]] and len(picky.calls) == 1
    assert levels[3].picks[0].scores == {"len": 3.0, "picky": 1.0}
    assert levels[3].scores == {"len": 3.0, "picky": 1.0}  # the mean over the responses the judge scored
    assert levels[3].judge_errors == {"len": 0, "picky": 1}
    assert levels[0].summary().keys() == {
        "n", "kl", "proxy", "scores", "mean_length", "skipped_prompts", "reward_errors", "judge_errors"
    }  # fmt: skip


def test_a_level_with_nothing_kept_has_no_means() -> None:
    levels = bon_levels(PROMPTS[1:], SAMPLES[1:], _reward().row_judge(), [1], [])
    assert levels[0].picks == [] and levels[0].proxy is None and levels[0].mean_length is None
    assert levels[0].skipped_prompts == 2 and "n/a" in bon_table(levels, "rm", [])


def test_a_reward_failing_on_every_sample_is_an_error() -> None:
    broken = FakeJudge("mod:broken", {s.text: None for g in SAMPLES for s in g})
    with pytest.raises(DpokitError, match=r"reward judge 'mod:broken' failed on all 12 samples: .*row 0: boom"):
        bon_levels(PROMPTS, SAMPLES, broken.row_judge(), [1, 4], [])


def test_too_few_samples_for_the_largest_level() -> None:
    with pytest.raises(ValueError, match="n=8 needs more"):
        bon_levels(PROMPTS, SAMPLES, _reward().row_judge(), [1, 8], [])


# ---- outputs and the command --------------------------------------------------------------------
def test_outputs(tmp_path: Path) -> None:
    length = FakeJudge("len", {s.text: float(len(s.text)) for g in SAMPLES for s in g})
    levels = bon_levels(PROMPTS, SAMPLES, _reward().row_judge(), [1, 4], [length.row_judge()])
    info = {"model": "m", "reward": "rm", "prompts": "p.jsonl", "n_prompts": 3, "ns": [1, 4], "judges": ["len"],
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0}}  # fmt: skip
    files = write_outputs(levels, PROMPTS, info, tmp_path / "out")
    summary = json.loads(Path(files["summary"]).read_text())
    assert [lv["n"] for lv in summary["levels"]] == [1, 4] and summary["levels"][1]["proxy"] == pytest.approx(0.55)
    rows = [json.loads(line) for line in Path(files["samples"]).read_text().splitlines()]
    assert [(r["n"], r["prompt_index"], r["sample"], r["response"]) for r in rows] == [
        (1, 0, 0, "r00"), (4, 0, 3, "r03"), (4, 1, 1, "r11")
    ]  # fmt: skip
    assert rows[1]["reward"] == 0.9 and rows[1]["scores"] == {"len": 3.0} and rows[1]["prompt"] == "p0"
    md = Path(files["markdown"]).read_text()
    assert "| n | KL bound, nats | proxy (rm) | len score | mean length, tokens |" in md
    assert "| 4 | 0.636 | +0.550 | +3.000 | 7.0 |" in md
    assert "n=1: 2 prompt(s) skipped" in md


def test_arguments_and_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_bon_arguments(parser)
    args = parser.parse_args(["--model", "m", "--reward", "vader", "--prompts", "p.txt"])
    assert (args.n, args.judges, args.max_new_tokens) == ("1,4,16", "vader,textblob", 48)
    assert (args.temperature, args.top_p) == (1.0, 1.0)
    assert (args.seed, args.batch_size, args.limit, args.out) == (0, 16, None, "runs/bon")


@pytest.mark.parametrize(("extra", "message"), [(["--n", "1,x"], "--n: 'x'"), (["--limit", "0"], "--limit")])
def test_command_checks_arguments_before_loading(extra: list[str], message: str) -> None:
    parser = argparse.ArgumentParser()
    add_bon_arguments(parser)
    args = parser.parse_args(["--model", "no/such-model", "--reward", "vader", "--prompts", "p.txt", *extra])
    with pytest.raises(DpokitError, match=message):
        bon_command(args)


def test_arguments_do_not_import_torch() -> None:
    """The lead wires `add_bon_arguments` into `dpokit --help`: building it must stay light."""
    code = (
        "import argparse, sys; from dpokit.apps.bon import add_bon_arguments; "
        "add_bon_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kl_bound_matches_the_formula_for_large_n() -> None:
    n = 1024
    assert bon_kl(n) == pytest.approx(math.log(n) - 1 + 1 / n)
