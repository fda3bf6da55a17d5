"""A run whose writes fail: an I/O error (ENOSPC, EIO, EROFS) injected into each writer of a real
training run, a real full disk (a tmpfs, where the machine allows mounting one), a second writer on
the same folder. Each failure ends the run with one message (what failed, the last complete step,
the resume command), exit status 74 and no traceback; no temporary file is left; and
`train.resume=auto` then ends with the same weights, bit for bit, and the same metrics rows as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import faults
from dpokit.cli import main
from dpokit.training.checkpoint import CHECKPOINTS, list_checkpoints
from dpokit.training.outputs import COMPLETE, LOCK
from tests.conftest import PRESETS, TOY

STEPS = 8


def _args(model_dir: Path, out: Path, *overrides: str) -> list[str]:
    # save_every=3: checkpoints at 3, 6 and the last step (8); log_every=2 leaves half-accumulated sums
    return ["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{TOY / 'train.jsonl'}]", f"data.eval_files=[{TOY / 'eval.jsonl'}]",
            f"train.max_steps={STEPS}", "train.log_every=2", "train.eval_every=4", "train.save_every=3",
            "train.progress_bar=false", *overrides]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


def _assert_same_run(got: Path, want: Path) -> None:
    a, b = load_file(str(got / "model.safetensors")), load_file(str(want / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ"
    assert _rows(got) == _rows(want)
    assert (got / COMPLETE).is_file()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name.startswith(".") and p.name != LOCK)


@pytest.fixture(autouse=True)
def _disarmed():
    faults.arm("")
    yield
    faults.arm("")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("write_faults") / "uninterrupted"
    assert main(_args(tiny_model_dir, out)) == 0
    return out


# (fault, what the message says failed, the last complete step it names)
CASES = [
    ("checkpoint.file:optimizer.pt#2:enospc", r"the checkpoint of step 6 \(.*/\.tmp-step-00000006/optimizer\.pt\): "
     "No space left on device", 3),
    ("metrics.write#3:eio", r"metrics\.jsonl \(the row of step 6\) \(.*metrics\.jsonl\): Input/output error", 3),
    ("final.file:model.safetensors:erofs", r"the final model \(.*/\.tmp-final/model\.safetensors\): Read-only file system", 8),
    ("final.marker:enospc", r"the completion marker \(.*run_complete\.json\): No space left on device", 8),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "what", "kept"), CASES, ids=[c[0] for c in CASES])
def test_an_io_error_in_each_writer_stops_cleanly_and_resume_is_bitwise(
    tiny_model_dir: Path, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture, fault: str, what: str,
    kept: int,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    faults.arm(fault)
    assert main(_args(tiny_model_dir, out)) == 74
    err = capsys.readouterr().err
    assert re.search(f"^error: could not write {what}\\. The partial files were removed\\. The last complete "
                     f"checkpoint, .*step-{kept:08d} \\(step {kept}\\), is intact; [0-9.]+ MiB free there now\\. Free "
                     "some space or fix the disk, then continue with train.resume=auto: dpokit train .* "
                     "train.resume=auto$", err.strip().splitlines()[-1]), err  # fmt: skip
    assert "Traceback" not in err and not _leftovers(out), _leftovers(out)
    assert not (out / COMPLETE).exists()

    faults.arm("")
    assert main([*_args(tiny_model_dir, out), "train.resume=auto"]) == 0
    text = capsys.readouterr().out
    if kept == STEPS:  # the training had finished: the save is finished, nothing is trained again
        assert "training had finished (step 8 of 8) but the final save had not; finishing it" in text
        assert all("eval/loss" in line for line in text.splitlines() if line.startswith("step "))  # no training row
    _assert_same_run(out, uninterrupted)


def test_a_second_writer_is_refused_while_the_first_lives(tiny_model_dir: Path, uninterrupted: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Two `dpokit train` on one folder (the second with train.resume=auto): the second is refused, naming
    the first's pid and host; once the first is gone (killed), its lock is taken over and the run goes on."""
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; from dpokit.training.outputs import OutputLock; "
            "OutputLock.acquire(Path(sys.argv[1])).record_holder(); print('held', flush=True); time.sleep(300)")  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        assert main([*_args(tiny_model_dir, out), "train.resume=auto"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another dpokit run (pid {first.pid} on host " in err, err
        assert not (out / "metrics.jsonl").exists()
    finally:
        first.kill()
        first.wait()
    assert main([*_args(tiny_model_dir, out), "train.resume=auto"]) == 0
    assert f"took over the lock of {out} from a run that did not end cleanly (pid {first.pid}" in capsys.readouterr().out
    _assert_same_run(out, uninterrupted)


# ---- a real full disk ---------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `where`; the reason it could not be done, or None."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs Linux, root and mount(8) to mount a small tmpfs"
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)  # fmt: skip
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_a_real_full_disk_mid_run(tiny_model_dir: Path, uninterrupted: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A tmpfs with room for one checkpoint of the tiny model (2.5 MB), not two: the second checkpoint
    fails with the disk's own error; its staging folder is removed. The user frees space (the tmpfs is
    grown) but a stale staging folder from an older crash fills it again: the resume removes that
    folder before its disk check and finishes the run, bitwise equal to the uninterrupted one."""
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "4m")
    if reason is not None:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    try:
        out = disk / "run"
        assert main(_args(tiny_model_dir, out)) == 74
        err = capsys.readouterr().err
        with capsys.disabled():  # the message, for the record (-s shows it)
            print(err.strip().splitlines()[-1])
        assert "error: could not write the checkpoint of step 6 (" in err and "Traceback" not in err, err
        assert "): No space left on device (" in err, err  # torch's "unexpected pos", named for what it is
        assert "The last complete checkpoint, " in err and "(step 3), is intact" in err
        assert "continue with train.resume=auto: dpokit train " in err
        assert [s for s, _ in list_checkpoints(out / CHECKPOINTS)] == [3] and not _leftovers(out)

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        stale = out / CHECKPOINTS / ".tmp-step-00000006"  # what a crashed save leaves: it fills the disk again
        stale.mkdir()
        with (stale / "optimizer.pt").open("wb") as fh, pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 2**20)
                fh.flush()
        assert shutil.disk_usage(disk).free < 2**20
        assert main([*_args(tiny_model_dir, out), "train.resume=auto"]) == 0
        assert "removed 1 temporary file(s) left in" in capsys.readouterr().out
        _assert_same_run(out, uninterrupted)
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)  # something still holds it: detach it
