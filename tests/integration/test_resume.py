"""Interrupted runs: a run killed (SIGKILL) or stopped (SIGTERM) at a random step and resumed with
train.resume=auto ends with the same weights, bit for bit, and the same metrics.jsonl rows as an
uninterrupted run; corrupt checkpoints are skipped; hopeless output folders are refused up front.

The CLI runs in subprocesses (a SIGKILL must hit a real process) with one thread, so the CPU
float32 maths is reproducible from process to process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.training.checkpoint import CHECKPOINTS, WEIGHTS, list_checkpoints
from dpokit.training.outputs import COMPLETE
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STEPS = 20


def _args(model_dir: Path, out: Path, *overrides: str) -> list[str]:
    # log_every=3 leaves metric sums half-accumulated in most checkpoints; eval_every=7 adds eval rows
    return ["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{TOY / 'train.jsonl'}]", f"data.eval_files=[{TOY / 'eval.jsonl'}]",
            f"train.max_steps={STEPS}", "train.log_every=3", "train.eval_every=7", "train.save_every=1",
            "train.progress_bar=false", *overrides]


def _start(model_dir: Path, out: Path, *overrides: str) -> subprocess.Popen:
    log = (out.parent / f"{out.name}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "dpokit", *_args(model_dir, out, *overrides)],
                            cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _run(model_dir: Path, out: Path, *overrides: str) -> str:
    proc = _start(model_dir, out, *overrides)
    code = proc.wait(timeout=300)
    text = _log(out)
    assert code == 0, text
    return text


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _newest_step(out: Path) -> int:
    found = list_checkpoints(out / CHECKPOINTS)
    return found[-1][0] if found else 0


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _assert_same_run(got: Path, want: Path) -> None:
    a, b = load_file(str(got / WEIGHTS)), load_file(str(want / WEIGHTS))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"
    rows_got, rows_want = _rows(got), _rows(want)
    assert [r["step"] for r in rows_got] == [r["step"] for r in rows_want]
    for r, w in zip(rows_got, rows_want):
        assert r.keys() == w.keys(), (r, w)
        for k in r:
            if k != "tokens_per_sec":  # wall-clock speed is the one value allowed to differ
                assert r[k] == w[k], (r["step"], k, r[k], w[k])


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    _run(tiny_model_dir, out)
    assert len(_rows(out)) >= 8 and len(list_checkpoints(out / CHECKPOINTS)) == 2  # keep_checkpoints default
    return out


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    kill_at = random.Random().randint(2, STEPS - 4)  # a new step every time; shown when an assert fails
    out = tmp_path / "killed"
    proc = _start(tiny_model_dir, out)
    _wait_for(proc, lambda: _newest_step(out) >= kill_at, f"checkpoint {kill_at}")
    proc.send_signal(signal.SIGKILL)  # no handler runs: mid-step, maybe mid-checkpoint
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = _newest_step(out)
    assert killed_at < STEPS and not (out / "summary.json").exists(), "the run finished before the kill"

    text = _run(tiny_model_dir, out, "train.resume=auto")
    assert f"resumed from {out / CHECKPOINTS}" in text, text
    _assert_same_run(out, uninterrupted)
    assert not [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".")], "staging folders left over"
    print(f"killed at step {killed_at} (asked {kill_at}); resumed run matches bit for bit")


def test_sigterm_saves_a_checkpoint_and_exits_with_how_to_resume(
    tiny_model_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stopped"
    proc = _start(tiny_model_dir, out, "train.save_every=0")  # the only checkpoint is the signal's
    _wait_for(proc, lambda: len(_rows(out)) >= 1, "the first metrics row")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = _log(out)
    assert "SIGTERM: stopping after this step" in text and "train.resume=auto" in text, text
    assert "Traceback" not in text, text
    (step, _), = list_checkpoints(out / CHECKPOINTS)
    assert 3 <= step < STEPS and not (out / "summary.json").exists()

    _run(tiny_model_dir, out, "train.resume=auto")
    _assert_same_run(out, uninterrupted)


def test_a_corrupt_newest_checkpoint_is_refused_and_the_previous_one_used(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3", "data.eval_files=[]"]
    assert main([*_args(tiny_model_dir, out), *common]) == 0
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    newest = out / CHECKPOINTS / "step-00000006" / WEIGHTS
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated safetensors
    (out / COMPLETE).unlink()  # as if killed after the last checkpoint: a finished run is not resumed
    capsys.readouterr()

    assert main([*_args(tiny_model_dir, out), *common, "train.resume=auto"]) == 0
    text = capsys.readouterr().out
    assert "step-00000006 is corrupt: model.safetensors has" in text and "trying the previous checkpoint" in text
    assert "step-00000004 (step 4 of 6)" in text, text
    _assert_same_run(out, reference)


def test_resume_with_nothing_to_resume_starts_fresh(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fresh"
    assert main([*_args(tiny_model_dir, out), "train.max_steps=2", "data.eval_files=[]", "train.resume=auto"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert [r["step"] for r in _rows(out)] == [2]


def test_too_little_disk_for_a_checkpoint_is_refused_before_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "full_disk"
    assert main(_args(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "for one checkpoint" in err and "MiB" in err, err
    assert not (out / "metrics.jsonl").exists() and not (out / CHECKPOINTS).exists()


def test_unwritable_output_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    assert main(["train", str(PRESETS / "tiny.yaml"), f"train.output_dir={blocker / 'run'}"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.yaml").write_text("{}")
    assert main(_args(tiny_model_dir, out)) == 2
    assert "train.resume=auto" in capsys.readouterr().err


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    common = ["lora.enabled=true", "lora.r=4", "train.lr=5e-3", "train.max_steps=6", "train.save_every=3",
              "data.eval_files=[]"]
    assert main([*_args(tiny_model_dir, out), *common]) == 0
    saved = load_file(str(out / CHECKPOINTS / "step-00000003" / WEIGHTS))
    assert saved and all("lora_" in k for k in saved)  # trainable parameters only: the adapters
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    shutil.rmtree(out / CHECKPOINTS / "step-00000006")  # as if killed between steps 3 and 6
    (out / COMPLETE).unlink()  # ... so the run is not finished (else resume=auto trains nothing)
    (out / "adapter_model.safetensors").unlink()  # the resumed run must write it again

    assert main([*_args(tiny_model_dir, out), *common, "train.resume=auto"]) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def drop_speed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]

    assert drop_speed(_rows(out)) == drop_speed(_rows(reference))


_OUT_OF_MEMORY = """
import resource, sys
from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.training.hooks import Hook
from dpokit.training.loop import train


def vmsize():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))


class LimitAddressSpace(Hook):
    # In step 2 (after step 1's checkpoint): 8 MiB of address space left, and the step needs 64 MiB
    # more (a tensor the size of a big activation, allocated inside the step).

    def on_micro_batch(self, step, examples):
        if step == 2:
            import torch

            resource.setrlimit(resource.RLIMIT_AS, (vmsize() + 8 * 2**20, resource.RLIM_INFINITY))
            torch.empty(64 * 2**20, dtype=torch.uint8)


cfg = Config.from_preset("tiny").override(sys.argv[1:])
try:
    train(cfg, hooks=[LimitAddressSpace()])
except DpokitError as exc:
    print("DpokitError:", exc)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc: Linux")
def test_out_of_memory_in_a_step_keeps_the_last_checkpoint_and_says_what_to_change(tmp_path: Path) -> None:
    """An allocation failure mid-step (simulated: the address space capped in a subprocess) ends the
    run with one message: the step, the checkpoint it can resume from, the settings that use less."""
    script = tmp_path / "oom.py"
    script.write_text(_OUT_OF_MEMORY)
    out = tmp_path / "run"
    args = [f"train.output_dir={out}", "model.name_or_path=tiny-random-llama", "data.eval_files=[]",
            "train.max_steps=3", "train.save_every=1", "train.micro_batch_size=64", "data.max_length=64"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    message = proc.stdout
    assert "DpokitError: out of memory in step 2 on cpu (" in message, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "can't allocate memory" in message
    assert f"The last checkpoint, {out / CHECKPOINTS / 'step-00000001'} (step 1), is kept" in message
    assert "train.micro_batch_size=32 train.grad_accum_steps=2 (the same pairs per step)" in message
    assert "train.gradient_checkpointing=true" in message and "reference.precompute=true" in message
    assert "The memory plan estimated " in message and "activations " in message  # the plan's numbers
    assert [step for step, _ in list_checkpoints(out / CHECKPOINTS)] == [1]
