"""The one inference pass: examples in length order, batched, sharded over processes.

Pair evaluation, the reference precompute and sample scoring all run a model over a list of
examples without gradients; they differ only in what they do with each batch. This module owns
the part they share: which examples go in which batch (longest first, so batches carry little
padding and an out-of-memory shows on the first batch rather than the last), which batches this
process runs (every world-th one), moving a collated batch to the device and running it under the
run's autocast and `torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from dpokit.dist import Dist

Batch = dict[str, Tensor]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the examples, longest first, cut into batches of `batch_size` (the last may be short).

    The sort is stable, so examples of equal length keep their order and the batches are a pure
    function of the lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def inference_batches(
    examples: Sequence[Any],
    lengths: Sequence[int],
    collate: Callable[[list[Any]], Batch],
    batch_size: int,
    dist: Dist,
    lockstep: bool = False,
) -> Iterator[tuple[list[int], Batch]]:
    """(indices, device batch) for this process's share of `examples`, under `torch.inference_mode`
    and the run's autocast. Callers reduce what they accumulate with `dist.reduce_sum`; every
    process joins that reduce even when it ran no batch.

    `lockstep`: every process runs the same number of batches, because each forward of the model is
    itself collective (an FSDP-sharded model gathers its shards in it). A process with fewer batches
    runs filler batches (a copy of the first batch) yielded with indices ``[]``: run them, discard
    the result.
    """
    batches = length_sorted_batches(lengths, batch_size)
    mine: list[list[int]] = dist.shard(batches)
    rounds = -(-len(batches) // dist.world) if lockstep else len(mine)
    with torch.inference_mode():
        for r in range(rounds):
            idx = mine[r] if r < len(mine) else []
            rows = idx or batches[0]
            batch = {k: v.to(dist.device, non_blocking=True) for k, v in collate([examples[i] for i in rows]).items()}
            with dist.autocast():
                yield idx, batch
