"""Training checkpoints: write atomically, find the newest complete one, load it without pickle.

Layout of one checkpoint (``output_dir/checkpoints/step-00000120/``)::

    model.safetensors   trainable parameters by name (all weights, or only the LoRA adapters)
    optimizer.pt        optimizer.state_dict()           (torch.save; read with weights_only=True)
    sharded/            instead of the two above, in a run of several processes: the trainable
                        parameters and the optimizer state as torch distributed checkpoint (DCP)
                        files, each process writing its own shards (FSDP) or DCP dividing the
                        replicated ones (DDP); nothing is gathered on one process
    scheduler.pt        lr scheduler state_dict()
    rng-<rank>.pt       python / numpy / torch / cuda RNG states of each process
    trainer_state.pt    loop state: step, data position, metric sums, counters, log rows written
    config.yaml         the resolved config of the run that wrote it
    meta.json           written last: format version, step, world size, every file and its size

A checkpoint resumes only at the world size that wrote it (meta.json's `world_size`): the data
position, the per-process RNG streams and a sharded optimizer belong to that many processes.

A checkpoint is assembled in ``.tmp-step-...`` and renamed into place only when every file is
written and fsynced, so a folder named ``step-*`` is complete unless the disk itself lost data;
`load_checkpoint` still re-checks it (meta, file sizes, readable tensors) and refuses it with a
reason, so the caller can fall back to the previous one.

Only the standard library, numpy, torch, safetensors and `dpokit.dist` are imported (no transformers).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpokit import faults
from dpokit.dist import is_deepspeed_engine
from dpokit.errors import DpokitError, WriteError, io_reason, writing
from dpokit.fileio import fsync, fsync_dir, tree_size, write_synced

CHECKPOINTS = "checkpoints"  # folder under train.output_dir
FORMAT = "dpokit-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
SHARDED = "sharded"  # the DCP folder of a multi-process checkpoint
_NAME = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


class CheckpointError(DpokitError):
    """A checkpoint folder is missing, incomplete, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    """Everything read back from one checkpoint folder, held in CPU memory."""

    path: Path
    step: int
    weights: dict[str, Tensor] | None  # None in a sharded checkpoint: `load_sharded` reads it
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None  # None when this rank has no RNG file (different world size)
    state: dict[str, Any]
    config_yaml: str
    meta: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.meta.get("layout") == SHARDED

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size", 1))


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def resume_mode(value: str | bool) -> str:
    """'no', 'auto' or 'path' for a train.resume value (YAML reads a bare `no` as False)."""
    if value is False or value == "no":
        return "no"
    return "auto" if value == "auto" else "path"


# ---- what goes in ---------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name: everything for full fine-tuning, the adapters for LoRA.

    Frozen parameters never change, so the model loaded from `model.name_or_path` already has
    them; `named_parameters` lists a tied weight once, which safetensors requires.
    """
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """RNG states in plain types and tensors only, so `torch.load(weights_only=True)` reads them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- disk space -----------------------------------------------------------------------
OPTIMIZER_STATE_FACTOR = {"adamw": 2, "rmsprop": 1}  # state tensors per parameter (exp_avg, exp_avg_sq)


def estimate_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Rough size of one checkpoint: trainable parameter bytes * (1 + optimizer state factor)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params * (1 + OPTIMIZER_STATE_FACTOR.get(optimizer, 2))


def check_disk_space(folder: Path, need: int) -> None:
    """Refuse to start a run whose first checkpoint could not be written."""
    free = shutil.disk_usage(folder).free  # looked up at call time so tests can monkeypatch it
    if free < need:
        raise DpokitError(
            f"not enough free disk space in {folder} for one checkpoint: need about {_gib(need)}, "
            f"{_gib(free)} free; free some space, choose another train.output_dir, or set train.save_every=0"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# ---- writing --------------------------------------------------------------------------
def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is assembled in (same filesystem, so rename is atomic)."""
    return root / f"{_TMP_PREFIX}{folder_name(step)}"


def begin(root: Path, step: int) -> Path:
    """Create an empty staging folder (main process), clearing leftovers of killed runs."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp = staging_dir(root, step)
        tmp.mkdir()
    except OSError as exc:
        raise WriteError(str(staging_dir(root, step)), io_reason(exc) or str(exc)) from None
    return tmp


def remove_stale(root: Path) -> list[tuple[Path, int]]:
    """Delete the staging folders of saves that were killed or failed (``.tmp-*``, ``.old-*``);
    returns each with the bytes it held. Only for the process that holds the output folder's lock:
    a live run's staging folder looks the same."""
    removed = []
    if root.is_dir():
        for stale in sorted(root.iterdir()):
            if stale.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and stale.is_dir():
                removed.append((stale, tree_size(stale)))
                shutil.rmtree(stale, ignore_errors=True)
    return removed


def discard(tmp: Path) -> None:
    """Remove a staging folder whose save failed, so it does not hold the disk space."""
    shutil.rmtree(tmp, ignore_errors=True)


def _write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write one file of a checkpoint and fsync it; an I/O failure (whatever the writer raises for
    it: OSError, torch's RuntimeError, safetensors' error) becomes a WriteError naming the file (the
    caller names the checkpoint)."""
    with writing("", path):
        write(path)
        fsync(path)
        faults.reach(f"checkpoint.file:{path.name}", path, path.stat().st_size)


def write_rng(tmp: Path, rank: int) -> None:
    """Every process writes its own RNG state (after the main process created `tmp`)."""
    _write_file(tmp / f"rng-{rank}.pt", lambda f: torch.save(rng_state(), f))


def _sharded_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # trainable parameters only (LoRA: the adapters), as in model.safetensors; frozen ones are not
    # written, so loading must not insist on them (strict=False)
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _sharded_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer), options=_sharded_options())
    return {"model": model_sd, "optimizer": optim_sd}


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def write_sharded(tmp: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Every process writes its shards of the trainable parameters and the optimizer state into
    ``tmp/sharded`` (collective: all processes call it). `model` is the wrapped (DDP/FSDP) module,
    or DeepSpeed's engine, which writes its own partitioned format there."""
    import torch.distributed.checkpoint as dcp

    try:
        if is_deepspeed_engine(model):
            model.save_checkpoint(str(tmp / SHARDED), tag=_DS_TAG, exclude_frozen_parameters=True)
        else:  # DCP is collective: a failed write on any process raises on every process
            dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDED))
        faults.reach("checkpoint.file:sharded", tmp / SHARDED)
    except Exception as exc:
        reason = _sharded_io_reason(exc, tmp)
        if reason is None:
            raise
        raise WriteError(str(tmp / SHARDED), reason) from None


def _sharded_io_reason(exc: Exception, tmp: Path) -> str | None:
    """The I/O reason of a failed sharded write: DCP's CheckpointException carries each failed
    process's exception (with its traceback) in `failures`."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            reason = io_reason(inner, tmp) if isinstance(inner, BaseException) else None
            if reason is not None:
                return f"{reason} (process {rank})"
    return io_reason(exc, tmp)


_DS_TAG = "state"  # DeepSpeed's sub-folder name inside sharded/


def load_sharded(path: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Read ``path/sharded`` into the wrapped model and its optimizer, each process its shards
    (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if is_deepspeed_engine(model):
        loaded, _ = model.load_checkpoint(str(path / SHARDED), tag=_DS_TAG, load_module_strict=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load its sharded state")
        return
    state = _sharded_state(model, optimizer)  # the shapes and placements to read into
    try:
        dcp.load(state, checkpoint_id=str(path / SHARDED))
    except Exception as exc:  # DCP wraps per-rank failures in its own exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: its sharded state does not load into this model: {reason}") from None
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_sharded_options())


def write_and_publish(
    tmp: Path,
    step: int,
    model: torch.nn.Module | None,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    config_yaml: str,
    world_size: int,
    keep: int,
) -> Path:
    """Write the main process's files into `tmp`, then rename it to ``step-N`` and prune old ones.

    `model=None`: the weights and optimizer state are already in ``tmp/sharded`` (`write_sharded`)."""
    try:
        _write_files(tmp, model, optimizer, scheduler, state, config_yaml)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": world_size,
            "layout": "full" if model is not None else SHARDED,
            "files": {name: (tmp / name).stat().st_size for name in files},
        }
        _write_file(tmp / "meta.json", lambda f: write_synced(f, json.dumps(meta, indent=2)))
        fsync_dir(tmp)
        final = _publish(tmp, step)
    except BaseException:
        discard(tmp)  # a failed or interrupted save must not hold the disk space
        raise
    prune(final.parent, keep)
    return final


def _write_files(tmp: Path, model: torch.nn.Module | None, optimizer: Any, scheduler: Any, state: dict[str, Any],
                 config_yaml: str) -> None:  # fmt: skip
    """The main process's files of a checkpoint, each written and fsynced (`_write_file`)."""
    from safetensors.torch import save_file

    if model is not None:
        weights = trainable_state(model)
        _write_file(tmp / WEIGHTS, lambda f: save_file(weights, str(f), metadata={"format": "pt"}))
        _write_file(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
    _write_file(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
    _write_file(tmp / "trainer_state.pt", lambda f: torch.save(state, f))
    _write_file(tmp / "config.yaml", lambda f: f.write_text(config_yaml, encoding="utf-8"))
    for f in (tmp / SHARDED).rglob("*") if (tmp / SHARDED).is_dir() else ():
        if f.is_file():
            fsync(f)  # the shards every process wrote


def _publish(tmp: Path, step: int) -> Path:
    """Rename the finished staging folder to ``step-N`` (an existing one of that step is replaced)."""
    final = tmp.parent / folder_name(step)
    old = tmp.parent / f"{_OLD_PREFIX}{final.name}"
    try:
        faults.reach("checkpoint.publish", final)
        if final.exists():  # e.g. re-saving a step after resuming from an older checkpoint
            final.rename(old)
        tmp.rename(final)
    except OSError as exc:
        raise WriteError(str(final), io_reason(exc) or str(exc)) from None
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoint(root: Path, step: int) -> None:
    """Delete the checkpoint of `step` (and `root` when nothing else is left in it)."""
    shutil.rmtree(root / folder_name(step), ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (only folders this module named)."""
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---- reading --------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder, oldest first; staging folders are never listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: Path, rank: int = 0) -> Checkpoint:
    """Read and check one checkpoint folder; raise CheckpointError saying what is wrong."""
    path = Path(path)
    meta = _read_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, meta.json recorded {size}"
            )
    sharded = meta.get("layout") == SHARDED
    dcp_meta = f"{SHARDED}/.metadata"  # DCP's index; DeepSpeed writes sharded/state/ instead
    model_files = (dcp_meta if dcp_meta in meta["files"] else f"{SHARDED}/latest",) if sharded else (WEIGHTS, "optimizer.pt")
    for name in (*model_files, "scheduler.pt", "trainer_state.pt", "config.yaml"):
        if name not in meta["files"]:
            raise CheckpointError(f"checkpoint {path} is incomplete: meta.json does not list {name}")
    rng_file = f"rng-{rank}.pt"
    return Checkpoint(
        path=path,
        step=meta["step"],
        weights=None if sharded else _read_weights(path / WEIGHTS),
        optimizer=None if sharded else _read_torch(path / "optimizer.pt"),
        scheduler=_read_torch(path / "scheduler.pt"),
        rng=_read_torch(path / rng_file) if rng_file in meta["files"] else None,
        state=_read_torch(path / "trainer_state.pt"),
        config_yaml=(path / "config.yaml").read_text(encoding="utf-8"),
        meta=meta,
    )


def load_newest(root: Path, rank: int = 0, warn: Any = print) -> Checkpoint | None:
    """The newest checkpoint under `root` that loads; each refused one is reported through `warn`.

    Returns None when there is no checkpoint at all; raises when there are some but none loads
    (silently starting over would throw the run's progress away).
    """
    candidates = list_checkpoints(root)
    refused: list[str] = []
    for _, path in reversed(candidates):
        try:
            return load_checkpoint(path, rank)
        except CheckpointError as exc:
            refused.append(str(exc))
            warn(f"warning: {exc}; trying the previous checkpoint")
    if refused:
        raise CheckpointError(
            f"no usable checkpoint in {root} ({len(refused)} refused, see above); "
            "delete the folder and pass train.resume=no train.overwrite=true to start over"
        )
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json: {exc}") from None
    ok = (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("files"), dict)
        and all(isinstance(v, int) for v in meta["files"].values())
    )
    if not ok:
        raise CheckpointError(f"checkpoint {path} has a bad meta.json (not a {FORMAT} file, or fields missing)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}; this dpokit reads {VERSION}")
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"checkpoint {path} is inconsistent: meta.json says step {meta['step']}")
    return meta


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights {path} are unreadable: {exc}") from None


def _read_torch(path: Path) -> Any:
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is unreadable: {reason}") from None


def check_world_size(found: Checkpoint, world: int) -> None:
    """Refuse a checkpoint written by another number of processes (see the module docstring)."""
    if found.world_size != world:
        raise CheckpointError(
            f"checkpoint {found.path} was written by {found.world_size} process(es) and this run has {world}: "
            f"its data position, per-process random streams and sharded optimizer state belong to "
            f"{found.world_size}. Resume with --num-processes {found.world_size}, or start a new run "
            "(train.resume=no) in another train.output_dir"
        )


# ---- applying -------------------------------------------------------------------------
def apply_weights(model: torch.nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """Copy saved trainable parameters into `model`; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (was model.name_or_path or lora.* changed?): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, p in params.items():
        if p.shape != weights[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
