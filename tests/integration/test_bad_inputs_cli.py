"""`dpokit train` on bad inputs: exit status 2, one `error:` line naming file, row/line, field and what
was expected, no traceback (unless --debug), and no training step (no metrics.jsonl, no weights).
With data.on_bad_row=skip the run trains and lists the skipped rows in output_dir/skipped.jsonl.

The library-level half of the corpus (every case, one test each) is tests/unit/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.errors import DataError
from tests.conftest import PRESETS

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "fixtures" / "bad"
TINY_YAML = PRESETS / "tiny.yaml"
GOOD = {"prompt": "What colour is the sky?", "chosen": "Blue on a clear day.", "rejected": "Green, always."}


def train(model: Path, out: Path, data: Path, *extra: str, config: Path = TINY_YAML) -> int:
    return main(
        [
            "train",
            str(config),
            f"model.name_or_path={model}",
            f"train.output_dir={out}",
            f"data.train_files=['{data}']",
            "data.eval_files=[]",
            "train.max_steps=1",
            "train.micro_batch_size=2",
            "train.progress_bar=false",
            *extra,
        ]
    )


def assert_refused(code: int, capsys: pytest.CaptureFixture[str], out: Path, *expected: str) -> str:
    """Exit 2, an `error:` line holding every expected piece, no traceback, nothing trained."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    for piece in expected:
        assert piece in line, f"{piece!r} not in {line!r}"
    assert not (out / "metrics.jsonl").exists()  # no training step was logged ...
    assert not list(out.glob("*.safetensors"))  # ... and no model was saved
    return line


DATA_CASES = [
    ("invalid_json.jsonl", ["line 2: invalid JSON (expecting ',' delimiter at column 34)"]),
    ("prompt_number.jsonl", ["line 2, field 'prompt': expected text, got a number"]),
    ("missing_rejected.jsonl", ["line 2, field 'rejected': missing field 'rejected'"]),
    ("conv_unknown_role.jsonl", ["line 1, field 'chosen[0].role': unknown role 'human'"]),
    ("empty.jsonl", [": the file is empty; expected one JSON object"]),
    ("no_data_dir", [": folder has no data files", "it holds notes.md"]),
    ("pairs.txt", [": unsupported file type '.txt'"]),
]


@pytest.mark.parametrize(("name", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, expected: list[str]
) -> None:
    out = tmp_path / "run"
    code = train(tiny_model_dir, out, BAD / name)
    assert_refused(code, capsys, out, f"error: {BAD / name}", *expected)


def test_undecodable_and_truncated_files(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = json.dumps(GOOD).encode()
    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(row + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "run1"
    assert_refused(train(tiny_model_dir, out, undecodable), capsys, out, f"{undecodable}, line 2: not valid UTF-8")
    truncated = tmp_path / "cut.jsonl"
    truncated.write_bytes(row + b"\n" + row[:25])
    out = tmp_path / "run2"
    assert_refused(
        train(tiny_model_dir, out, truncated), capsys, out, f"{truncated}, line 2: invalid JSON", "truncated"
    )


def test_conversational_data_needs_a_chat_template(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    code = train(model, out, BAD / "mixed_formats.jsonl")
    assert_refused(code, capsys, out, f"{BAD / 'mixed_formats.jsonl'}, line 2: conversational row", "no chat_template")


CONFIG_CASES = [
    ("config_unknown_key.yaml", ["unknown key 'train.lrr' (did you mean 'lr'?)"]),
    ("config_wrong_type.yaml", ["train.micro_batch_size must be an integer, got 'four'"]),
    ("config_negative_lr.yaml", ["train.lr must be > 0"]),
    ("config_beta_zero.yaml", ["loss.beta must be > 0"]),
    ("config_prompt_ge_max.yaml", ["data.max_prompt_length (64) must be < data.max_length (64)"]),
    ("config_bad_yaml.yaml", ["not valid YAML"]),
]


@pytest.mark.parametrize(("name", "expected"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, expected: list[str]
) -> None:
    out = tmp_path / "run"
    data = BAD / "duplicates.jsonl"  # valid data: the config alone must stop the run
    code = train(tiny_model_dir, out, data, config=BAD / name)
    assert_refused(code, capsys, out, f"error: {BAD / name}", *expected)


def test_bad_override_names_the_command_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = train(tiny_model_dir, out, BAD / "duplicates.jsonl", "loss.beta=-1")
    assert_refused(code, capsys, out, f"error: {TINY_YAML} + command-line overrides: loss.beta must be > 0")


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = train(tmp_path / "no_such_model", out, BAD / "duplicates.jsonl")
    assert_refused(code, capsys, out, f"model path '{tmp_path / 'no_such_model'}' does not exist")


def test_debug_shows_the_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="field 'prompt'"):
        main(
            [
                "--debug",
                "train",
                str(TINY_YAML),
                f"model.name_or_path={tiny_model_dir}",
                f"train.output_dir={tmp_path / 'run'}",
                f"data.train_files=['{BAD / 'prompt_number.jsonl'}']",
                "data.eval_files=[]",
            ]
        )


def test_skip_mode_trains_and_lists_skipped_rows(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.dumps({"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) for i in range(4)]
    rows[1:1] = ['{"prompt": "cut', json.dumps({"prompt": None, "chosen": "a", "rejected": "b"})]
    data = tmp_path / "some_bad.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    code = train(tiny_model_dir, out, data, "data.on_bad_row=skip")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 kept, 0 dropped, 2 malformed rows skipped" in captured.out
    assert f"all listed in {out / 'skipped.jsonl'}" in captured.out
    records = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["file"], r["row"], r["field"]) for r in records] == [(str(data), 2, None), (str(data), 3, "prompt")]
    assert (
        records[1]["raw"] == {"prompt": None, "chosen": "a", "rejected": "b"}
        and "expected text" in records[1]["reason"]
    )
    assert (out / "metrics.jsonl").is_file()  # it did train
