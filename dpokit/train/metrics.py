"""Where metrics go: metrics.jsonl (and TensorBoard), and the console line of a log step.

What the metrics are is the objective's business (`Objective.metric_keys`); how they are averaged
over micro-batches and processes is `dpokit.objectives.base.MetricAccumulator`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def is_finite_metrics(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


class MetricsLogger:
    """Writes one JSON object per log step to metrics.jsonl, and optionally to TensorBoard."""

    def __init__(self, out_dir: Path, report_to: list[str], enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if not append:
            self.path.write_text("", encoding="utf-8")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: say so once, keep training
                print("warning: train.report_to has tensorboard but the package is missing; pip install tensorboard")
            else:
                self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):  # not the `warnings` list
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
