"""`dpokit iterate`: two rounds of sample -> judge -> pairs -> LoRA DPO on the tiny random llama (preset
iterate-tiny, a toy judge), the files and rows of every round, how rounds chain (round 2 starts from
round 1's merged policy) and what iterate.reference changes (previous vs original)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpokit.apps.iterate import (
    ROWS_FILE,
    IterateResult,
    RoundRow,
    check_config,
    markdown_table,
    render_markdown,
    round_config,
    round_prompts,
    run_iterate,
    too_few_pairs,
)
from dpokit.apps.pairs import PairStats
from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import ConfigError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, IterateResult, Path]]:
    """One 2-round run of the iterate-tiny preset (one torch thread: the tiny model gains nothing from two)."""
    import torch

    tmp = tmp_path_factory.mktemp("iterate")
    cfg = Config.from_preset("iterate-tiny").override([f"train.output_dir={tmp / 'run'}", "train.progress_bar=false"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_iterate(cfg, doc=str(tmp / "docs" / "iterate.md"), log=lambda _m: None)
    finally:
        torch.set_num_threads(before)
    yield cfg, result, tmp


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_every_round_writes_its_pairs_model_and_row(tiny_run: tuple[Config, IterateResult, Path]) -> None:
    cfg, result, tmp = tiny_run
    out = Path(cfg.train.output_dir)
    for k in (1, 2):
        pairs = [json.loads(line) for line in (out / f"round-{k}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(p["chosen_score"] - p["rejected_score"] >= cfg.iterate.min_gap for p in pairs)
        model = out / f"round-{k}" / "model"
        for name in ("adapter_model.safetensors", "run_complete.json", "merged/config.json", "merged/model.safetensors"):
            assert (model / name).is_file(), (k, name)
    for k in (0, 1, 2):  # the held-out samples of every policy, the starting model's included
        heldout = [json.loads(line) for line in (out / f"round-{k}" / "heldout.jsonl").read_text().splitlines()]
        assert len(heldout) == cfg.iterate.heldout_prompts and all(r["logratio"] is not None for r in heldout)
        assert heldout[0]["response"] == result.rows[k].example
    rows = [json.loads(line) for line in (out / ROWS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows == [RoundRow(**r).__dict__ for r in rows]
    assert [r.round for r in result.rows] == [0, 1, 2]
    doc = (out / "iterate.md").read_text()
    assert doc == (tmp / "docs" / "iterate.md").read_text() and markdown_table(cfg.iterate.judge, result.rows) in doc


def test_round_rows(tiny_run: tuple[Config, IterateResult, Path]) -> None:
    cfg, result, _ = tiny_run
    start, *rounds = result.rows
    assert start.kl == 0.0 and start.pairs is None and start.sample_score is None and start.reference == ""
    assert start.policy == "tiny-random-llama" and start.heldout_score is not None
    for row in rounds:
        assert row.prompts == cfg.iterate.prompts_per_round and 0 < row.pairs <= row.prompts
        assert row.kl is not None and row.kl == row.kl and row.kl_sem is not None
        assert row.heldout_score is not None and row.sample_score is not None and row.mean_gap >= cfg.iterate.min_gap
        assert set(row.seconds) == {"pairs", "train", "heldout"} and "loss" in row.train_metrics
    assert [r.reference for r in rounds] == ["original", "round 1"]  # round 1's previous policy is the start
    table = markdown_table(cfg.iterate.judge, result.rows).splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 0 | ") and "| 7 / 8 |" not in table[2]


def test_round_2_starts_from_round_1(tiny_run: tuple[Config, IterateResult, Path]) -> None:
    """Round 2 trains adapters on round 1's merged model, and its reference (previous) is that model:
    at step 1 (adapters still zero) the policy equals the reference exactly, so every log-ratio is 0."""
    from safetensors.torch import load_file

    from dpokit.models import sources

    cfg, result, _ = tiny_run
    out = Path(cfg.train.output_dir)
    merged1 = out / "round-1" / "model" / "merged"
    assert result.rows[1].policy == str(merged1) and result.rows[2].policy == str(out / "round-2" / "model" / "merged")
    round2 = out / "round-2" / "model"
    assert Config.from_yaml(round2 / "config.yaml").model.name_or_path == str(merged1)
    base = json.loads((round2 / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == merged1.resolve()
    original = load_file(str(sources.resolve_source("tiny-random-llama").path / "model.safetensors"))
    trained = load_file(str(merged1 / "model.safetensors"))
    assert original.keys() == trained.keys()
    assert any(not original[k].equal(trained[k]) for k in original)  # round 1 moved the weights
    for k in (1, 2):
        first = _metrics(out / f"round-{k}" / "model")[0]
        assert first["step"] == 1 and first["logratios/chosen"] == 0.0 and first["rewards/margins"] == 0.0


def test_reference_original_vs_previous(tiny_run: tuple[Config, IterateResult, Path]) -> None:
    """previous: the round's starting policy (the LoRA base with adapters off); original: the starting
    model loaded as a frozen copy from round 2 on (in round 1 the two are the same model)."""
    from dpokit.training.loop import train

    cfg, _, tmp = tiny_run
    out = Path(cfg.train.output_dir)
    merged1 = str(out / "round-1" / "model" / "merged")
    previous = round_config(cfg, 2, merged1, out)
    assert previous.reference.mode == "auto" and previous.reference.name_or_path is None
    assert previous.model.name_or_path == merged1 and previous.lora.merge
    orig_cfg = cfg.override(["iterate.reference=original"])
    assert round_config(orig_cfg, 1, "tiny-random-llama", out).reference == round_config(cfg, 1, "tiny-random-llama", out).reference
    original = round_config(orig_cfg, 2, merged1, out)
    assert original.reference.mode == "copy" and original.reference.name_or_path == "tiny-random-llama"
    assert original.model.name_or_path == merged1
    # one step against the original: the same starting policy is now measured against other weights
    again = original.override([f"train.output_dir={tmp / 'original-2'}", "train.max_steps=1"])
    train(again)
    first = _metrics(tmp / "original-2")[0]
    assert first["step"] == 1 and abs(first["logratios/chosen"]) > 1e-4


def test_round_prompts_are_seeded_slices() -> None:
    prompts = [f"p{i}" for i in range(10)]
    rounds = round_prompts(prompts, 4, 3, seed=0)
    assert [len(r) for r in rounds] == [4, 4, 4] and rounds == round_prompts(prompts, 4, 3, seed=0)
    assert set(rounds[0]).isdisjoint(rounds[1]) and sorted(rounds[0] + rounds[1] + rounds[2][:2]) == sorted(prompts)
    assert rounds != round_prompts(prompts, 4, 3, seed=1)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("reference.name_or_path=x", "chooses each round's reference itself"),
        ("lora.quantize=nf4", "lora.quantize cannot merge"),
        ("iterate.n_samples=1", "iterate.n_samples must be >= 2"),
        ("iterate.reference=base", "iterate.reference = 'base' is not one of"),
    ],
)
def test_bad_settings_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_config(Config.from_preset("iterate-tiny").override([override]))


def test_command_line_refuses_a_previous_run_and_a_missing_config(
    tiny_run: tuple[Config, IterateResult, Path], capsys: pytest.CaptureFixture
) -> None:
    cfg, _, _ = tiny_run
    assert main(["iterate", "--preset", "iterate-tiny", f"train.output_dir={cfg.train.output_dir}"]) == 2
    assert "holds a previous `dpokit iterate` run" in capsys.readouterr().err
    assert main(["iterate"]) == 2
    assert "dpokit iterate needs a config" in capsys.readouterr().err


def test_a_round_with_fewer_pairs_than_a_step_stops_the_rounds_with_why() -> None:
    """A judge that no longer separates the policy's samples (a saturated reward) leaves too few pairs for
    one optimizer step: the rounds stop after the last trained one and the report says why (round 1 with
    no pairs at all is an error, raised where the pairs are built)."""
    cfg = Config.from_preset("iterate-tiny").override(["train.micro_batch_size=4", "train.grad_accum_steps=2"])
    assert too_few_pairs(cfg, 0, None) is None
    assert too_few_pairs(cfg, 3, PairStats(kept=8, prompts=96)) is None
    why = too_few_pairs(cfg, 3, PairStats(kept=1, prompts=96))
    assert why is not None and "round 3 kept 1 pair(s) from 96 prompts" in why and "one optimizer step's 8" in why
    assert why.endswith("stopped after round 2")
    rows = [RoundRow(round=0, policy="m", heldout_score=0.1, kl=None, kl_sem=None, heldout_length=3.0, example="x")]
    assert f"**Stopped early**: {why}." in render_markdown(cfg, rows, "p", why)
