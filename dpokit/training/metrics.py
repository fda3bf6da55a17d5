"""Where metrics go: metrics.jsonl (always), optional logger backends (TensorBoard, Trackio,
Weights & Biases: `train.report_to`), and the console line of a log step.

What the metrics are is the objective's business (`Objective.metric_keys`); how they are averaged
over micro-batches and processes is `dpokit.objectives.base.MetricAccumulator`'s.

A backend is a factory ``BackendContext -> Backend`` (an object with ``log(step, scalars)`` and
``close()``) registered by name in `BACKENDS`; `register_backend` adds one. A backend whose package
is missing raises ImportError from its factory: the run warns once, naming the pip command, and
trains on without it (metrics.jsonl has every row anyway).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from dpokit import faults
from dpokit.config import REPORT_TO
from dpokit.errors import writing


def is_finite_metrics(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


class Backend(Protocol):
    """A logger the metrics rows are copied to."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass
class BackendContext:
    """What a backend factory may use: where the run writes, its name and config, resumed or not."""

    out_dir: Path
    run_name: str
    config: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


BackendFactory = Callable[[BackendContext], Backend]


@dataclass
class _Registered:
    factory: BackendFactory
    install: str  # the command that installs what the factory imports


BACKENDS: dict[str, _Registered] = {}


def register_backend(name: str, factory: BackendFactory, install: str | None = None) -> None:
    """Make `name` a valid `train.report_to` entry. `install`: the pip command shown when the
    factory raises ImportError (default: pip install NAME)."""
    BACKENDS[name] = _Registered(factory, install or f"pip install {name}")
    REPORT_TO.add(name)  # config validates against it and cannot import this module


class _TensorBoard:
    def __init__(self, ctx: BackendContext) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(str(ctx.out_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, ctx: BackendContext) -> None:
        import trackio

        self.trackio = trackio
        # local-first: trackio keeps the run in its own local store unless TRACKIO_SPACE_ID is set
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dpokit"), name=ctx.run_name, config=ctx.config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Wandb:
    def __init__(self, ctx: BackendContext) -> None:
        import wandb

        # Without an API key wandb would stop to ask for one (or fail): log offline into the run
        # folder instead, to upload later with `wandb sync`. WANDB_MODE set by the user wins.
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "offline":
            print(f"wandb: no WANDB_API_KEY, logging offline to {ctx.out_dir / 'wandb'} (upload later: wandb sync)",
                  file=sys.stderr)  # fmt: skip
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dpokit"), name=ctx.run_name, dir=str(ctx.out_dir),
            config=ctx.config, mode=mode,
        )  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


for _name, _factory in (("tensorboard", _TensorBoard), ("trackio", _Trackio), ("wandb", _Wandb)):
    register_backend(_name, _factory, f"pip install 'dpokit[{_name}]'")  # the extras in pyproject.toml


def open_backends(names: Sequence[str], ctx: BackendContext, warn: Callable[[str], None] | None = None) -> list[Any]:
    """The backends `names` asks for; one whose package is missing is left out with a warning."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    opened: list[Any] = []
    for name in dict.fromkeys(names):
        registered = BACKENDS.get(name)
        if registered is None:  # Config.validate refuses unknown names; a hand-built list may not
            warn(f"warning: train.report_to has unknown logger '{name}' (known: {', '.join(sorted(BACKENDS))}); skipped")
            continue
        try:
            opened.append(registered.factory(ctx))
        except ImportError as exc:  # say so once, keep training: metrics.jsonl still has every row
            warn(
                f"warning: train.report_to has {name} but its package is missing ({exc}); "
                f"install it with: {registered.install}. Training goes on without it"
            )
    return opened


class MetricsLogger:
    """Writes one JSON object per log step to metrics.jsonl, and copies the numbers to the
    `train.report_to` backends."""

    def __init__(
        self,
        out_dir: Path,
        report_to: Sequence[str],
        enabled: bool = True,
        append: bool = False,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.backends: list[Any] = []
        if not enabled:
            return
        if not append:
            with writing("metrics.jsonl", self.path):
                self.path.write_text("", encoding="utf-8")
        ctx = BackendContext(out_dir, run_name or out_dir.resolve().name, dict(config or {}), resumed=append)
        self.backends = open_backends(report_to, ctx)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        with writing(f"metrics.jsonl (the row of step {step})", self.path):
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
            faults.reach("metrics.write", self.path, len(line.encode()))
        # numbers only (not the `warnings` list); bools are ints to Python but not metrics
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            for backend in self.backends:
                backend.log(step, scalars)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _round(v: Any) -> Any:
    return float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v


# The loop's own fields of a console line, after the objective's (`Objective.console_keys`).
LOOP_KEYS = (("grad_norm", "gnorm", ".3f"), ("lr", "lr", ".2e"), ("tokens_per_sec", "tok/s", ".0f"))


def format_line(step: int, total: int, metrics: dict[str, Any], keys: Sequence[tuple[str, str, str]] = ()) -> str:
    """A compact console line for a log step: the objective's `keys` (metric, short name, format),
    the loop's fields, and the eval versions of the first two objective keys."""
    parts = [f"step {step}/{total}"]
    parts += [f"{short} {metrics[k]:{fmt}}" for k, short, fmt in (*keys, *LOOP_KEYS) if k in metrics]
    shown = {f"eval/{k}" for k, _, _ in keys[:2]}
    evals = [f"{k} {v:.4f}" for k, v in metrics.items() if k in shown]
    return " | ".join(parts + evals)


def truncate_metrics(path: Path, rows: int) -> None:
    """Keep the first `rows` rows of metrics.jsonl (those logged up to the checkpoint): the
    steps after it run again and log their rows again, so none is duplicated. A last line cut
    short by a kill or a full disk (no newline, or not JSON) is dropped first, with a warning."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if lines and not _whole_row(lines[-1]):
        print(f"warning: {path}: its last line was cut short (the run was killed or the disk filled while "
              f"writing it: {lines[-1][:60]!r}); repaired by dropping it")  # fmt: skip
        lines = lines[:-1]
    if len(lines) < rows:
        print(f"warning: {path} has {len(lines)} rows, the checkpoint expected {rows}; appending to it")
    tmp = path.parent / f".{path.name}.tmp"
    with writing("metrics.jsonl", path):
        tmp.write_text("".join(lines[:rows]), encoding="utf-8")
        os.replace(tmp, path)


def _whole_row(line: str) -> bool:
    if not line.endswith("\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def progress_bar(total: int, enabled: bool, initial: int = 0, desc: str = "") -> Any:
    """The loop's progress bar (disabled: no output at all)."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc)
