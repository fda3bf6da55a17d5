"""Tokenized preference pairs and the padded batch layout.

This module is the one place the batch layout is defined (docs/design.md points here).

For B pairs the collator returns 2B rows: rows ``[0:B)`` are prompt + chosen, rows ``[B:2B)``
are prompt + rejected, in the same pair order, so ``row i`` and ``row B + i`` share a prompt.
Every row is right-padded to T = the longest row, rounded up to ``pad_to_multiple_of``::

    input_ids        (2B, T) long   prompt ids, then response ids, then pad_token_id
    attention_mask   (2B, T) long   1 on real (prompt or response) tokens, 0 on padding
    completion_mask  (2B, T) bool   True on response tokens: the tokens whose log-prob is scored
    pair_index       (B,)    long   TokenizedPair.index of each pair (keys precomputed ref log-probs)

Example, B = 1, prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad 0, T = 5::

    input_ids        [[5, 6, 7, 2, 0],      completion_mask  [[F, F, T, T, F],
                      [5, 6, 8, 9, 2]]                         [F, F, T, T, T]]

A response token at position t is scored with the logits at position t - 1, so the first
response token is predicted from the last prompt token (a prompt is never empty).

Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenizedPair", "PreferenceCollator"]


@dataclass
class TokenizedPair:
    """One preference pair after tokenization (see docs/design.md for how it is produced)."""

    prompt_ids: list[int]  # prompt tokens (chat template / BOS included), never empty
    chosen_ids: list[int]  # chosen response tokens (EOS appended for plain text), never empty
    rejected_ids: list[int]  # rejected response tokens, never empty
    index: int = -1  # position of the pair in its split (keys precomputed reference log-probs)
    margin: float = 0.0  # the row's optional margin (`dpokit reward`: r_chosen must exceed r_rejected by it)


class PreferenceCollator:
    """Pads a list of `TokenizedPair` into the batch layout documented at the top of this module."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set a pad token on the tokenizer)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def describe(self) -> str:
        """One line for the run log: the batch layout."""
        return "padded [chosen; rejected] rows"

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, Tensor]:
        """Build the (2B, T) batch for `pairs`; see the module docstring for the layout."""
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        # Row order: all chosen rows first, then all rejected rows, so the model can run one
        # concatenated forward and split its per-row log-probs with [:B] / [B:].
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        for prompt, response in rows:
            if not prompt or not response:
                raise ValueError("a TokenizedPair has an empty prompt or response; data.py should have dropped it")

        longest = max(len(prompt) + len(response) for prompt, response in rows)
        multiple = self.pad_to_multiple_of or 1
        seq_len = -(-longest // multiple) * multiple  # ceil to a multiple (fixed shapes help compilers)

        ids, attention, completion = [], [], []
        for prompt, response in rows:
            n_real = len(prompt) + len(response)
            n_pad = seq_len - n_real
            ids.append([*prompt, *response] + [self.pad_token_id] * n_pad)
            attention.append([1] * n_real + [0] * n_pad)
            completion.append([False] * len(prompt) + [True] * len(response) + [False] * n_pad)

        # Build from Python lists in one call each: far faster than per-row tensor writes.
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (2B, T)
            "attention_mask": torch.tensor(attention, dtype=torch.long),  # (2B, T)
            "completion_mask": torch.tensor(completion, dtype=torch.bool),  # (2B, T)
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),  # (B,)
        }
