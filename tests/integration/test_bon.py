"""Best-of-N on the tiny random llama (the `tiny-random-llama` alias), with rewards defined here.

* `run_bon`: one sampling pass; level n keeps the reward's best of the first n samples (checked
  against the sampler called directly with the same seed), so the proxy reward is non-decreasing
  in n; the KL column is the analytic bound;
* `dpokit bon` through `add_bon_arguments` + `bon_command`: summary.json, summary.md, samples.jsonl
  and the printed table; a reward that fails on every row is a DpokitError naming it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from dpokit.apps.bon import add_bon_arguments, bon_command, bon_kl, run_bon
from dpokit.errors import DpokitError
from dpokit.eval.judges import load_judge

pytest.importorskip("transformers")

PROMPTS = ["Write a short review of a film.", "Hi", "Describe the weather in a long sentence, please.", "Why?"]
NS = [1, 2, 4]
REWARD = f"{__name__}:count_e"  # module:function judges, imported back by name (the CLI's form)


def count_e(responses: list[str]) -> list[float]:
    """The toy reward: how many 'e's a response has (ties are common: the tie rule is exercised)."""
    return [float(text.count("e")) for text in responses]


def n_words(responses: list[str]) -> list[float]:
    return [float(len(text.split())) for text in responses]


def always_fails(responses: list[str]) -> list[float]:
    raise ValueError("no reward today")


@pytest.fixture(scope="module")
def policy() -> Any:
    from dpokit.config import Config
    from dpokit.eval.generate_eval import generation_config, load_candidate

    return load_candidate("policy", "tiny-random-llama", generation_config(Config()), None)


def test_run_bon_levels(policy: Any) -> None:
    from dpokit.eval.generate_eval import SamplingSettings
    from dpokit.eval.sampling import generate_samples

    sampling = SamplingSettings(n=1, max_new_tokens=8, seed=3, batch_size=16)  # n is ignored: max(ns) is drawn
    judge = load_judge(f"{__name__}:n_words")
    levels = run_bon(policy.model, policy.tokenizer, PROMPTS, load_judge(REWARD), NS, [judge], sampling)
    assert [lv.n for lv in levels] == NS
    assert [lv.kl for lv in levels] == pytest.approx([0.0, bon_kl(2), bon_kl(4)])
    assert [lv.kl for lv in levels] == pytest.approx([0.0, 0.19314718, 0.63629436])
    proxies = [lv.proxy for lv in levels]
    assert all(a <= b for a, b in zip(proxies, proxies[1:])), proxies  # nested subsets: best of more is no worse
    assert all(lv.skipped_prompts == 0 and lv.reward_errors == 0 and len(lv.responses) == 4 for lv in levels)

    # the same draws as the sampler called directly; level n = the first best 'e' count of the first n
    drawn = generate_samples(policy.model, policy.tokenizer, PROMPTS, n=4, max_new_tokens=8, seed=3, batch_size=16)
    for lv in levels:
        for pick, text, group in zip(lv.picks, lv.responses, drawn):
            counts = [s.text.count("e") for s in group[: lv.n]]
            assert pick.sample_index == counts.index(max(counts)) and text == group[pick.sample_index].text
            assert pick.reward == max(counts) and pick.n_tokens == group[pick.sample_index].n_tokens
            assert pick.scores == {judge.name: float(len(text.split()))}
        assert lv.mean_length == pytest.approx(sum(p.n_tokens for p in lv.picks) / 4)


def _args(tmp_path: Path, reward: str, judges: str) -> argparse.Namespace:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*PROMPTS, "never used"]), encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_bon_arguments(parser)
    return parser.parse_args(
        ["--model", "tiny-random-llama", "--reward", reward, "--n", "4,1,2", "--prompts", str(prompts),
         "--limit", "4", "--judges", judges, "--max-new-tokens", "8", "--out", str(tmp_path / "bon")]
    )  # fmt: skip


def test_bon_command_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bon_command(_args(tmp_path, REWARD, f"{REWARD},{__name__}:n_words")) == 0
    out = tmp_path / "bon"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ns"] == NS and summary["n_prompts"] == 4 and summary["reward"] == REWARD
    levels = summary["levels"]
    assert [lv["kl"] for lv in levels] == pytest.approx([bon_kl(n) for n in NS])
    assert all(a["proxy"] <= b["proxy"] for a, b in zip(levels, levels[1:]))
    assert all(lv["scores"][REWARD] == pytest.approx(lv["proxy"]) for lv in levels)  # the reward as a judge agrees
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["n"], r["prompt_index"]) for r in rows] == [(n, i) for n in NS for i in range(4)]
    assert all(r["sample"] < r["n"] and r["reward"] == r["response"].count("e") for r in rows)
    printed = capsys.readouterr().out
    assert f"| n | KL bound, nats | proxy ({REWARD}) |" in printed and "| 4 | 0.636 |" in printed
    table = printed.split("written:")[0].strip()
    assert table.count("\n") == 1 + len(NS) and table in (out / "summary.md").read_text()


def test_bon_command_refuses_a_reward_that_always_fails(tmp_path: Path) -> None:
    spec = f"{__name__}:always_fails"
    with pytest.raises(DpokitError, match=rf"reward judge '{spec}' failed on all 16 samples: .*no reward today"):
        bon_command(_args(tmp_path, spec, f"{__name__}:n_words"))
