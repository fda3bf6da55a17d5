"""PreferenceCollator builds exactly the batch layout documented in dpokit/collate.py."""

from __future__ import annotations

import pytest
import torch

from dpokit.data.collate import PreferenceCollator, TokenizedPair


def _pairs() -> list[TokenizedPair]:
    return [
        TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7, 8, 9], rejected_ids=[10], index=3),
        TokenizedPair(prompt_ids=[11], chosen_ids=[12], rejected_ids=[13, 14, 15, 16], index=7),
    ]


def test_layout_with_pad_to_multiple_of() -> None:
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(_pairs())
    # Longest row is 5 tokens -> T rounds up to 8. Rows 0-1: prompt+chosen; rows 2-3: prompt+rejected.
    expected_ids = [
        [5, 6, 7, 8, 9, 0, 0, 0],
        [11, 12, 0, 0, 0, 0, 0, 0],
        [5, 6, 10, 0, 0, 0, 0, 0],
        [11, 13, 14, 15, 16, 0, 0, 0],
    ]
    expected_attention = [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ]
    expected_completion = [
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
    ]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "pair_index"}
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids, dtype=torch.long))
    assert torch.equal(batch["attention_mask"], torch.tensor(expected_attention, dtype=torch.long))
    assert torch.equal(batch["completion_mask"], torch.tensor(expected_completion, dtype=torch.bool))
    assert torch.equal(batch["pair_index"], torch.tensor([3, 7], dtype=torch.long))


def test_no_multiple_pads_to_longest_with_custom_pad_id() -> None:
    batch = PreferenceCollator(pad_token_id=99)(_pairs())
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 99, 99, 99],
        [5, 6, 10, 99, 99],
        [11, 13, 14, 15, 16],
    ]
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["attention_mask"].dtype == torch.long


def test_length_already_a_multiple_is_not_padded_further() -> None:
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=5)(_pairs())
    assert batch["input_ids"].shape == (4, 5)


def test_inputs_not_mutated() -> None:
    pairs = _pairs()
    PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)(pairs)
    assert pairs == _pairs()


@pytest.mark.parametrize(
    "pairs",
    [[], [TokenizedPair([1], [], [2])], [TokenizedPair([], [1], [2])]],
    ids=["no-pairs", "empty-response", "empty-prompt"],
)
def test_rejects_unusable_input(pairs: list[TokenizedPair]) -> None:
    with pytest.raises(ValueError):
        PreferenceCollator(pad_token_id=0)(pairs)


def test_rejects_bad_pad_to_multiple_of() -> None:
    with pytest.raises(ValueError):
        PreferenceCollator(pad_token_id=0, pad_to_multiple_of=0)
