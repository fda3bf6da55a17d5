"""Rank and process helpers: the one place that knows about several processes.

Everything that shards work, reduces numbers across processes or lets only one process write goes
through `Dist`, so the training loop, the inference pass, evaluation and the reference cache never
branch on Accelerate themselves. A single-process run uses `Dist.local()`; a run under Accelerate
(`accelerate launch`, `torchrun`) uses `Dist.from_accelerator(make_accelerator(...))`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and the collectives it needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    accelerator: Any = None  # accelerate.Accelerator when the run has one

    @classmethod
    def local(cls, device: torch.device | str | None = None) -> Dist:
        """One process on `device` (default: CUDA when available, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(0, 1, torch.device(device))

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Dist:
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (the identity with one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of `items`: every world-th one, starting at the rank."""
        return items[self.rank :: self.world]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's mixed-precision context (a no-op without an accelerator)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def print(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. writes a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """An Accelerator for this run, also when an earlier run in this process used another precision.

    Accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator with
    a different `mixed_precision` (a notebook that trains twice, or the test suite). The process
    group (PartialState) is kept; only the per-run settings are dropped.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)
