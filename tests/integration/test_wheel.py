"""Installed use (slow): the wheel, installed into a fresh environment, works from any folder.

The wheel is built from a copy of the sources (no `build/` left in the repo, no stale files from an
earlier build) and installed with --no-deps into a new venv that sees the dependencies already in
this interpreter's site-packages through a `.pth` line, but not the repo's editable dpokit (a plain
path line in a .pth does not run that site-packages' own .pth files, so the editable finder never
loads). Then, from a folder outside the repo, it runs `dpokit config`, `dpokit config --preset lora`,
`dpokit train my.yaml` on a user's own file with the `tiny-random-llama` alias, `dpokit train --preset
tiny` on the packaged data and `dpokit demo --quick` on the tiny model.

    python -m pytest -p no:cacheprovider --runslow tests/integration/test_wheel.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from dpokit.config import Config

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the sources; checks what it ships."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "dpokit", src / "dpokit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src], cwd=tmp)
    (wheel,) = wheels.glob("dpokit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(src).as_posix() for p in (src / "dpokit").rglob("*") if p.is_file()}
    assert shipped - names == set(), "files of the package missing from the wheel"
    assert {"dpokit/assets/presets/tiny.yaml", "dpokit/assets/data/reviews/README.md",
            "dpokit/assets/tiny_tokenizer/tokenizer.json"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(("configs/", "data/", "tests/", "dpokit/configs"))]
    return wheel


def _install(tmp: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    """A new venv holding only the wheel, plus a .pth line to this interpreter's site-packages."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # installed before the .pth exists, so pip sees a bare environment (and never the editable dpokit)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", wheel], cwd=tmp)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    (Path(purelib) / "_dpokit_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "DPOKIT_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp / "mpl"), "MPLBACKEND": "Agg",
    })  # fmt: skip
    return venv, env


def _write_user_files(work: Path) -> Path:
    """A user's own preference file and config, with paths relative to the folder they run in."""
    rows = [
        {"prompt": f"Is {thing} worth it?", "chosen": f"Yes, {thing} is great.", "rejected": f"No, {thing} is bad."}
        for thing in ["tea", "rain", "a walk", "this book", "the sea", "jazz", "a nap", "soup"] * 2
    ]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {"train_files": ["pairs.jsonl"], "max_length": 64, "max_prompt_length": 32},
        "train": {"output_dir": "out", "max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1,
                  "progress_bar": False},
    }  # fmt: skip
    (work / "my.yaml").write_text(yaml.safe_dump(config))
    return work / "my.yaml"


def _loss_steps(metrics: Path) -> list[int]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_installed_wheel_works_from_any_folder(tmp_path: Path) -> None:
    venv, env = _install(tmp_path, _build_wheel(tmp_path))
    work = tmp_path / "work"  # outside the repo: nothing may resolve against the repo's files
    work.mkdir()
    dpokit = venv / "bin" / "dpokit"
    probe = "import json, sys, dpokit, torch; print(json.dumps([dpokit.__file__, [m for m in sys.modules if 'editable' in m]]))"
    where, editable = json.loads(_run([venv / "bin" / "python", "-c", probe], cwd=work, env=env))
    assert Path(where).is_relative_to(venv) and editable == [], (where, editable)

    assert Config.from_dict(yaml.safe_load(_run([dpokit, "config"], cwd=work, env=env))) == Config()
    lora = yaml.safe_load(_run([dpokit, "config", "--preset", "lora"], cwd=work, env=env))
    assert Config.from_dict(lora) == Config.from_preset("lora")
    listed = _run([dpokit, "config", "--list-presets"], cwd=work, env=env)
    assert [line.split()[0] for line in listed.splitlines()] == ["demo", "full", "iterate-reviews", "iterate-tiny", "kto-tiny", "lora", "reward-reviews", "reward-tiny", "rl-reviews", "rl-tiny", "sft-reviews", "sft-tiny", "tiny"]

    _write_user_files(work)
    out = _run([dpokit, "train", "my.yaml"], cwd=work, env=env)
    assert "done: 3 steps" in out
    assert _loss_steps(work / "out" / "metrics.jsonl") == [1, 2, 3] and (work / "out" / "model.safetensors").is_file()

    # a preset on the packaged (builtin:) data, with its held-out evaluation at the end
    _run([dpokit, "train", "--preset", "tiny", "train.output_dir=tiny", "train.max_steps=2", "train.micro_batch_size=2",
          "train.progress_bar=false"], cwd=work, env=env)  # fmt: skip
    assert (work / "tiny" / "config.yaml").is_file() and (work / "tiny" / "metrics.jsonl").is_file()

    # the demo on its packaged reviews data, with the tiny model instead of SmolLM2
    _run([dpokit, "demo", "--quick", "--out", "demo", "model.name_or_path=tiny-random-llama",
          "train.progress_bar=false"], cwd=work, env=env)  # fmt: skip
    for name in ("report.md", "results.json", "training_curves.png", "model/adapter_model.safetensors"):
        assert (work / "demo" / name).is_file(), name
    assert [s["name"] for s in json.loads((work / "demo" / "results.json").read_text())["stages"]] == ["base", "mid", "final"]
