"""reference.precompute end to end through the CLI: same losses as the live reference, no
reference model while training, the second run and `dpokit evaluate` hit the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.models import refcache
from dpokit.models import reference as references
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]
COMPARED = ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss", "eval/rewards/margins")


def _train(model_dir: Path, out: Path, cache: Path, *overrides: str) -> list[dict]:
    code = main(["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={model_dir}",
                 f"train.output_dir={out}", f"data.train_files=[{TOY / 'train.jsonl'}]",
                 f"data.eval_files=[{TOY / 'eval.jsonl'}]", "train.progress_bar=false", "train.max_steps=8",
                 "train.log_every=1", "train.eval_every=4", f"reference.cache_dir={cache}", *overrides])
    assert code == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key in COMPARED:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)


def _forbid(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} must not run here")

    monkeypatch.setattr(target, name, refuse)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_trains_identically_and_is_reused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, lora: bool
) -> None:
    extra = ["lora.enabled=true", "lora.r=8", "train.lr=5e-3"] if lora else []
    cache = tmp_path / "cache"
    live = _train(tiny_model_dir, tmp_path / "live", cache, *extra)
    assert not cache.exists()  # precompute=false touches no cache
    with monkeypatch.context() as m:  # precompute never builds a frozen copy: it uses the policy itself
        _forbid(m, references, "build_reference")
        first = _train(tiny_model_dir, tmp_path / "pre1", cache, "reference.precompute=true", *extra)
    out = capsys.readouterr().out
    assert "reference log-probs [train]: cache miss, computed, 400 pairs" in out
    assert "reference log-probs [eval]: cache miss, computed, 100 pairs" in out
    assert len(list(cache.glob("*.safetensors"))) == 2  # one table per split
    _assert_same(live, first)
    with monkeypatch.context() as m:  # the second run: no reference forward at all
        _forbid(m, references, "build_reference")
        _forbid(m, refcache, "compute_table")
        second = _train(tiny_model_dir, tmp_path / "pre2", cache, "reference.precompute=true", *extra)
    out = capsys.readouterr().out
    assert "[train]: cache hit, 400 pairs" in out and "[eval]: cache hit, 100 pairs" in out
    _assert_same(live, second)


def test_changed_settings_miss_and_evaluate_reuses_the_eval_table(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    _train(tiny_model_dir, tmp_path / "a", cache, "reference.precompute=true", "train.max_steps=1")
    capsys.readouterr()
    # another truncation: new ids, so both splits miss (toy pairs hold up to 23 tokens)
    _train(tiny_model_dir, tmp_path / "b", cache, "reference.precompute=true", "train.max_steps=1",
           "data.max_length=16", "data.max_prompt_length=8")
    out = capsys.readouterr().out
    assert "[train]: cache miss" in out and "[eval]: cache miss" in out
    assert len(list(cache.glob("*.safetensors"))) == 4
    # `dpokit evaluate` with the same reference + data + settings finds the training run's eval table
    with monkeypatch.context() as m:
        _forbid(m, refcache, "compute_table")
        code = main(["evaluate", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir),
                     "--data", str(TOY / "eval.jsonl"), "--config", str(PRESETS / "tiny.yaml"), "--json",
                     f"reference.cache_dir={cache}"])
    assert code == 0
    captured = capsys.readouterr()
    assert "reference log-probs [eval]: cache hit, 100 pairs" in captured.err
    res = json.loads(captured.out)  # stdout stays pure JSON
    assert res["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
