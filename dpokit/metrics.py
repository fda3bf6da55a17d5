"""Metric names, their accumulation across micro-batches and ranks, and the loggers.

Per-pair values are summed on the device as they come (no host sync) and divided by the pair
count only when a log line is written, so accumulation steps and ranks are averaged by pairs,
never summed into nonsense (accuracy above 1) or averaged as means of means.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit.losses import LossOutput

# Per-pair quantities averaged over pairs, in a fixed order (one device vector holds their sums).
PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def pair_values(out: LossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> Tensor:
    """Stack the per-pair metric values in PAIR_KEYS order: (len(PAIR_KEYS), B), detached fp32."""
    chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    return torch.stack(
        [
            out.losses.detach().float(),
            chosen,
            rejected,
            chosen - rejected,
            (chosen > rejected).float(),
            policy_chosen_logps.detach().float(),
            policy_rejected_logps.detach().float(),
        ]
    )


class MetricAccumulator:
    """Sums per-pair metric values on their device; `compute()` syncs once and averages."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # (K,)
        self.count: Tensor | None = None  # () number of pairs

    def add(self, values: Tensor) -> None:  # values: (K, B)
        sums, count = values.sum(dim=1), torch.tensor(float(values.shape[1]), device=values.device)
        self.sums = sums if self.sums is None else self.sums + sums
        self.count = count if self.count is None else self.count + count

    def compute(self, reduce_fn: Any = None) -> dict[str, float]:
        """Averages over all pairs seen (across ranks when reduce_fn sums over processes)."""
        if self.sums is None:
            return {}
        packed = torch.cat([self.sums, self.count.reshape(1)])
        if reduce_fn is not None:
            packed = reduce_fn(packed)
        packed = packed.tolist()  # note: host-device sync point, only at log steps
        n = packed[-1]
        return {k: v / n for k, v in zip(PAIR_KEYS, packed[:-1])}

    def reset(self) -> None:
        self.sums, self.count = None, None

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's pairs (e.g. one optimizer step's, once it is known to be finite)."""
        if other.sums is None:
            return
        self.sums = other.sums if self.sums is None else self.sums + other.sums
        self.count = other.count if self.count is None else self.count + other.count

    def state_dict(self) -> dict[str, Tensor | None]:
        """The running sums (for checkpoints: a resumed run logs the same averages)."""
        return {"sums": self.sums, "count": self.count}

    def load_state_dict(self, state: dict[str, Tensor | None], device: torch.device | str = "cpu") -> None:
        self.sums = None if state["sums"] is None else state["sums"].to(device)
        self.count = None if state["count"] is None else state["count"].to(device)


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


def likelihood_displacement(history: list[dict[str, Any]], window: int = 5, min_drop: float = 1.0) -> str | None:
    """A warning when chosen log-probs fall steadily while reward margins rise, else None.

    DPO only pushes the *margin* up; it can do so while lowering the likelihood of the chosen
    responses too ("likelihood displacement", Razin et al. 2024), moving probability mass to
    responses that were in neither set. Looks at the last `window` logged training rows:
    `logps/chosen` must fall in at least 3/4 of the intervals and by at least `min_drop` nats
    overall, while `rewards/margins` rises over the window. Pure: rows in, message out.
    """
    rows = [r for r in history if "logps/chosen" in r and "rewards/margins" in r][-window:]
    if window < 2 or len(rows) < window:
        return None
    chosen = [float(r["logps/chosen"]) for r in rows]
    margins = [float(r["rewards/margins"]) for r in rows]
    falls = sum(b < a for a, b in zip(chosen, chosen[1:]))
    if falls * 4 < 3 * (window - 1) or chosen[0] - chosen[-1] < min_drop or margins[-1] <= margins[0]:
        return None
    return (
        f"likelihood displacement: logps/chosen fell from {chosen[0]:.2f} to {chosen[-1]:.2f} over the last "
        f"{window} log steps while rewards/margins rose from {margins[0]:.3f} to {margins[-1]:.3f}; the model "
        "is making the preferred responses less likely too (Razin et al. 2024). Consider loss.nll_weight "
        "(e.g. 0.1-1.0) to keep the chosen log-probs up"
    )


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """A compact console line for a log step."""
    keys = [
        ("loss", "loss", ".4f"),
        ("rewards/accuracies", "acc", ".3f"),
        ("rewards/margins", "margin", ".3f"),
        ("logps/chosen", "logp_c", ".1f"),
        ("grad_norm", "gnorm", ".3f"),
        ("lr", "lr", ".2e"),
        ("tokens_per_sec", "tok/s", ".0f"),
    ]
    parts = [f"step {step}/{total}"]
    parts += [f"{short} {metrics[k]:{fmt}}" for k, short, fmt in keys if k in metrics]
    evals = [f"{k} {v:.4f}" for k, v in metrics.items() if k in ("eval/loss", "eval/rewards/accuracies")]
    return " | ".join(parts + evals)
