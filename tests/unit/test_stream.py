"""ExampleStream (the training data order) over pairs, with length grouping: deterministic, every pair once per epoch, less padding than
random batches, resumable from the one-integer position, and invariant to how a step is split."""

from __future__ import annotations

import itertools
import random

import pytest

from dpokit.data.collate import TokenizedPair
from dpokit.data.stream import ExampleStream
from dpokit.objectives.dpo import pair_length
from tests.conftest import TOY


def _synthetic(n: int = 1000, seed: int = 0) -> list[TokenizedPair]:
    """Very uneven lengths: mostly short pairs, some 10-50x longer."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        long = rng.random() < 0.2
        prompt = [1] * rng.randint(5, 200 if long else 20)
        pairs.append(TokenizedPair(prompt, [2] * rng.randint(1, 300 if long else 10), [3] * rng.randint(1, 30), i))
    return pairs


def _toy() -> list[TokenizedPair]:
    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import pairs as data
    from dpokit.models.tiny import ASSET_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER))
    pairs, _ = data.load_pairs([TOY / "train.jsonl"], tok, DataConfig())
    return pairs


def _stream(pairs: list[TokenizedPair], *args: object, **kwargs: object) -> ExampleStream:
    """The stream the training loop builds for DPO: pairs ordered by their padded length."""
    return ExampleStream(pairs, [pair_length(p) for p in pairs], *args, **kwargs)


def _take(stream: ExampleStream, n: int) -> list[list[int]]:
    return [[p.index for p in mb] for mb in itertools.islice(iter(stream), n)]


def _padding(pairs: list[TokenizedPair], batches: list[list[int]]) -> int:
    """Padded-minus-real tokens of the (2B, T) batches the collator would build."""
    total = 0
    for mb in batches:
        rows = [len(pairs[i].prompt_ids) + len(r) for i in mb for r in (pairs[i].chosen_ids, pairs[i].rejected_ids)]
        total += max(rows) * len(rows) - sum(rows)
    return total


@pytest.mark.parametrize(("mbs", "world"), [(4, 1), (3, 2), (8, 1)])
def test_every_pair_once_per_epoch_and_deterministic(mbs: int, world: int) -> None:
    """Laid out in global order (micro-batch by micro-batch, rank by rank), the examples of each
    epoch are a permutation: none twice, none dropped, the ragged tail included."""
    pairs = _synthetic(1003)  # not a multiple of anything: a ragged tail
    n_mb = -(-2 * len(pairs) // (mbs * world))  # global micro-batches covering two epochs
    for accum in (1, 3):
        ranks = [_take(_stream(pairs, mbs, 7, world, r, group_by_length=True, grad_accum_steps=accum), n_mb)
                 for r in range(world)]
        again = _take(_stream(pairs, mbs, 7, world, 0, group_by_length=True, grad_accum_steps=accum), n_mb)
        assert again == ranks[0]
        flat = [i for c in range(n_mb) for r in range(world) for i in ranks[r][c]]
        first, second = flat[: len(pairs)], flat[len(pairs) : 2 * len(pairs)]
        assert sorted(first) == sorted(second) == list(range(len(pairs)))
        assert first != second  # epochs differ
    other_seed = _take(_stream(pairs, mbs, 8, world, 0, group_by_length=True), n_mb)
    assert other_seed != ranks[0]


@pytest.mark.parametrize("group", [True, False])
def test_one_process_sees_what_several_see_together(group: bool) -> None:
    """micro_batch m x N processes == micro_batch m*N in one process, micro-batch by micro-batch:
    what makes an N-process run equal a one-process run at the same global batch."""
    pairs = _synthetic(203)
    one = _take(_stream(pairs, 6, 4, 1, 0, group_by_length=group, grad_accum_steps=2), 90)
    ranks = [_take(_stream(pairs, 2, 4, 3, r, group_by_length=group, grad_accum_steps=2), 90) for r in range(3)]
    assert one == [ranks[0][c] + ranks[1][c] + ranks[2][c] for c in range(90)]


@pytest.mark.parametrize("source", ["toy", "synthetic"])
def test_grouping_reduces_padding(source: str) -> None:
    pairs = _toy() if source == "toy" else _synthetic()
    mbs = 8
    n = len(pairs) // mbs
    grouped = _padding(pairs, _take(_stream(pairs, mbs, 0, group_by_length=True), n))
    plain = _padding(pairs, _take(_stream(pairs, mbs, 0, group_by_length=False), n))
    # the chosen/rejected length difference inside a pair is padding no grouping can remove
    assert grouped < 0.75 * plain, (grouped, plain)
    if source == "synthetic":
        assert grouped < 0.5 * plain, (grouped, plain)


def test_grouped_batches_are_still_shuffled() -> None:
    pairs = _synthetic()
    batches = _take(_stream(pairs, 4, 0, group_by_length=True), len(pairs) // 4)
    longest = [max(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) for i in mb) for mb in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # not monotone even within the first chunk of 64 steps
    assert longest[:64] != sorted(longest[:64]) and longest[:64] != sorted(longest[:64], reverse=True)


@pytest.mark.parametrize("group", [True, False])
def test_resume_from_position_gives_the_same_remaining_batches(group: bool) -> None:
    pairs = _synthetic(500)
    full = _take(_stream(pairs, 4, 3, group_by_length=group, grad_accum_steps=2), 400)  # > 3 epochs
    for position in (0, 1, 77, 124, 125, 250, 333):
        resumed = _stream(pairs, 4, 3, group_by_length=group, grad_accum_steps=2)
        resumed.consumed = position
        assert _take(resumed, 400 - position) == full[position:], position


def test_step_contents_do_not_depend_on_how_the_step_is_split() -> None:
    """micro_batch 4 x accum 1 and micro_batch 1 x accum 4 train on the same pairs per step."""
    pairs = _synthetic(403)
    a = _take(_stream(pairs, 4, 1, group_by_length=True, grad_accum_steps=1), 100)
    b = _take(_stream(pairs, 1, 1, group_by_length=True, grad_accum_steps=4), 400)
    assert [i for mb in a for i in mb] == [i for mb in b for i in mb]


def test_without_grouping_the_order_is_the_plain_permutation() -> None:
    import torch

    pairs = _synthetic(40)
    got = [i for mb in _take(_stream(pairs, 4, 5), 10) for i in mb]
    want = torch.randperm(40, generator=torch.Generator().manual_seed(5 * 1_000_003)).tolist()
    assert got == want  # unchanged from before grouping existed: old runs reproduce
