"""Hooks: read-only observers of the training loop (the benchmark measures through them).

A hook never changes what the loop computes; every method has a no-op default, so a hook
implements only what it watches. The loop calls, in order:

    on_setup(info)                      once, before the first step: the resolved batch layout
                                        ("batches") and attention kernel ("attention")
    on_micro_batch(step, examples)      for each micro-batch, before its forward pass
    on_step_end(step, row)              after each optimizer step, after its metrics row (if one
                                        was logged at this step; None otherwise) was computed
"""

from __future__ import annotations

from typing import Any


class Hook:
    def on_setup(self, info: dict[str, str]) -> None:
        """The run's resolved layout, before the first step."""

    def on_micro_batch(self, step: int, examples: list[Any]) -> None:
        """The examples of one micro-batch of optimizer step `step` (1-based), before its forward."""

    def on_step_end(self, step: int, row: dict[str, Any] | None) -> None:
        """After optimizer step `step`; `row` is its training metrics row when one was logged."""
