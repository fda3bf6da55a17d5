"""The output folder's life: claimed at the start, cleaned for `overwrite`, marked complete at the end.

`train.output_dir` holds one run: its model files, `config.yaml`, `metrics.jsonl`, `checkpoints/`.
This module decides what may be written there and when a run in it counts as finished:

* `prepare` refuses a folder holding another run (unless `train.overwrite` or a resume), removes
  the previous run's files under `train.overwrite=true` (only names dpokit writes, so a user's own
  files in the folder survive) and checks the folder is writable;
* `discard_if_unused` removes a folder this run created when set-up fails before training (a bad
  model path must not leave an empty run folder behind);
* `COMPLETE` (`run_complete.json`) is written last, after the final save: a run without it did not
  finish (readers trust only a completed output), and `train.resume=auto` on a completed run says so
  and stops instead of training again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.training import checkpoint as ckpt

COMPLETE = "run_complete.json"

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
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, out / COMPLETE)


def finished_message(out: Path, done: Completion) -> str:
    return (
        f"train.output_dir {out} holds a finished run ({done.steps} steps, completed {done.finished}); "
        "nothing to resume. To train again there, pass train.overwrite=true; to continue training its model, "
        f"start a new run with model.name_or_path={out}"
    )


def prepare(cfg: Config) -> tuple[Path, bool]:
    """(output folder, whether this call created it). Refuses another run's folder unless
    train.overwrite (which first removes that run's files) or a resume; checks it is writable."""
    out = Path(cfg.train.output_dir)
    resuming = ckpt.resume_mode(cfg.train.resume) != "no"  # continuing a run in its own folder
    holds_run = (out / "config.yaml").exists()
    if holds_run and not cfg.train.overwrite and not resuming:
        raise DpokitError(
            f"train.output_dir {out} already holds a run (config.yaml); continue it with train.resume=auto, "
            "choose another folder, or pass train.overwrite=true"
        )
    if holds_run and cfg.train.overwrite and not resuming:
        remove_previous_run(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dpokit_write_test-{os.getpid()}"  # one per process: several may check at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DpokitError(f"train.output_dir {out} is not writable: {exc.strerror or exc}") from None
    return out, created


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


def discard_if_unused(out: Path, created: bool) -> None:
    """After a failed set-up: remove `out` if this run created it and nothing was written into it
    (a skipped-rows list an error message points to is kept, with its folder)."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
