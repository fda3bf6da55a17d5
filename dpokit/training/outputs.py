"""The output folder's life: claimed at the start, cleaned for `overwrite`, marked complete at the end.

`train.output_dir` holds one run: its model files, `config.yaml`, `metrics.jsonl`, `checkpoints/`.
This module decides what may be written there and when a run in it counts as finished:

* `prepare` refuses a folder holding another run (unless `train.overwrite` or a resume), takes the
  folder's lock (`LOCK`: one writer per folder, for the run's life; a lock left by a killed process
  is taken over), removes the temporary files of killed or failed saves, removes the previous run's
  files under `train.overwrite=true` (only names dpokit writes, so a user's own files in the folder
  survive) and checks the folder is writable;
* `write_final` writes the final model, its cards and `summary.json` into a staging folder
  (`.tmp-final`), then renames each file into place: a reader never sees half a file;
* `discard_if_unused` removes a folder this run created when set-up fails before training (a bad
  model path must not leave an empty run folder behind);
* `COMPLETE` (`run_complete.json`) is written last, after the final save: a run without it did not
  finish (readers trust only a completed output), and `train.resume=auto` on a completed run says so
  and stops instead of training again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit import faults
from dpokit.config import Config
from dpokit.dist import launched_rank
from dpokit.errors import DpokitError, WriteError, writing
from dpokit.fileio import RUN_COMPLETE, fsync, fsync_dir, tree_size, write_synced
from dpokit.training import checkpoint as ckpt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock is advisory there (pid check only)
    fcntl = None  # type: ignore[assignment]

COMPLETE = RUN_COMPLETE
LOCK = ".dpokit.lock"  # the output folder's lock: {"pid", "host", "since"} of the run writing it
FINAL_STAGING = ".tmp-final"  # the final save is assembled here, then its files are renamed into place

# Everything dpokit writes into an output folder (files, and folders it owns entirely). `overwrite`
# removes these and nothing else.
_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "skipped.jsonl", "skipped_eval.jsonl", COMPLETE, "README.md",
    "train_data.jsonl", "eval_data.jsonl",
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json",
)  # fmt: skip
_GLOBS = ("model-*-of-*.safetensors",)
_FOLDERS = (ckpt.CHECKPOINTS, "merged", "tensorboard", "wandb")


@dataclass
class Completion:
    """What `run_complete.json` records."""

    steps: int
    finished: str  # local time, ISO format
    written: dict[str, str]


def read_completion(out: Path) -> Completion | None:
    """The completion record of the run in `out`, or None when it did not finish (or is unreadable)."""
    try:
        raw = json.loads((out / COMPLETE).read_text(encoding="utf-8"))
        return Completion(int(raw["steps"]), str(raw["finished"]), dict(raw.get("written", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_complete(out: Path, steps: int, written: dict[str, str]) -> None:
    """Write the completion marker, atomically, after everything else of the run is on disk."""
    record = {"steps": steps, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "written": written}
    tmp = out / f".{COMPLETE}.tmp"
    with writing("the completion marker", out / COMPLETE):
        faults.reach("final.marker", out / COMPLETE)
        write_synced(tmp, json.dumps(record, indent=2))
        os.replace(tmp, out / COMPLETE)


# ---- the final save ----------------------------------------------------------------------------
def write_final(out: Path, write: Callable[[Path], dict[str, str]]) -> dict[str, str]:
    """The final save, atomic file by file: `write(stage)` writes the run's final files into the
    staging folder as if it were `out` (returning the objective's `written` folders under it); each
    file is fsynced, then renamed to the same place under `out` (``config.json`` last, so a folder
    that transformers can load has its weights already). Returns `written` under `out`. An I/O
    failure removes the staging folder and raises a WriteError."""
    stage = out / FINAL_STAGING
    shutil.rmtree(stage, ignore_errors=True)
    try:
        with writing("the final model", stage):
            stage.mkdir()
            written = write(stage)
            files = sorted((f for f in stage.rglob("*") if f.is_file()), key=lambda f: (f.name == "config.json", str(f)))
            for f in files:
                fsync(f)
                faults.reach(f"final.file:{f.relative_to(stage).as_posix()}", f, f.stat().st_size)
            for i, f in enumerate(files):
                target = out / f.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
                if i == 0:
                    faults.reach("final.publish", target)
            fsync_dir(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return final_paths(written, stage, out)


def final_paths(written: dict[str, str], stage: Path, out: Path) -> dict[str, str]:
    """The objective's `written` folders (under `stage`) as they are after publishing (under `out`)."""
    return {kind: str(out / Path(folder).relative_to(stage)) for kind, folder in written.items()}


def write_failure(exc: WriteError, out: Path) -> WriteError:
    """`exc` completed with what a user needs next: what is kept (the last complete checkpoint, or
    none), the free space now, and how to go on (the CLI adds the exact command)."""
    saved = ckpt.list_checkpoints(out / ckpt.CHECKPOINTS)
    kept = (f"The last complete checkpoint, {saved[-1][1]} (step {saved[-1][0]}), is intact" if saved
            else "No checkpoint had been written yet (the run starts again from step 0)")  # fmt: skip
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "the free space could not be read"
    return exc.elaborate(then=f"The partial files were removed. {kept}; {free}. Free some space or fix the disk, "
                              "then continue with train.resume=auto")


def finished_message(out: Path, done: Completion) -> str:
    return (
        f"train.output_dir {out} holds a finished run ({done.steps} steps, completed {done.finished}); "
        "nothing to resume. To train again there, pass train.overwrite=true; to continue training its model, "
        f"start a new run with model.name_or_path={out}"
    )


@dataclass
class Claim:
    """An output folder this process may write: whether it created it, and the lock it holds
    (None on the other processes of a multi-process run: rank 0 holds it for all)."""

    out: Path
    created: bool
    lock: OutputLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """The run's set-up: on any failure the claim is released and a folder this run created is
        removed if nothing was written into it; a failed write says what is kept and how to go on."""
        try:
            yield
        except BaseException as exc:
            discard_if_unused(self)
            if isinstance(exc, WriteError):
                raise write_failure(exc, self.out) from None
            raise

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The run's steps and final save: a failed write says what is kept and how to go on; the
        claim is released however the block ends."""
        try:
            yield
        except WriteError as exc:  # a full disk, an I/O error: what failed, what is kept, how to go on
            raise write_failure(exc, self.out) from None
        finally:
            self.release()


def prepare(cfg: Config) -> Claim:
    """Claim the output folder: refuse another run's folder unless train.overwrite (which first
    removes that run's files) or a resume; take its lock; remove stale temporary files; check that
    it is writable. The caller releases the claim when the run ends."""
    out = Path(cfg.train.output_dir)
    resuming = ckpt.resume_mode(cfg.train.resume) != "no"  # continuing a run in its own folder
    holds_run = (out / "config.yaml").exists()
    if holds_run and not cfg.train.overwrite and not resuming:
        raise DpokitError(
            f"train.output_dir {out} already holds a run (config.yaml); continue it with train.resume=auto, "
            "choose another folder, or pass train.overwrite=true"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DpokitError(f"train.output_dir {out} is not writable: {exc.strerror or exc}") from None
    main = launched_rank() == 0
    claim = Claim(out, created, OutputLock.acquire(out) if main else None)
    try:
        if claim.lock is not None:  # under the lock: no live run's temporary files can be among them
            _report_stale(out, remove_stale(out))  # first: on a full disk they may hold the space needed next
            claim.lock.record_holder()
            if holds_run and cfg.train.overwrite and not resuming:
                remove_previous_run(out)
        _probe_writable(out)
    except WriteError as exc:
        claim.release()
        raise write_failure(exc, out) from None
    except BaseException:
        claim.release()
        raise
    return claim


def _probe_writable(out: Path) -> None:
    try:
        probe = out / f".dpokit_write_test-{os.getpid()}"  # one per process: several may check at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DpokitError(f"train.output_dir {out} is not writable: {exc.strerror or exc}") from None


def remove_stale(out: Path) -> list[tuple[str, int]]:
    """Delete what killed or failed saves left in `out` (checkpoint staging folders, the final
    save's staging folder, half-written temporary files); returns (name, bytes) of each. Only
    for the lock's holder: a live run's temporary files look the same."""
    removed = [(f"{ckpt.CHECKPOINTS}/{p.name}", n) for p, n in ckpt.remove_stale(out / ckpt.CHECKPOINTS)]
    for path in sorted(out.iterdir()):
        stale_file = path.is_file() and (path.name.endswith(".tmp") or path.name.startswith(".dpokit_write_test-"))
        if stale_file and path.name.startswith("."):
            removed.append((path.name, path.stat().st_size))
            path.unlink(missing_ok=True)
        elif path.is_dir() and path.name == FINAL_STAGING:
            removed.append((path.name, tree_size(path)))
            shutil.rmtree(path, ignore_errors=True)
    return removed


def _report_stale(out: Path, removed: list[tuple[str, int]]) -> None:
    if removed:
        total = sum(n for _, n in removed)
        print(f"removed {len(removed)} temporary file(s) left in {out} by a killed or failed save "
              f"({', '.join(name for name, _ in removed)}; {total / 2**20:.1f} MiB)", flush=True)  # fmt: skip


# ---- one writer per folder -------------------------------------------------------------------
class OutputLock:
    """An exclusive lock on ``out/.dpokit.lock`` for the life of a run.

    The lock is the kernel's (`flock`), so it dies with its holder: a SIGKILLed run leaves the file
    but not the lock, and the next run takes it over (and says whose it was). The file names the
    holder (pid, host, start time) for the refusal message; a clean release empties it, so a
    non-empty file found unlocked is a killed run's."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, out: Path) -> OutputLock:
        path = out / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DpokitError(f"train.output_dir {out} is not writable: {exc.strerror or exc}") from None
        if not _try_lock(fd):
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise DpokitError(
                f"train.output_dir {out} is in use by another dpokit run ({holder}): two runs writing one folder "
                "would mix their checkpoints and metrics. Wait for it to end or stop it, or choose another "
                f"train.output_dir (the lock is {path}; it is released when that process exits)"
            )
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            print(f"took over the lock of {out} from a run that did not end cleanly ({_describe(previous)})", flush=True)
        return cls(fd, path)

    def record_holder(self) -> None:
        """Write this process's name into the lock file (after `remove_stale`: on a full disk even these
        few bytes need the space that stale files hold)."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with writing("the output folder's lock", self.path):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(record).encode(), 0)

    def release(self) -> None:
        try:
            os.ftruncate(self.fd, 0)  # released cleanly: nothing to take over
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover - no flock: a recorded live pid on this host counts as held
        holder = _read_holder(fd)
        return not (holder and holder.get("host") == socket.gethostname() and _alive(int(holder.get("pid", 0))))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _alive(pid: int) -> bool:  # pragma: no cover - used without flock only
    try:
        os.kill(pid, 0)
        return pid > 0
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return raw if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def remove_previous_run(out: Path) -> list[str]:
    """Delete the files and folders dpokit writes (never anything else); returns their names."""
    removed: list[str] = []
    paths = [out / name for name in _FILES] + [p for g in _GLOBS for p in out.glob(g)]
    for path in paths:
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path.name)
    for name in _FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed.append(name + "/")
    return removed


def discard_if_unused(claim: Claim) -> None:
    """After a failed set-up: remove the folder if this run created it and nothing was written into
    it but the lock (a skipped-rows list an error message points to is kept, with its folder)."""
    held = claim.lock is not None  # only the holder may delete the lock file
    claim.release()
    out = claim.out
    if claim.created and out.is_dir() and {p.name for p in out.iterdir()} <= ({LOCK} if held else set()):
        (out / LOCK).unlink(missing_ok=True)
        out.rmdir()
