"""A Bradley-Terry reward model as an objective on the training loop (`dpokit reward`).

Same preference pairs as DPO (`dpokit.data.pairs`, with an optional per-pair ``margin`` column),
same batch layouts (padded, packed, prefix-shared: the prompt runs once for both responses), a
different model and loss. A batch of B pairs becomes:

    r_chosen, r_rejected = pair_rewards(model, batch)       one forward, last-token scores   (B,) each
    losses = bradley_terry_loss(r_chosen, r_rejected, margin, c)                               (B,)
        -> loss = losses.mean(); values = `reward_values(...)`                                 (5, B)

with ``losses = -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2``
(rows without a margin have margin 0; c = reward.center_rewards_coefficient). The mean over a batch
is TRL RewardTrainer's loss, its centring term included (Eisenstein et al. 2023, arXiv 2312.09244).
No reference model. The model (`dpokit.models.reward`) is AutoModelForSequenceClassification with
one output, LoRA (score head trained whole) or full, dropout off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.data import pairs as pair_data
from dpokit.data.collate import TokenizedPair
from dpokit.errors import DataError
from dpokit.models import layout
from dpokit.models import reward as reward_models
from dpokit.objectives.base import Batch, Objective
from dpokit.objectives.dpo import pair_length

# Per-pair quantities averaged over pairs, in this order (one device vector holds their sums).
REWARD_KEYS = ("loss", "reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected")


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, center_coefficient: float = 0.0
) -> Tensor:
    """Per-pair Bradley-Terry loss, unreduced: (B,) fp32.

        loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i) + c * (r_chosen_i + r_rejected_i)^2

    `margin` (B,) or None (0): how far the chosen reward must exceed the rejected one before the
    pair stops pulling (Llama 2's margin loss). `center_coefficient` c > 0 pulls the rewards of each
    pair towards a zero mean (the BT loss only sees differences, so the offset drifts freely).
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.device, torch.float32)
    losses = -F.logsigmoid(diff)  # stable for large |diff|: never log(0)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def reward_values(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """The per-pair metric values in REWARD_KEYS order: (5, B), detached fp32. A tie is not a win (as TRL)."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return torch.stack([losses.detach().float(), (chosen > rejected).float(), chosen - rejected, chosen, rejected])


class _WithMargins:
    """A pair collator of `dpokit.models.layout` whose batches also carry ``margin`` (B,) float32
    (TokenizedPair.margin, 0 where the row had none). Only this objective reads it, so the shared
    batch layouts of DPO stay as they are."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def describe(self) -> str:
        return self.inner.describe()

    def __call__(self, pairs: list[TokenizedPair]) -> Batch:
        batch = self.inner(pairs)
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
        return batch


_SFT_FIELDS = re.compile(r"\b(completion|messages)\b")


@contextmanager
def _pairs_expected() -> Iterator[None]:
    """A row without chosen/rejected that has SFT fields (prompt/completion, messages) gets a hint:
    the usual mistake is handing SFT data to the reward model."""
    try:
        yield
    except DataError as exc:
        if exc.field in ("chosen", "rejected") and _SFT_FIELDS.search(exc.detail):
            exc.args = (
                f"{exc.args[0]}. These look like SFT rows (prompt/completion or messages); `dpokit reward` trains "
                "on preference pairs: prompt, chosen, rejected (and optionally a numeric margin) per row",
            )
        raise


class RewardObjective(Objective):
    """Preference pairs -> a Bradley-Terry reward model (one score per prompt + response)."""

    name: ClassVar[str] = "reward"
    metric_keys: ClassVar[tuple[str, ...]] = REWARD_KEYS
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("loss", "loss", ".4f"),
        ("reward/accuracy", "acc", ".3f"),
        ("reward/margin", "margin", ".3f"),
        ("reward/chosen", "r_c", ".3f"),
    )
    unit: ClassVar[str] = "pairs"

    # ---- model and data ------------------------------------------------------------------------
    def load_model(self, dtype: torch.dtype) -> tuple[Any, Any]:
        return reward_models.load_reward_base(self.cfg, dtype)

    def save(self, model: Any, tokenizer: Any, out_dir: Path) -> dict[str, str]:
        return reward_models.save_reward_model(model, tokenizer, self.cfg, out_dir)

    def preflight(self, train_files: list[str], eval_files: list[str]) -> None:
        """Files exist and their first rows are valid pairs, before the model loads."""
        for files in (train_files, eval_files):
            if files:
                with _pairs_expected():
                    pair_data.check_pairs(files, self.cfg.data)

    def load_examples(
        self, files: list[str], tokenizer: Any, skipped_path: Path | None
    ) -> tuple[list[TokenizedPair], pair_data.DataSummary]:
        with _pairs_expected():
            return pair_data.load_pairs(files, tokenizer, self.cfg.data, skipped_path=skipped_path)

    def example_length(self, example: TokenizedPair) -> int:
        return pair_length(example)

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        # DPO's layouts: padded [chosen; rejected] rows, or packed / prefix-shared rows, + margins
        return _WithMargins(layout.build_collator(self.cfg.data, pad_token_id, model, device))

    # ---- the step ------------------------------------------------------------------------------
    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch of pairs and its per-pair values (len(REWARD_KEYS), B)."""
        chosen, rejected = reward_models.pair_rewards(model, batch)  # (B,) each
        losses = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.cfg.reward.center_rewards_coefficient)
        return losses.mean(), reward_values(losses, chosen, rejected)
