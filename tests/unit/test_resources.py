"""The files that ship inside the package resolve by package, not by the working directory:
presets (`Config.from_preset`, `dpokit train --preset`) and ``builtin:`` data paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpokit import resources
from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import ConfigError
from tests.conftest import ASSETS, PRESETS

SHIPPED_PRESETS = ["demo", "full", "iterate-reviews", "iterate-tiny", "kto-tiny", "lora", "reward-reviews", "reward-tiny", "rl-reviews", "rl-tiny", "sft-reviews", "sft-tiny", "tiny"]


def _builtin_paths(cfg: Config) -> list[str]:
    return [f for f in cfg.data.train_files + cfg.data.eval_files if resources.is_builtin(f)]


def test_presets_are_the_shipped_yaml_files() -> None:
    assert resources.presets() == SHIPPED_PRESETS == sorted(p.stem for p in PRESETS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_PRESETS)
def test_every_preset_loads_validates_and_names_existing_data(name: str) -> None:
    cfg = Config.from_preset(name).validate()
    assert cfg == Config.from_yaml(PRESETS / f"{name}.yaml")
    assert resources.preset_path(name).samefile(PRESETS / f"{name}.yaml")
    named = _builtin_paths(cfg)
    assert named, f"preset {name} names no builtin: data"
    for spec in named:
        assert resources.resolve_builtin(spec).is_file(), spec


def test_every_builtin_file_exists() -> None:
    files = resources.builtin_files()
    assert "builtin:toy/train.jsonl" in files and "builtin:reviews/README.md" in files
    on_disk = sorted(p for p in (ASSETS / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert len(files) == len(on_disk)
    for spec in files:
        path = resources.resolve_builtin(spec)
        assert path.is_file() and path.stat().st_size > 0, spec


def test_default_train_files_resolve() -> None:
    from dpokit.data.files import expand_files

    defaults = Config().data.train_files
    assert defaults and all(resources.is_builtin(f) for f in defaults)
    for spec in defaults:
        assert resources.resolve_builtin(spec).is_file(), spec
    assert [Path(p).name for p in expand_files(defaults)] == ["train.jsonl"]


@pytest.mark.parametrize("spec", ["builtin:../../x", "builtin:toy/../../presets/tiny.yaml", "builtin:/../../etc/passwd"])
def test_resolve_builtin_stays_inside_the_data_folder(spec: str) -> None:
    with pytest.raises(ConfigError, match="inside the package's data folder"):
        resources.resolve_builtin(spec)


def test_missing_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as exc:
        Config.from_preset("tinyy")
    message = str(exc.value)
    assert "tinyy" in message and all(name in message for name in SHIPPED_PRESETS)


# ---- merging a user's YAML over a preset ---------------------------------------------------------
def test_yaml_merges_over_a_preset_key_by_key(tmp_path: Path) -> None:
    mine = tmp_path / "my.yaml"
    mine.write_text("data:\n  train_files: mine.jsonl\ntrain:\n  lr: 1e-4\n  max_steps: 3\n")
    base = Config.from_preset("lora")
    cfg = Config.from_yaml(mine, base=base)
    assert cfg.data.train_files == ["mine.jsonl"] and cfg.train.lr == 1e-4 and cfg.train.max_steps == 3
    # every key the file does not name keeps the preset's value
    assert cfg.data.eval_files == base.data.eval_files and cfg.lora == base.lora and cfg.train.scheduler == "cosine"
    assert cfg.train.micro_batch_size == base.train.micro_batch_size
    assert base == Config.from_preset("lora")  # the base is not changed


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  lrr: 1e-4\n", "unknown key 'train.lrr'"),
        ("trian:\n  lr: 1e-4\n", "unknown section 'trian'"),
        ("train:\n  max_steps: many\n", "train.max_steps must be an integer"),
    ],
)
def test_merge_keeps_schema_errors_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    mine = tmp_path / "my.yaml"
    mine.write_text(text)
    with pytest.raises(ConfigError) as exc:
        Config.from_yaml(mine, base=Config.from_preset("tiny"))
    assert needle in str(exc.value) and str(mine) in str(exc.value)


# ---- the command line ------------------------------------------------------------------------------
def test_cli_config_preset_prints_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "preset tiny" in out.splitlines()[0]
    assert Config.from_dict(yaml.safe_load(out)) == Config.from_preset("tiny")


def test_cli_config_preset_with_file_and_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "my.yaml"
    mine.write_text("train:\n  lr: 2.0e-4\n")
    assert main(["config", "--preset", "lora", str(mine), "loss.beta=0.05"]) == 0
    cfg = Config.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert cfg == Config.from_preset("lora").override(["train.lr=2e-4", "loss.beta=0.05"])
    # an override right after --preset is an override, not a file name
    assert main(["config", "--preset", "tiny", "train.lr=3e-4"]) == 0
    assert Config.from_dict(yaml.safe_load(capsys.readouterr().out)).train.lr == 3e-4


def test_cli_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED_PRESETS
    assert all(len(line.split()) > 3 for line in lines)  # each with its one-line description


def test_cli_train_needs_a_config_or_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "needs a config" in err and "--preset" in err and "tiny" in err
    assert main(["train", "train.lr=1e-5"]) == 2  # an override alone is not a config
    assert main(["train", "--preset", "nope"]) == 2
    assert "no preset named 'nope'" in capsys.readouterr().err


def test_cli_train_preset_with_overrides(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main([
        "train", "--preset", "tiny", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}",
        "train.max_steps=2", "train.micro_batch_size=2", "train.eval_every=0", "train.log_every=1",
        "data.eval_files=[]", "train.progress_bar=false",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "done: 2 steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    saved = Config.from_yaml(out / "config.yaml")
    assert saved.train.lr == Config.from_preset("tiny").train.lr and saved.data.train_files == ["builtin:toy/train.jsonl"]


def test_cli_train_preset_and_user_file(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine = tmp_path / "my.yaml"
    mine.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_files": [str(data)], "eval_files": []},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 2, "progress_bar": False},
    }))  # fmt: skip
    assert main(["train", "--preset", "tiny", str(mine), "train.log_every=1"]) == 0, capsys.readouterr().err
    saved = Config.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.data.train_files == [str(data)] and saved.train.max_steps == 2
    assert saved.data.max_length == Config.from_preset("tiny").data.max_length  # from the preset


def test_cli_train_stopped_names_the_preset_in_the_resume_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dpokit.training import loop

    seen: list[Config] = []

    def fake_train(cfg: Config, objective: object = None) -> loop.TrainResult:
        assert objective is None or type(objective).__name__ == "DPOObjective"  # `dpokit train` is DPO
        seen.append(cfg)
        return loop.TrainResult(output_dir=cfg.train.output_dir, steps=3, stopped_by=15, checkpoint="ckpt")

    monkeypatch.setattr(loop, "train", fake_train)
    assert main(["train", "--preset", "tiny", "train.lr=2e-4", "train.resume=no"]) == 128 + 15
    assert seen[0] == Config.from_preset("tiny").override(["train.lr=2e-4", "train.resume=no"])
    err = capsys.readouterr().err
    assert "to continue: dpokit train --preset tiny train.lr=2e-4 train.resume=auto" in err


def test_cli_demo_preset_stands_for_its_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dpokit.apps import demo

    configs: list[str] = []
    monkeypatch.setattr(demo, "demo_command", lambda args: configs.append(args.config) or 0)
    assert main(["demo", "--quick"]) == 0 and main(["demo", "--preset", "lora"]) == 0
    assert configs == [demo.DEFAULT_CONFIG, str(resources.preset_path("lora"))]
    assert Path(demo.DEFAULT_CONFIG).samefile(resources.preset_path("demo"))
    assert main(["demo", "--preset", "lora", "--config", "my.yaml"]) == 2
    assert "not both" in capsys.readouterr().err
