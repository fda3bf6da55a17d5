"""A toy reward for smoke runs and tests of `dpokit rl` on the tiny random model (preset rl-tiny).

A random model's text is noise, so no real judge has anything to score; this reward has a signal any
policy can learn fast: the share of the letter ``e`` among a response's letters. It is a stand-in for
"count of one token": the policy raises it by preferring tokens that contain an ``e``.
"""

from __future__ import annotations

from collections.abc import Sequence


def letter_e(texts: Sequence[str]) -> list[float]:
    """Per text: (number of 'e' / 'E') / (number of letters); 0 for a text without letters.

    Example: "tree" -> 2 / 4 = 0.5; "a1!" -> 0 / 1 = 0; "" -> 0.
    """
    out = []
    for text in texts:
        letters = [c for c in text if c.isalpha()]
        out.append(sum(c in "eE" for c in letters) / len(letters) if letters else 0.0)
    return out
