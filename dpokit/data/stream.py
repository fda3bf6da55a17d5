"""The training data order: which examples each micro-batch of each process takes, resumably.

Works on any list of examples (pairs, completions, labelled rows) given each example's padded
length; the objective says what that length is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dpokit.errors import DpokitError


class ExampleStream:
    """An endless, seeded stream of micro-batches over `examples`, epoch after epoch.

    Each micro-batch takes the next `micro_batch_size * world_size` indices of the epoch orders
    laid end to end and keeps this rank's slice, so every rank sees distinct examples, no example
    is dropped at an epoch's end, and the position is one integer (`consumed`), which makes
    resuming exact. One process with micro_batch_size m*N sees, in each micro-batch, exactly the
    examples N processes with micro_batch_size m see together.

    The epoch's order is a pure function of (seed, epoch): a permutation, and with
    `group_by_length` that permutation regrouped (`_group_by_length`) so that the examples of one
    optimizer step have similar lengths. The grouping unit is the optimizer step's examples
    (micro_batch x grad_accum x world), not the micro-batch, so micro_batch 4 x accum 1 and
    micro_batch 1 x accum 4 still see the same examples in the same steps.
    """

    GROUP_STEPS = 64  # steps sorted together: larger = less padding, smaller = more randomness

    def __init__(
        self,
        examples: Sequence[Any],
        lengths: Sequence[int],
        micro_batch_size: int,
        seed: int,
        world: int = 1,
        rank: int = 0,
        group_by_length: bool = False,
        grad_accum_steps: int = 1,
        unit: str = "examples",
    ):
        if len(examples) < micro_batch_size * world:
            raise DpokitError(
                f"only {len(examples)} training {unit}, fewer than one global micro-batch "
                f"({micro_batch_size} x {world} processes); lower train.micro_batch_size"
            )
        if len(lengths) != len(examples):
            raise ValueError(f"{len(lengths)} lengths for {len(examples)} examples")
        self.examples, self.mbs, self.seed, self.world, self.rank = examples, micro_batch_size, seed, world, rank
        self.group_by_length, self.accum = group_by_length, grad_accum_steps
        self.consumed = 0  # global micro-batches taken so far
        self.lengths = list(lengths)  # padded length of each example's rows (what grouping sorts by)
        self._cached: dict[int, list[int]] = {}  # epoch -> order: not rebuilt per micro-batch

    def _order(self, epoch: int) -> list[int]:
        if epoch in self._cached:
            return self._cached[epoch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        if self.group_by_length:
            order = self._group_by_length(order, g)
        self._cached = {e: o for e, o in self._cached.items() if e == epoch - 1}  # a batch spans two epochs at most
        self._cached[epoch] = order
        return order

    def _group_by_length(self, order: list[int], g: torch.Generator) -> list[int]:
        """Cut the shuffled `order` into units of one optimizer step's examples, sort by length
        within chunks of GROUP_STEPS units, and shuffle the units' order.

        Sorting only inside chunks keeps which examples meet in a step random across epochs; the
        stable sort breaks ties by the random permutation. Leftover examples (fewer than one unit)
        stay at the end in random order, so the epoch length in micro-batches is unchanged.
        """
        unit = self.mbs * self.world * self.accum
        n_units = len(order) // unit
        units: list[list[int]] = []
        chunk = unit * self.GROUP_STEPS
        for start in range(0, n_units * unit, chunk):
            part = sorted(order[start : min(start + chunk, n_units * unit)], key=self.lengths.__getitem__)
            units.extend(part[i : i + unit] for i in range(0, len(part), unit))
        shuffled = torch.randperm(len(units), generator=g).tolist()
        return [i for u in shuffled for i in units[u]] + order[n_units * unit :]

    def __iter__(self) -> Iterator[list[Any]]:
        """Global micro-batch c is positions [c*G, (c+1)*G) of the epochs' orders laid end to end
        (G = micro_batch_size x world); this rank keeps its slice. Nothing is dropped: an epoch's
        last examples share a micro-batch with the next epoch's first ones, so every micro-batch
        has the same size on every rank (which is what makes N processes equal one)."""
        per_global = self.mbs * self.world
        while True:
            start = self.consumed * per_global + self.rank * self.mbs
            self.consumed += 1
            yield [self.examples[self._at(i)] for i in range(start, start + self.mbs)]

    def _at(self, position: int) -> int:
        """The example at `position` of the endless sequence of epoch orders."""
        epoch, i = divmod(position, len(self.examples))
        return self._order(epoch)[i]

    def epoch_progress(self) -> float:
        return self.consumed * self.mbs * self.world / len(self.examples)
