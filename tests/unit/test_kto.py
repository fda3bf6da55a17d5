"""KTO without a model: the loss and its reference point (hand-computed values, weights, the clamp,
the mean over processes), the KL pairing and sequences, the metric shares, labelled rows and their
bad rows, the batch layout, config keys and the warnings.

Notation: r = pi - ref, the summed completion log-ratio; z0 the reference point (the KL estimate);
sigma the logistic function; lambda_D / lambda_U the desirable / undesirable weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dpokit
from dpokit.config import Config
from dpokit.data.completions import TokenizedCompletion, check_completions, load_completions
from dpokit.dist import Dist
from dpokit.errors import ConfigError, DataError
from dpokit.objectives.kto import (
    KTO_KEYS,
    KTOCollator,
    KTOObjective,
    desirable_displacement,
    kl_order,
    kl_partners,
    kl_sequence,
    kto_examples,
    kto_values,
    weight_balance_warning,
)
from dpokit.objectives.losses import UNPAIRED_LOSSES, KTOParams, kto_loss, kto_reference_point
from dpokit.objectives.sft import build_completion_collator

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def data_cfg(**overrides: Any) -> SimpleNamespace:
    base = {"format": "auto", "max_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_end",
            "on_bad_row": "error", "sft_target": None, "sft_loss_on": "all_assistant", "columns": {}}  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- the loss ---------------------------------------------------------------------------------------
def test_loss_values_by_hand_with_weights() -> None:
    """beta 0.1, z0 = 1, lambda_D = 1, lambda_U = 2, three examples:
    desirable r = -1 - (-4) = 3:     1 * (1 - sigma(0.1 * (3 - 1)))    = 1 - sigma(0.2)  = 0.450166
    undesirable r = -6 - (-5) = -1:  2 * (1 - sigma(0.1 * (1 - (-1)))) = 2 * (1 - sigma(0.2)) = 0.900332
    desirable r = -2 - (-2) = 0:     1 * (1 - sigma(0.1 * (0 - 1)))    = 1 - sigma(-0.1) = 0.524979
    rewards 0.1 * r = [0.3, -0.1, 0.0]; the batch loss is their mean, 0.625159."""
    params = KTOParams(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    out = kto_loss(torch.tensor([-1.0, -6.0, -2.0]), torch.tensor([-4.0, -5.0, -2.0]),
                   torch.tensor([True, False, True]), torch.tensor(1.0), params)  # fmt: skip
    expected = [1 - sig(0.2), 2 * (1 - sig(0.2)), 1 - sig(-0.1)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.450166, 0.900332, 0.524979], abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.3, -0.1, 0.0], abs=1e-7)
    assert float(out.losses.mean()) == pytest.approx(0.625159, abs=1e-6)
    assert UNPAIRED_LOSSES["kto"] is kto_loss


def test_weights_scale_only_their_label_and_rewards_do_not_backpropagate() -> None:
    policy = torch.tensor([-1.0, -6.0], requires_grad=True)
    ref, labels, z0 = torch.tensor([-4.0, -5.0]), torch.tensor([True, False]), torch.tensor(0.5)
    base = kto_loss(policy, ref, labels, z0, KTOParams(0.1, 1.0, 1.0)).losses
    scaled = kto_loss(policy, ref, labels, z0, KTOParams(0.1, 3.0, 0.5)).losses
    assert scaled.tolist() == pytest.approx([3 * base[0].item(), 0.5 * base[1].item()])
    out = kto_loss(policy, ref, labels, z0, KTOParams(0.1, 1.0, 1.0))
    out.losses.sum().backward()
    # d/dr of 1 - sigma(b (r - z0)) is -b sigma(z)(1 - sigma(z)): desirable pushed up, undesirable down
    z = 0.1 * (3 - 0.5)
    assert policy.grad.tolist()[0] == pytest.approx(-0.1 * sig(z) * (1 - sig(z)), abs=1e-7)
    assert policy.grad.tolist()[1] > 0 and not out.rewards.requires_grad


def test_reference_point_is_the_clamped_mean_of_mismatched_log_ratios() -> None:
    """diffs pi' - ref': [1, -1] -> mean 0 -> z0 0; [1, 2] -> 1.5; [-1, -2] -> -1.5 clamped to 0."""
    assert float(kto_reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]))) == 0.0
    assert float(kto_reference_point(torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -4.0]))) == 1.5
    assert float(kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -4.0]))) == 0.0
    pol = torch.tensor([-3.0, -2.0], requires_grad=True)
    assert not kto_reference_point(pol, torch.tensor([-4.0, -4.0])).requires_grad  # detached


def test_reference_point_averages_over_processes_before_the_clamp() -> None:
    """Two processes, each with 2 examples: process A's diffs [3, 1] (mean 2), B's [-4, -2] (mean -3).
    The pooled mean (3 + 1 - 4 - 2) / 4 = -0.5 is clamped to 0, although A alone would say 2; with B's
    [-1, 1] instead: (3 + 1 - 1 + 1) / 4 = 1. `reduce_sum` stands in for Dist.reduce_sum."""
    other = torch.tensor([-6.0, 2.0])  # B's (sum, count)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return t + other

    pol_a, ref_a = torch.tensor([-1.0, -3.0]), torch.tensor([-4.0, -4.0])  # diffs [3, 1]
    assert float(kto_reference_point(pol_a, ref_a)) == 2.0
    assert float(kto_reference_point(pol_a, ref_a, reduce_sum)) == 0.0
    other = torch.tensor([0.0, 2.0])
    assert float(kto_reference_point(pol_a, ref_a, reduce_sum)) == 1.0


def test_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="loss.beta"):
        KTOParams(beta=0.0)
    with pytest.raises(ConfigError, match="kto.undesirable_weight"):
        KTOParams(undesirable_weight=float("nan"))


# ---- the KL sequences -------------------------------------------------------------------------------
def test_kl_partners_rotate_a_seeded_shuffle_and_never_pick_themselves() -> None:
    for n in (2, 3, 10, 41):
        partners = kl_partners(n, seed=7)
        assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))
        order = kl_order(n, 7)
        assert [partners[order[k]] for k in range(n)] == [order[k - 1] for k in range(n)]  # TRL's rotation by one
    assert kl_partners(10, 7) == kl_partners(10, 7) != kl_partners(10, 8)
    assert kl_partners(1, 0) == [0]


def test_kl_sequence_is_own_prompt_then_the_others_completion() -> None:
    own = TokenizedCompletion([1, 5, 6, 7, 8, 2], [(3, 6)], index=4, label=True)  # prompt [1, 5, 6]
    other = TokenizedCompletion([1, 9, 20, 21, 2], [(2, 5)], index=0, label=False)  # prompt [1, 9]
    kl = kl_sequence(own, other, max_length=64)
    assert kl.input_ids == [1, 5, 6, 20, 21, 2] and kl.spans == [(3, 6)] and kl.index == 4 and kl.label is True
    cut = kl_sequence(own, other, max_length=5)  # cut at max_length, keeping the start (as TRL)
    assert cut.input_ids == [1, 5, 6, 20, 21] and cut.spans == [(3, 5)]
    assert kl_sequence(own, other, max_length=2).spans == [(3, 4)]  # never below one scored token


def test_labelled_rows_load_with_their_kl_sequences(tok: Any, tmp_path: Path) -> None:
    chat = {"prompt": [{"role": "user", "content": "Sky colour?"}],
            "completion": [{"role": "assistant", "content": "Blue."}], "label": False}  # fmt: skip
    rows = [{"prompt": "Hi there.", "completion": "lovely warm.", "label": True},
            {"prompt": "Describe it.", "completion": "grey muddy.", "label": False}, chat]  # fmt: skip
    examples, summary = load_completions([str(write(tmp_path / "kto.jsonl", rows))], tok, data_cfg(), labels=True)
    assert [e.label for e in examples] == [True, False, False] and summary.n_kept == 3
    ktos = kto_examples(examples, seed=0, max_length=64)
    partners = kl_partners(3, 0)
    for e, j in zip(ktos, partners):
        own, other = e.completion, examples[j]
        start, other_start = own.spans[0][0], other.spans[0][0]
        assert e.kl.input_ids == own.input_ids[:start] + other.input_ids[other_start:]
        assert [e.kl.input_ids[a:b] for a, b in e.kl.spans] == [other.input_ids[a:b] for a, b in other.spans]
    csv = tmp_path / "kto.csv"
    csv.write_text("prompt,completion,label\nHi there.,lovely.,true\nHi there.,grim.,False\n", encoding="utf-8")
    examples, _ = load_completions([str(csv)], tok, data_cfg(), labels=True)
    assert [e.label for e in examples] == [True, False]  # CSV cells are text: true / false read as booleans
    renamed = write(tmp_path / "renamed.jsonl", [{"q": "Hi.", "a": "ok.", "thumbs_up": True}])
    columns = {"prompt": "q", "completion": "a", "label": "thumbs_up"}
    examples, _ = load_completions([str(renamed)], tok, data_cfg(columns=columns), labels=True)
    assert examples[0].label is True


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"prompt": "Hi.", "completion": "ok.", "label": "yes"}, "label", "expected true (desirable) or false"),
        ({"prompt": "Hi.", "completion": "ok.", "label": 1}, "label", "got a number 1"),
        ({"prompt": "Hi.", "completion": "ok."}, "label", "missing field 'label'"),
        ({"prompt": "Hi.", "label": True}, "completion", "missing field 'completion'"),
        ({"messages": [{"role": "user", "content": "Hi."}], "label": True}, "messages", "split the conversation"),
    ],
)
def test_bad_rows_name_file_row_and_field(
    tok: Any, tmp_path: Path, row: dict[str, Any], field: str, needle: str
) -> None:
    path = write(tmp_path / "bad.jsonl", [{"prompt": "Fine.", "completion": "good.", "label": True}, row])
    with pytest.raises(DataError) as err:
        load_completions([str(path)], tok, data_cfg(), labels=True)
    assert err.value.field == field and needle in str(err.value)
    assert "bad.jsonl, line 2" in str(err.value)
    with pytest.raises(DataError, match="bad.jsonl, line 2"):  # the preflight finds it before a model loads
        check_completions([str(path)], data_cfg(), labels=True)
    kept, summary = load_completions([str(path)], tok, data_cfg(on_bad_row="skip"), labels=True)
    assert len(kept) == 1 and summary.n_skipped == 1


def test_pair_files_get_the_kto_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "Hi.", "chosen": "good.", "rejected": "bad."}])
    objective = KTOObjective(Config())
    with pytest.raises(DataError, match="`dpokit kto` reads unpaired rows: prompt, completion and a boolean label"):
        objective.preflight([str(path)], [])


# ---- batches and metrics ----------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
def test_batch_layout_holds_both_row_sets_and_the_labels(tok: Any, tmp_path: Path, packing: bool) -> None:
    rows = [{"prompt": f"Prompt {i}.", "completion": "word " * (i + 1), "label": i % 2 == 0} for i in range(4)]
    examples, _ = load_completions([str(write(tmp_path / "k.jsonl", rows))], tok, data_cfg(), labels=True)
    ktos = kto_examples(examples, seed=1, max_length=64)
    cfg = SimpleNamespace(pad_to_multiple_of=8, packing=packing, packing_max_tokens=0)
    batch = KTOCollator(build_completion_collator(cfg, tok.pad_token_id))(ktos)
    assert batch["label"].tolist() == [True, False, True, False]
    for prefix, seqs in (("", [e.completion for e in ktos]), ("kl_", [e.kl for e in ktos])):
        rows_, cols, targets, owners = batch[prefix + "score_index"]  # (4, M): the scored tokens of each sequence
        assert batch[prefix + "example_index"].tolist() == [0, 1, 2, 3]
        for k, seq in enumerate(seqs):
            assert targets[owners == k].tolist() == [seq.input_ids[t] for a, b in seq.spans for t in range(a, b)]
        assert batch[prefix + "input_ids"].shape[1] % 8 == 0 and ("position_ids" in batch) == packing


def test_metric_shares_average_to_per_label_means() -> None:
    """Rewards [0.3, -0.1, 0.0, 0.5], labels [T, F, T, T]: desirable mean (0.3 + 0 + 0.5) / 3, undesirable
    -0.1; with f_D = 3/4 the mean of the shares over the batch is exactly those."""
    params = KTOParams(0.1, 1.0, 1.0)
    policy, ref = torch.tensor([-1.0, -6.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -2.0, -8.0])
    labels, z0 = torch.tensor([True, False, True, True]), torch.tensor(0.25)
    out = kto_loss(policy, ref, labels, z0, params)
    values = kto_values(out, policy, labels, z0, None)
    row = dict(zip(KTO_KEYS, values.mean(dim=1).tolist()))
    assert values.shape == (len(KTO_KEYS), 4)
    assert row["rewards/desirable"] == pytest.approx((0.3 + 0.0 + 0.5) / 3)
    assert row["rewards/undesirable"] == pytest.approx(-0.1)
    assert row["rewards/margins"] == pytest.approx((0.3 + 0.0 + 0.5) / 3 + 0.1)
    assert row["logps/desirable"] == pytest.approx((-1 - 2 - 3) / 3) and row["logps/undesirable"] == pytest.approx(-6)
    assert row["kl"] == 0.25 and row["desirable"] == 0.75 and row["loss"] == pytest.approx(float(out.losses.mean()))
    only_desirable = kto_values(out, policy, torch.ones(4, dtype=torch.bool), z0, None)
    assert only_desirable[KTO_KEYS.index("rewards/undesirable")].abs().sum() == 0  # an absent label counts 0


# ---- config and warnings ----------------------------------------------------------------------------
def test_config_section_and_checks() -> None:
    cfg = Config().override(["kto.desirable_weight=1.33", "kto.undesirable_weight=0.5"])
    assert (cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (1.33, 0.5)
    with pytest.raises(ConfigError, match="unknown key 'kto.desirable'"):
        Config().override(["kto.desirable=1"])
    with pytest.raises(ConfigError, match="kto.desirable_weight and kto.undesirable_weight must be finite"):
        Config().override(["kto.desirable_weight=-1"]).validate()
    with pytest.raises(ConfigError, match="did you mean kto.undesirable_weight"):
        Config().override(["undesirable_weight=1"])
    with pytest.raises(ConfigError, match="needs a reference"):
        KTOObjective(Config().override(["reference.mode=none"])).validate()
    assert "desirable_weight: 1.0  # `dpokit kto`" in Config().to_yaml(commented=True)


def test_weight_balance_warning_follows_the_papers_range() -> None:
    """30 desirable, 10 undesirable, weights 1 and 1: lambda_D n_D / (lambda_U n_U) = 3. TRL's ranges:
    desirable_weight in [10 / 30, 10 / 30 * 1.33] = [0.33, 0.44], or undesirable_weight in
    [30 / 10 / 1.33, 30 / 10] = [2.26, 3]."""
    assert weight_balance_warning(20, 20, 1.0, 1.0) is None
    message = weight_balance_warning(30, 10, 1.0, 1.0)
    assert message and "= 3.00" in message and "[0.33, 0.44]" in message and "[2.26, 3]" in message
    assert weight_balance_warning(30, 10, 1.0, 2.5) is None and weight_balance_warning(30, 10, 0.4, 1.0) is None


def test_displacement_warning_reads_the_desirable_rewards_trend() -> None:
    falling = [{"rewards/desirable": r, "rewards/margins": m} for r, m in
               [(0.0, 0.1), (-0.02, 0.3), (-0.05, 0.5), (-0.08, 0.7), (-0.12, 0.9)]]  # fmt: skip
    assert "desirable completions pushed down" in (desirable_displacement(falling) or "")
    assert desirable_displacement(falling[:4]) is None  # too few rows
    rising = [{**r, "rewards/desirable": -r["rewards/desirable"]} for r in falling]
    assert desirable_displacement(rising) is None


def test_begin_step_takes_the_desirable_share_of_the_whole_step() -> None:
    """Two micro-batches, labels [T, F, F] and [T]: f_D = 2 / 4 for the step (not 1/3 and 1 per micro-batch)."""
    objective = KTOObjective(Config())
    objective.begin_step([{"label": torch.tensor([True, False, False])}, {"label": torch.tensor([True])}], Dist())
    assert objective.desirable["train"] == 0.5
