"""Faults while writing, unit by unit: the fault points, the classification of I/O errors, an
`OSError(ENOSPC)` raised from each writer in turn (checkpoint files, metrics, the skipped rows, the final
save, the completion marker, the reference cache), stale temporary files, the output folder's lock, the repair
of a torn metrics.jsonl, and readers refusing an unfinished run."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dpokit import faults
from dpokit.data.pairs import write_skipped
from dpokit.errors import DpokitError, WriteError, io_reason, writing
from dpokit.fileio import unfinished_run
from dpokit.models import refcache
from dpokit.models.sources import resolve_source
from dpokit.training import checkpoint as C
from dpokit.training import metrics as M
from dpokit.training import outputs as O


@pytest.fixture(autouse=True)
def _disarmed():
    faults.arm("")
    yield
    faults.arm("")


def _objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _save(root: Path, step: int) -> Path:
    """A checkpoint written as the loop writes one: a failed write discards the staging folder."""
    model, opt, sched = _objects()
    tmp = C.begin(root, step)
    try:
        C.write_rng(tmp, 0)
    except WriteError:
        C.discard(tmp)
        raise
    return C.write_and_publish(tmp, step, model, opt, sched, {"step": step}, "train: {}\n", world_size=1, keep=3)


# ---- the fault points ---------------------------------------------------------------------------
def test_fault_specs_parse_and_fire_on_the_named_hit_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    (f,) = faults.parse("checkpoint.file:optimizer.pt#3:torn@1")
    assert (f.point, f.hit, f.action, f.rank) == ("checkpoint.file:optimizer.pt", 3, "torn", 1)
    assert [(g.point, g.hit, g.action) for g in faults.parse("step.optimizer ; metrics.write#2:enospc")] == [
        ("step.optimizer", 1, "kill"), ("metrics.write", 2, "enospc")]
    for bad in ("no.such.point", "step.optimizer#x", "metrics.write:explode"):
        with pytest.raises(ValueError, match="DPOKIT_FAULT"):
            faults.parse(bad)

    faults.arm("metrics.write#2:eio")
    faults.reach("metrics.write")  # the 1st reach: nothing
    faults.reach("step.optimizer")  # another point: not counted
    with pytest.raises(OSError) as info:
        faults.reach("metrics.write", "/x/metrics.jsonl")
    assert info.value.errno == errno.EIO and info.value.filename == "/x/metrics.jsonl"
    faults.reach("metrics.write")  # fired once only

    monkeypatch.setenv("RANK", "0")
    faults.arm("checkpoint.file:*:enospc@1")  # a prefix, on rank 1 only
    faults.reach("checkpoint.file:rng-0.pt")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError, match="No space left on device"):
        faults.reach("checkpoint.file:rng-1.pt")


def test_torn_cuts_half_of_what_was_written_then_kills(tmp_path: Path) -> None:
    """In a child process: the file keeps its first 10 + 3 of 6 appended bytes; the process dies by SIGKILL."""
    target = tmp_path / "metrics.jsonl"
    target.write_text("0123456789abcdef")
    code = ("from dpokit import faults; faults.arm('metrics.write:torn'); "
            f"faults.reach('metrics.write', {str(target)!r}, 6); print('survived')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and "survived" not in proc.stdout
    assert target.read_text() == "0123456789abc"


# ---- what counts as an I/O failure --------------------------------------------------------------
def test_io_reason_knows_each_writers_words_and_lets_bugs_through() -> None:
    assert io_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"
    assert io_reason(OSError(errno.EROFS, os.strerror(errno.EROFS))) == "Read-only file system"
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2368 vs 2256")
    assert "unexpected pos" in io_reason(torch_zip) and "disk may be full" in io_reason(torch_zip)
    stream = RuntimeError("basic_ios::clear: iostream error")
    assert "iostream error" in io_reason(stream)
    safetensors_err = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                'message: "No space left on device" })')  # fmt: skip
    assert io_reason(safetensors_err) == "No space left on device"
    assert io_reason(ValueError("shapes do not match")) is None
    assert io_reason(torch_zip, "/").endswith("(the disk may be full or failing)")  # this disk has room


def test_torchs_unexpected_pos_on_a_nearly_full_disk_is_called_a_full_disk(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=800 * 1024))
    reason = io_reason(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 875200 vs 875088"),
                       tmp_path / "not" / "yet" / "optimizer.pt")  # fmt: skip
    assert reason == ("No space left on device (0.8 MiB free; the writer said: [enforce fail at inline_container.cc:672]"
                      " . unexpected pos 875200 vs 875088)")  # fmt: skip
    assert io_reason(RuntimeError("CUDA error: device-side assert")) is None


def test_writing_names_what_and_where_and_passes_other_errors(tmp_path: Path) -> None:
    with pytest.raises(WriteError) as info:
        with writing("metrics.jsonl", tmp_path / "metrics.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))
    err = info.value
    assert str(err) == f"could not write metrics.jsonl ({tmp_path / 'metrics.jsonl'}): No space left on device"
    assert WriteError.exit_code == 74 and isinstance(err, DpokitError)
    assert str(err.elaborate(then="Go on")).endswith("No space left on device. Go on")
    with pytest.raises(KeyError):
        with writing("metrics.jsonl", tmp_path):
            raise KeyError("a bug, not a disk")


# ---- each writer, with the disk full ------------------------------------------------------------
CHECKPOINT_FILES = ["rng-0.pt", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.pt",
                    "config.yaml", "meta.json"]  # fmt: skip


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_enospc_in_each_checkpoint_file_removes_the_staging_folder_and_keeps_the_last(tmp_path: Path, name: str) -> None:
    root = tmp_path / "checkpoints"
    first = _save(root, 1)
    faults.arm(f"checkpoint.file:{name}:enospc")
    with pytest.raises(WriteError) as info:
        _save(root, 2)
    assert info.value.path.endswith(f".tmp-step-00000002/{name}") and info.value.reason == "No space left on device"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no staging folder holds the space
    assert C.load_checkpoint(first).step == 1


@pytest.mark.parametrize("raised", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2368 vs 2256"),
    RuntimeError("basic_ios::clear: iostream error"),
])  # fmt: skip
def test_torch_writers_own_errors_for_a_full_disk_are_write_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   raised: Exception) -> None:  # fmt: skip
    """torch.save on a full disk raises RuntimeError, not OSError (the words of the issue's traceback)."""
    monkeypatch.setattr(C.torch, "save", lambda *a, **k: (_ for _ in ()).throw(raised))
    with pytest.raises(WriteError, match="disk may be full"):
        _save(tmp_path / "checkpoints", 1)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_a_bug_in_a_writer_is_not_dressed_as_a_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.save

    def save(obj: object, f: Path) -> None:  # the optimizer state fails to pickle; the other files are fine
        if Path(f).name == "optimizer.pt":
            raise TypeError("cannot pickle 'x'")
        real(obj, f)

    monkeypatch.setattr(C.torch, "save", save)
    with pytest.raises(TypeError):
        _save(tmp_path / "checkpoints", 1)
    assert not any((tmp_path / "checkpoints").iterdir())  # the partial folder is removed all the same


def test_enospc_in_the_metrics_writer(tmp_path: Path) -> None:
    logger = M.MetricsLogger(tmp_path, [])
    logger.log(1, {"loss": 0.5})
    faults.arm("metrics.write:enospc")
    with pytest.raises(WriteError, match=r"could not write metrics.jsonl \(the row of step 2\)"):
        logger.log(2, {"loss": 0.4})


def test_enospc_writing_the_skipped_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(WriteError, match=r"could not write the list of skipped rows .*skipped.jsonl.*No space left"):
        write_skipped(tmp_path / "skipped.jsonl", [{"file": "a.jsonl", "line": 3, "error": "no 'chosen'"}])


@pytest.mark.parametrize("point", ["final.file:model.bin", "final.publish"])
def test_enospc_in_the_final_save_leaves_no_staging_folder(tmp_path: Path, point: str) -> None:
    def write(stage: Path) -> dict[str, str]:
        (stage / "model.bin").write_bytes(b"w" * 100)
        (stage / "config.json").write_text("{}")
        return {"model": str(stage)}

    faults.arm(f"{point}:enospc")
    with pytest.raises(WriteError, match="could not write the final model"):
        O.write_final(tmp_path, write)
    assert not (tmp_path / O.FINAL_STAGING).exists()
    faults.arm("")
    assert O.write_final(tmp_path, write) == {"model": str(tmp_path)}
    assert (tmp_path / "model.bin").read_bytes() == b"w" * 100 and not (tmp_path / O.FINAL_STAGING).exists()


def test_enospc_writing_the_completion_marker(tmp_path: Path) -> None:
    faults.arm("final.marker:enospc")
    with pytest.raises(WriteError, match="could not write the completion marker"):
        O.mark_complete(tmp_path, 3, {})
    assert O.read_completion(tmp_path) is None
    faults.arm("")
    O.mark_complete(tmp_path, 3, {})
    assert O.read_completion(tmp_path).steps == 3


def test_enospc_in_the_reference_cache_warns_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is an optimisation outside the run folder: the numbers are in memory, so a full cache
    disk is a warning (no traceback), never a lost run; the temporary file is removed."""

    def full(*args, **kwargs):
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    table = refcache.RefTable(torch.zeros(2), torch.zeros(2), torch.ones(2, 2, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert refcache.save_table(tmp_path / "k.safetensors", table, {}, "k") is False
    assert any("No space left on device" in str(w.message) for w in caught)
    assert list(tmp_path.iterdir()) == []


# ---- stale temporary files ----------------------------------------------------------------------
def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    ckpts = tmp_path / C.CHECKPOINTS
    (ckpts / ".tmp-step-00000010").mkdir(parents=True)
    (ckpts / ".tmp-step-00000010" / "optimizer.pt").write_bytes(b"x" * 2048)
    (ckpts / ".old-step-00000005").mkdir()
    (ckpts / "step-00000005").mkdir()
    (tmp_path / O.FINAL_STAGING).mkdir()
    (tmp_path / O.FINAL_STAGING / "model.safetensors").write_bytes(b"y" * 1024)
    for name in (".run_complete.json.tmp", ".metrics.jsonl.tmp", ".dpokit_write_test-123", "notes.tmp", "mine.txt"):
        (tmp_path / name).write_text("z")
    removed = dict(O.remove_stale(tmp_path))
    assert removed == {"checkpoints/.old-step-00000005": 0, "checkpoints/.tmp-step-00000010": 2048,
                       ".dpokit_write_test-123": 1, ".metrics.jsonl.tmp": 1, ".run_complete.json.tmp": 1,
                       ".tmp-final": 1024}  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "mine.txt", "notes.tmp"]  # the user's
    assert [p.name for p in ckpts.iterdir()] == ["step-00000005"]


# ---- one writer per folder ----------------------------------------------------------------------
_HOLD = """
import sys, time
from pathlib import Path
from dpokit.training.outputs import OutputLock
lock = OutputLock.acquire(Path(sys.argv[1]))
lock.record_holder()
print("held", flush=True)
time.sleep(120)
"""


def test_the_lock_refuses_a_second_writer_and_is_taken_over_from_a_killed_one(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DpokitError) as info:
            O.OutputLock.acquire(tmp_path)
        message = str(info.value)
        assert f"is in use by another dpokit run (pid {holder.pid} on host {socket.gethostname()}, since " in message
    finally:
        holder.kill()  # SIGKILL: no clean release; the kernel drops the lock, the file keeps its name
        holder.wait()
    assert json.loads((tmp_path / O.LOCK).read_text())["pid"] == holder.pid
    lock = O.OutputLock.acquire(tmp_path)
    lock.record_holder()
    assert f"took over the lock of {tmp_path} from a run that did not end cleanly (pid {holder.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / O.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / O.LOCK).read_text() == ""  # a clean release: the next run takes it silently
    O.OutputLock.acquire(tmp_path).release()
    assert "took over" not in capsys.readouterr().out


def test_only_rank_0_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpokit.config import Config

    cfg = Config.from_preset("tiny").override([f"train.output_dir={tmp_path / 'run'}"])
    monkeypatch.setenv("RANK", "1")
    claim = O.prepare(cfg)
    assert claim.lock is None and not (tmp_path / "run" / O.LOCK).exists()
    monkeypatch.setenv("RANK", "0")
    claim0 = O.prepare(cfg)
    assert claim0.lock is not None
    claim0.release()


# ---- metrics.jsonl cut short --------------------------------------------------------------------
@pytest.mark.parametrize("tail", ['{"step": 4, "lo', '{"step": 4, "loss": 0.1}'])  # no newline: both cut
def test_a_torn_last_metrics_row_is_repaired(tmp_path: Path, tail: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(rows) + tail)
    M.truncate_metrics(path, 3)
    assert path.read_text() == "".join(rows)
    assert "its last line was cut short" in capsys.readouterr().out
    M.truncate_metrics(path, 2)
    assert path.read_text() == "".join(rows[:2])


# ---- readers trust only a finished run ----------------------------------------------------------
def test_an_unfinished_run_is_not_read_as_a_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "config.json", "merged/config.json"):
        (run / name).write_text("{}")
    assert unfinished_run(run) and unfinished_run(run / "merged")
    with pytest.raises(DpokitError, match="a dpokit run that did not finish"):
        resolve_source(run)
    (run / O.COMPLETE).write_text("{}")
    assert not unfinished_run(run) and not unfinished_run(run / "merged")
    assert resolve_source(run).path == run.resolve()


def test_enospc_from_the_tokenizer_writer_in_the_final_save(tmp_path: Path) -> None:
    """The tokenizer is written by `tokenizers` / transformers: its OSError is a WriteError of the final
    save too, and the staging folder (holding the model already written) is removed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.models.sources import save_pretrained_clean

    class FullDiskTokenizer:
        def save_pretrained(self, folder: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{folder}/tokenizer.json")

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(WriteError) as info:
        O.write_final(tmp_path, lambda stage: {"model": str(save_pretrained_clean(model, FullDiskTokenizer(), stage))})
    assert str(info.value).startswith(f"could not write the final model ({tmp_path / O.FINAL_STAGING}/tokenizer.json): "
                                      "No space left on device")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []
