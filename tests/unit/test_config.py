"""Config schema: every shipped YAML loads, unknown keys and bad values are named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpokit.config import Config
from dpokit.errors import ConfigError
from tests.conftest import PRESETS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(PRESETS.glob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path: Path) -> None:
    cfg = Config.from_yaml(path).validate()
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # every key in the file reached the dataclass
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, str) and [value] == got), (section, key)


def test_default_yaml_round_trips() -> None:
    cfg = Config().override(["train.lr=3e-6", "loss.type=ipo", "data.train_files=[a.jsonl, b.jsonl]"])
    text = cfg.to_yaml(commented=True)
    again = Config.from_dict(yaml.safe_load(text))
    assert again == cfg
    assert again.train.lr == 3e-6 and again.loss.type == "ipo" and again.data.train_files == ["a.jsonl", "b.jsonl"]


def test_commented_yaml_documents_every_key() -> None:
    text = Config().to_yaml(commented=True)
    for line in text.splitlines():
        if line.startswith("  "):
            assert "  # " in line, line


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train": {"lrr": 1e-5}}, "unknown key 'train.lrr' (did you mean 'lr'?)"),
        ({"trian": {}}, "unknown section 'trian' (did you mean 'train'?)"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size must be an integer"),
        ({"lora": {"enabled": "yes"}}, "lora.enabled must be true or false"),
        ({"data": {"truncation_mode": "middle"}}, "data.truncation_mode = 'middle' is not one of"),
        ({"train": []}, "section 'train' must be a mapping"),
    ],
)
def test_schema_errors_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_dict(raw)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=-1e-5", "train.lr must be > 0"),
        ("loss.beta=0", "loss.beta must be > 0"),
        ("data.max_prompt_length=512", "data.max_prompt_length (512) must be < data.max_length (512)"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing must be in [0, 0.5)"),
        ("loss.type=dpoo", "loss.type 'dpoo' is not one of"),
        ("reference.mode=adapter", "reference.mode=adapter needs lora.enabled=true"),
        ("train.report_to=[mlflow]", "unknown logger"),
    ],
)
def test_impossible_values_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Config().override([override]).validate()
    assert needle in str(exc.value)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        Config().override(["lr=1"])
    with pytest.raises(ConfigError, match="unknown section"):
        Config().override(["optim.lr=1"])


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        Config.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(bad)


def test_yaml_is_read_with_a_safe_loader(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(evil)
