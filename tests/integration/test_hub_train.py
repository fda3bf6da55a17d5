"""Training by Hub id, end to end through the CLI: a tiny model and a toy dataset sit in a Hugging
Face cache built by hand (what huggingface_hub lays out), HF_HUB_OFFLINE=1, and `dpokit train`
runs 2 steps from `org/tiny-llama` on `org/toy-prefs`, eval pairs from the dataset's test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.cli import main
from tests.conftest import PRESETS, TOY
from tests.unit.test_hub import SHA, hub_repo


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf"
    hub_repo(cache, "model", "org/tiny-llama", {".": tiny_model_dir})
    hub_repo(cache, "dataset", "org/toy-prefs", {
        "data/train-00000-of-00001.jsonl": TOY / "train.jsonl",
        "data/test-00000-of-00001.jsonl": TOY / "eval.jsonl",
    })  # fmt: skip
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "dpokit"))
    monkeypatch.chdir(tmp_path)
    return cache


def _train(out: Path, *overrides: str) -> int:
    return main(["train", str(PRESETS / "tiny.yaml"), "model.name_or_path=org/tiny-llama",
                 "data.train_files=[org/toy-prefs]", "data.eval_files=[hub:org/toy-prefs]", f"train.output_dir={out}",
                 "train.max_steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batch_size=32",
                 "train.progress_bar=false", *overrides])  # fmt: skip


def test_train_from_hub_model_and_dataset_offline(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert _train(out) == 0
    shown = capsys.readouterr().out
    assert f"org/toy-prefs@{SHA[:12]}:data/train-00000-of-00001.jsonl" in shown  # the data summary names the dataset
    assert "400 pairs read" in shown and "100 pairs read" in shown  # train split, then the test split
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and any("eval/loss" in r for r in rows)
    assert (out / "model.safetensors").is_file()
    # a second run reads the tokenized pairs from the cache
    assert _train(tmp_path / "run2") == 0
    assert capsys.readouterr().out.count("tokenized pairs cache hit") == 2


def test_train_refuses_uncached_hub_ids_offline(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _train(tmp_path / "run", "model.name_or_path=org/not-cached") == 2
    err = capsys.readouterr().err
    assert "Hub model 'org/not-cached' is not in the local Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1 forbids downloading; run once online or unset HF_HUB_OFFLINE" in err
