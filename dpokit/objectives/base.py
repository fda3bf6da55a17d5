"""What a training objective is: the interface between the training loop and everything it does not know.

The loop (`dpokit.training.loop`) owns optimisation, accumulation, clipping, non-finite guards,
signals, checkpoints, logging, the eval schedule and the final save. An `Objective` owns the rest:

    rows        which files it reads and how (`load_examples`), how long an example is for length
                grouping and the inference pass (`example_length`), how examples become a batch
                (`build_collator`);
    set-up      what it needs besides the policy (`prepare`: a reference model, a precomputed
                table) and after the policy is wrapped for the run (`attach`);
    the step    how a batch becomes a loss and per-example values (`batch_values`), whose names
                are `metric_keys`; the loop averages them over examples (and processes);
    reporting   the short fields of the console line and progress bar (`console_keys`) and the
                warnings it reads from the training rows (`check_rows`).

DPO (`dpokit.objectives.dpo`) is the first objective; a new one subclasses `Objective` and is
handed to `dpokit.training.loop.train(cfg, objective=...)` without touching the loop.

Also here: `MetricAccumulator`, which averages per-example values over micro-batches and
processes, and `evaluate_examples`, the objective-agnostic evaluation over a list of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data.files import expand_files
from dpokit.dist import Dist
from dpokit.models.inference import inference_batches
from dpokit.models.loading import load_policy, save_final

Batch = dict[str, Tensor]
Collator = Callable[[list[Any]], Batch]


@dataclass
class ObjectiveSetup:
    """What the loop hands an objective once the policy and the data are loaded (`Objective.prepare`)."""

    policy: Any  # the trainable model, not yet wrapped by Accelerate
    tokenizer: Any
    dtype: torch.dtype  # weight dtype the policy was loaded in
    dist: Dist
    collator: Any
    lm_head_chunk: int  # scored positions per LM-head chunk (0: plain logits)
    splits: dict[str, list[Any]] = field(default_factory=dict)  # "train" / "eval" examples


class Objective:
    """Base class of the objectives; see the module docstring for who owns what.

    Contract with the loop: every batch the collator returns holds ``attention_mask`` (its sum is
    the tokens processed, for tokens/s), and `batch_values` returns ``(loss, values)`` with `loss`
    the mean over the batch's examples (a scalar that backpropagates) and `values` a detached
    ``(len(metric_keys), N)`` tensor for the batch's N examples.
    """

    name: ClassVar[str] = ""
    metric_keys: ClassVar[tuple[str, ...]] = ("loss",)
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (("loss", "loss", ".4f"),)  # (key, short, format)
    unit: ClassVar[str] = "examples"  # what one example is, for messages ("pairs", "rows")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ---- configuration, model and data ---------------------------------------------------------
    def validate(self) -> None:
        """Config checks that belong to this objective (raise ConfigError); `Config.validate` ran first."""

    def load_model(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """(trainable model, tokenizer): by default the causal LM of model.name_or_path, LoRA-wrapped
        when lora.enabled."""
        return load_policy(self.cfg, dtype)

    def save(self, model: Any, tokenizer: Any, out_dir: Path) -> dict[str, str]:
        """Write the trained model (main process only); returns what was written, by kind."""
        return save_final(model, tokenizer, self.cfg, out_dir)

    def preflight(self, train_files: list[str], eval_files: list[str]) -> None:
        """Cheap checks of the data before any model loads (files exist and are readable; the
        objective may also validate the first rows): a typo in a path must not cost a model load."""
        for files in (train_files, eval_files):
            if files:
                expand_files(files)

    def load_examples(self, files: list[str], tokenizer: Any, skipped_path: Path | None) -> tuple[list[Any], Any]:
        """(examples, summary with a `render()` method) for `files`; bad rows raise DataError."""
        raise NotImplementedError

    def example_length(self, example: Any) -> int:
        """Tokens of the longest row this example puts in a padded batch (length grouping, inference order)."""
        raise NotImplementedError

    def memory_reference(self) -> str:
        """What the memory plan counts for a reference: copy | adapter | precompute | none."""
        return "none"

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        """A callable ``list[example] -> batch`` with a `describe()` line for the run log."""
        raise NotImplementedError

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self, setup: ObjectiveSetup) -> None:
        """Build what the objective needs besides the policy (before the policy is wrapped or trained)."""

    def attach(self, policy: Any) -> None:
        """Called before the first step with the policy module the loop trains (unwrapped from Accelerate's
        wrapper, so e.g. LoRA adapters can be toggled on it)."""

    # ---- the step ------------------------------------------------------------------------------
    def begin_step(self, micro_batches: Sequence[Batch], dist: Dist) -> None:
        """Called with this process's micro-batches of an optimizer step before any forward: an
        objective whose loss is normalised by the step's total (SFT: completion tokens) counts it
        here, across micro-batches and processes. Every process calls it (it may reduce)."""

    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """(mean loss over the batch, per-example values (len(metric_keys), N)) for `split` ("train"/"eval")."""
        raise NotImplementedError

    # ---- reporting -----------------------------------------------------------------------------
    def check_rows(self, rows: Sequence[dict[str, Any]]) -> str | None:
        """A warning read from the recent training rows (oldest first), or None."""
        return None


class MetricAccumulator:
    """Sums per-example metric values on their device; `compute()` syncs once and averages.

    Values are summed as they come (no host sync) and divided by the example count only when a
    log line is written, so accumulation steps and processes are averaged by examples, never
    averaged as means of means or summed into nonsense (an accuracy above 1).
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # (K,)
        self.count: Tensor | None = None  # () number of examples

    def add(self, values: Tensor) -> None:  # values: (K, N)
        sums, count = values.sum(dim=1), torch.tensor(float(values.shape[1]), device=values.device)
        self.sums = sums if self.sums is None else self.sums + sums
        self.count = count if self.count is None else self.count + count

    def compute(self, keys: Sequence[str], reduce_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Averages over all examples seen, named by `keys` (across processes when reduce_fn sums over them)."""
        if self.sums is None:
            return {}
        packed = torch.cat([self.sums, self.count.reshape(1)])
        if reduce_fn is not None:
            packed = reduce_fn(packed)
        packed = packed.tolist()  # note: host-device sync point, only at log steps
        n = packed[-1]
        return {k: v / n for k, v in zip(keys, packed[:-1])}

    def reset(self) -> None:
        self.sums, self.count = None, None

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's examples (e.g. one optimizer step's, once it is known to be finite)."""
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


def evaluate_examples(
    objective: Objective, model: Any, examples: Sequence[Any], collator: Collator, batch_size: int, dist: Dist
) -> dict[str, float]:
    """The objective's metrics averaged over every example (sharded over processes, then reduced).

    Runs the one inference pass (`dpokit.models.inference`): the result does not depend on the
    order or the batch size beyond float summation order.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # No gradient, so the module itself: the first DDP forward after a training step broadcasts the
        # buffers (a collective), which would wait forever for a process that has no eval batch to run.
        model = model.module
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    n_keys = len(objective.metric_keys)
    acc.add(torch.zeros(n_keys, 0, device=dist.device))  # a process with no batch still joins the reduce
    lengths = [objective.example_length(e) for e in examples]
    try:
        # lockstep: a sharded model's forward is collective, so every process runs as many batches
        for idx, batch in inference_batches(examples, lengths, collator, batch_size, dist, lockstep=dist.sharded):
            _, values = objective.batch_values(model, batch, "eval")
            if idx:  # not a filler batch
                acc.add(values)
    finally:
        model.train(was_training)
    return acc.compute(objective.metric_keys, dist.reduce_sum if dist.world > 1 else None)
