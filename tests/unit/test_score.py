"""`dpokit score` and the statistics of `dpokit evaluate --prompts`.

* win rate, per-prompt outcomes, the bootstrap interval and the correlation against hand-computed values;
* the implicit reward beta * (log pi - log ref) on the tiny llama equals a naive per-sequence forward,
  for pairs (DPO's batch layout and forward) and single responses (the sample-scoring pass), with a
  separate reference model and with a LoRA adapter's base; its pair accuracy equals `dpokit evaluate --data`'s;
* the JSON Lines written by `dpokit score`, and rows a judge could not score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dpokit.config import Config
from dpokit.data.pairs import tokenize_pairs
from dpokit.eval import scoring
from dpokit.eval.score import IMPLICIT, read_score_rows, score
from dpokit.models.logps import naive_sequence_logps
from tests.conftest import TOY

BETA = 0.1


# ---- statistics ---------------------------------------------------------------------------------
def test_prompt_outcomes_and_win_rate_by_hand() -> None:
    cand = [[0.9, 0.1], [0.5, 0.5], [None, -1.0], [None, None]]
    base = [[0.2, 0.3], [0.5, 0.4], [0.0, -0.5], [1.0, 1.0]]
    # prompt 0: win, loss -> 1/2; prompt 1: tie, win -> 3/4; prompt 2: only sample 1 counts, a loss -> 0;
    # prompt 3: nothing both scored -> left out
    assert scoring.prompt_outcomes(cand, base) == [0.5, 0.75, 0.0]
    one = scoring.prompt_outcomes([[1.0], [0.0], [0.5], [-1.0]], [[0.0], [0.0], [0.7], [-1.0]])
    assert one == [1.0, 0.5, 0.0, 0.5]
    assert sum(one) / len(one) == scoring.win_rate([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 0.7, -1.0]) == 0.5


def test_bootstrap_interval_by_hand() -> None:
    assert scoring.bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)  # nothing varies
    # two prompts, a win and a loss: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of 1000 resampled means are the extremes
    assert scoring.bootstrap_interval([0.0, 1.0], n_boot=1000, seed=3) == (0.0, 1.0)
    # 30 wins out of 40: the normal approximation gives 0.75 +- 1.96 * sqrt(0.75 * 0.25 / 40) = (0.616, 0.884)
    lo, hi = scoring.bootstrap_interval([1.0] * 30 + [0.0] * 10, n_boot=4000, seed=0)
    assert lo == pytest.approx(0.616, abs=0.03) and hi == pytest.approx(0.884, abs=0.03)
    assert scoring.bootstrap_interval([1.0] * 30 + [0.0] * 10, seed=5) == scoring.bootstrap_interval(
        [1.0] * 30 + [0.0] * 10, seed=5
    )  # seeded: the same report every time
    assert all(math.isnan(v) for v in scoring.bootstrap_interval([]))
    # the quantile rule is numpy's "linear": between order statistics
    assert scoring._quantile([0.0, 1.0, 2.0, 3.0], 0.5) == 1.5 and scoring._quantile([0.0, 10.0], 0.25) == 2.5


def test_correlation_and_mean_sem_by_hand() -> None:
    assert scoring.correlation([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert scoring.correlation([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert scoring.correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant: undefined
    assert scoring.mean_and_sem([1.0, 2.0, 3.0]) == (2.0, pytest.approx(math.sqrt(1.0 / 3)))


# ---- the implicit reward on the tiny llama ------------------------------------------------------
def _pairs_file(tmp_path: Path, n: int = 10) -> Path:
    lines = (TOY / "eval.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg() -> Config:
    return Config().override([f"loss.beta={BETA}", "model.dtype=float32", "train.eval_batch_size=4"])


def _naive_logp(model: Any, prompt_ids: list[int], response_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt_ids) :] = True
    with torch.no_grad():
        return float(naive_sequence_logps(model(input_ids=ids).logits, ids, mask)[0][0])


def _naive_rewards(policy: Any, ref: Any, tokenizer: Any, data: Path, cfg: Config) -> list[tuple[float, float]]:
    """beta * (log pi - log ref) of each pair's chosen and rejected, one unpadded forward per sequence."""
    raw = read_score_rows([str(data)]).raw
    out = []
    for pair in tokenize_pairs(raw, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length):
        sides = []
        for resp in (pair.chosen_ids, pair.rejected_ids):
            sides.append(BETA * (_naive_logp(policy, pair.prompt_ids, resp) - _naive_logp(ref, pair.prompt_ids, resp)))
        out.append(tuple(sides))
    return out


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dpokit.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("policy"), seed=1)


def test_implicit_reward_equals_naive_log_ratio(tmp_path: Path, tiny_model_dir: Path, policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, cfg = _pairs_file(tmp_path), _cfg()
    res = score([str(data)], cfg, model=str(policy_dir), ref=str(tiny_model_dir), out=str(tmp_path / "s.jsonl"))
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir)).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    want = _naive_rewards(policy, ref, AutoTokenizer.from_pretrained(str(policy_dir)), data, cfg)
    got = res.scores[IMPLICIT]
    assert got["chosen"].scores == pytest.approx([c for c, _ in want], abs=2e-5)
    assert got["rejected"].scores == pytest.approx([r for _, r in want], abs=2e-5)
    accuracy = sum(c > r for c, r in want) / len(want)
    assert res.summary["scorers"][IMPLICIT]["accuracy"] == pytest.approx(accuracy)
    assert res.summary["beta"] == BETA and res.summary["kind"] == "pairs"
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and lines[0]["scores"][IMPLICIT]["chosen"] == got["chosen"].scores[0]
    assert lines[0]["chosen_above"][IMPLICIT] == (want[0][0] > want[0][1])
    logps = lines[0]["logps"]
    assert BETA * (logps["policy_chosen"] - logps["ref_chosen"]) == pytest.approx(want[0][0], abs=2e-5)


def _adapter(tmp_path: Path, base: Path) -> Path:
    """A LoRA adapter on the tiny llama, moved away from zero so it differs from its base."""
    from dpokit.models.loading import apply_lora, load_model_and_tokenizer

    cfg = Config.from_preset("lora").override(["model.attn_implementation=sdpa"])
    model, tok = load_model_and_tokenizer(str(base), cfg, torch.float32)
    model = apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "adapter"))
    tok.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_adapter_reference_single_responses_and_evaluate_agree(tmp_path: Path, tiny_model_dir: Path) -> None:
    """An adapter's reference is its base; single (prompt, response) rows score as the same responses do
    inside pairs; the pair accuracy is `dpokit evaluate --data`'s rewards/accuracies."""
    from dpokit.eval.pairs import evaluate

    adapter, data, cfg = _adapter(tmp_path, tiny_model_dir), _pairs_file(tmp_path, 8), _cfg()
    pairs = score([str(data)], cfg, model=str(adapter))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    singles = tmp_path / "rows.jsonl"
    singles.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["rejected"]}) + "\n" for r in rows))
    alone = score([str(singles)], cfg, model=str(adapter), scorers=["vader"], out=str(tmp_path / "rows_scored.jsonl"))
    assert not alone.rows.is_pairs and alone.summary["kind"] == "responses"
    assert alone.scores[IMPLICIT]["chosen"].scores == pytest.approx(pairs.scores[IMPLICIT]["rejected"].scores, abs=2e-5)
    assert any(abs(s) > 1e-4 for s in alone.scores[IMPLICIT]["chosen"].scores)  # the adapters matter
    metrics = evaluate(str(adapter), [str(data)], cfg=cfg)
    assert pairs.summary["scorers"][IMPLICIT]["accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    assert pairs.summary["scorers"][IMPLICIT]["mean_margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    line = json.loads((tmp_path / "rows_scored.jsonl").read_text().splitlines()[0])
    assert set(line) >= {"prompt", "response", "scores"} and set(line["scores"]) == {IMPLICIT, "vader"}


def bad_on_second(texts: list[str]) -> list[Any]:
    return [None if i == 1 else 1.0 for i, _ in enumerate(texts)]


def test_score_cli_judges_and_failed_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpokit.cli import main

    data = _pairs_file(tmp_path, 4)
    out = tmp_path / "scores.jsonl"
    spec = "tests.unit.test_score:bad_on_second"
    assert main(["score", "--data", str(data), "--judge", "vader", "--judge", spec, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scorers"]["vader"]["accuracy"] == 1.0  # the toy pairs: positive chosen, negative rejected
    assert summary["scorers"][spec]["failed"] == 1 and summary["scorers"][spec]["failed_rows"] == [1]  # the rest kept
    assert summary["scorers"][spec]["ties"] == 3  # 1.0 for every response it scored
    agree = summary["agreement"][0]
    assert (agree["a"], agree["pairs"], agree["same_preference"]) == ("vader", 3, 0.0)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "not a number" in lines[1]["errors"][spec] and lines[0]["scores"]["vader"]["chosen"] > 0
    assert main(["score", "--data", str(data)]) == 2  # nothing to score with
    assert "nothing to score with" in capsys.readouterr().err
    assert main(["score", "--data", str(data), "--judge", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err
