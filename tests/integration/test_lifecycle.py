"""The run lifecycle and CLI rough edges a new user hit: a finished run is not trained again by
resume=auto, overwrite removes the previous run's files (only dpokit's), a failed start leaves no
empty folder and bad data fails before the model loads, the console without a terminal, --debug
after the subcommand, hints for misplaced overrides and TRL argument names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.objectives import dpo
from dpokit.training.outputs import COMPLETE
from tests.conftest import PRESETS, REPO, TOY


def _args(model_dir: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{TOY / 'train.jsonl'}]", "data.eval_files=[]", "train.max_steps=2",
            "train.log_every=1", "train.progress_bar=false", *overrides]


def test_resume_auto_on_a_finished_run_says_so_and_trains_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out)) == 0
    done = json.loads((out / COMPLETE).read_text())
    assert done["steps"] == 2 and "model" in done["written"]
    before = (out / "metrics.jsonl").read_text(), (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args(tiny_model_dir, out, "train.resume=auto")) == 0
    said = capsys.readouterr().out
    assert "holds a finished run (2 steps" in said and "nothing to resume" in said and "train.overwrite=true" in said
    assert ((out / "metrics.jsonl").read_text(), (out / "model.safetensors").stat().st_mtime_ns) == before


def test_overwrite_removes_only_the_previous_runs_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out, "train.save_every=1")) == 0  # full fine-tuning: model.safetensors
    (out / "notes.txt").write_text("mine")
    assert main(_args(tiny_model_dir, out, "train.overwrite=true", "lora.enabled=true", "lora.r=4")) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # no stale full model next to the new adapter
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went too (this run saved none)
    assert (out / "notes.txt").read_text() == "mine"  # not dpokit's: kept


def test_a_failed_start_leaves_no_empty_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert main(_args(tmp_path / "no-such-model", out)) == 2
    assert not out.exists()


def test_missing_data_fails_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load before the data is checked")

    monkeypatch.setattr(dpo.DPOObjective, "load_model", no_model)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out, f"data.train_files=[{tmp_path / 'missing.jsonl'}]")) == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_without_a_terminal_one_line_per_log_step_and_no_carriage_returns(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = _args(tiny_model_dir, tmp_path / "run", "train.max_steps=3")
    args[args.index("train.progress_bar=false")] = "train.progress_bar=true"  # the default: still no bar in a log
    proc = subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    assert [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]


def test_debug_after_the_subcommand_shows_the_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "--preset", "nope"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(Exception, match="no preset named 'nope'"):
        main(["config", "--debug", "--preset", "nope"])


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "train.lr=1e-5"], "`train.lr=1e-5` is an override, not a config file"),
    (["train", "--preset", "tiny", "--learning_rate", "1e-5"], "--learning_rate (did you mean train.lr?"),
    (["train", "--preset", "tiny", "per_device_train_batch_size=4"], "did you mean train.micro_batch_size?"),
    (["train", "--preset", "tiny", "train.num_train_epochs=2"], "did you mean train.epochs?"),
    (["config", "--preset", "tiny", "gradient_accumulation_steps=2"], "did you mean train.grad_accum_steps?"),
    (["config", "max_prompt_length=64"], "did you mean data.max_prompt_length?"),
])  # fmt: skip
def test_hints_for_misplaced_overrides_and_trl_names(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusal of an unknown option
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_config_lists_the_allowed_values_of_choice_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "type: sigmoid" in text and "[one of: hinge, ipo, orpo, robust, sigmoid, simpo]" in text
    assert "[one of: adamw, rmsprop, adamw8bit]" in text and "[one of: true, false, auto]" in text


def test_python_api_names_are_functions() -> None:
    import dpokit
    from dpokit import evaluate, train

    assert callable(evaluate) and evaluate.__module__ == "dpokit.eval.pairs"
    assert callable(train) and dpokit.Config.__name__ == "Config"


def test_a_bad_first_row_fails_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not load before the data is checked")

    monkeypatch.setattr(dpo.DPOObjective, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    assert main(_args(tiny_model_dir, tmp_path / "run", f"data.train_files=[{bad}]")) == 2
    assert "bad.jsonl, line 1, field 'rejected': missing field 'rejected'" in capsys.readouterr().err


def test_train_accepts_rows_in_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """train(cfg, train_data=..., eval_data=...) with a list of dicts and a datasets.Dataset: the rows
    are kept in the run folder and a bad one is named like a file row."""
    from datasets import Dataset

    from dpokit import Config, train
    from dpokit.errors import DataError

    rows = [json.loads(line) for line in (TOY / "train.jsonl").read_text().splitlines()[:32]]
    held = Dataset.from_list([json.loads(line) for line in (TOY / "eval.jsonl").read_text().splitlines()[:8]])
    cfg = Config.from_preset("tiny").override([f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'r'}",
                                              "train.max_steps=2", "train.progress_bar=false"])  # fmt: skip
    result = train(cfg, train_data=rows, eval_data=held)
    assert result.steps == 2 and "eval/loss" in result.eval_metrics
    assert len((tmp_path / "r" / "train_data.jsonl").read_text().splitlines()) == 32
    assert "train_data.jsonl" in (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(DataError, match=r"train_data.jsonl, line 2, field 'rejected': missing field"):
        train(cfg.override([f"train.output_dir={tmp_path / 'bad'}"]), train_data=[rows[0], {"prompt": "p", "chosen": "c"}])


def test_the_readme_python_example_runs_outside_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Python block, run as written in an empty folder holding the user's own files:
    presets and builtin data resolve by package, and `train` receives a valid config (the SmolLM2
    training itself is the demo's and the wheel test's business; here train is a stand-in)."""
    import re

    from dpokit.training import loop

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "my_pairs.jsonl").write_text((TOY / "train.jsonl").read_text())
    (tmp_path / "my.yaml").write_text("data:\n  train_files: [my_pairs.jsonl]\ntrain:\n  output_dir: runs/mine\n")
    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: seen.append(cfg.validate()) or "trained")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["result"] == "trained" and seen[0].data.train_files == ["my_pairs.jsonl"]
    assert seen[0].lora.enabled and seen[0].train.output_dir == "runs/mine"
