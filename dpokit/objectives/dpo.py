"""DPO and its variants as an objective on the training loop (the worked example of `Objective`).

A batch of B preference pairs (`dpokit.data.collate` / `dpokit.data.packing` layouts) becomes:

    policy_chosen_logps, policy_rejected_logps   one forward of the policy   (B,) each
    ref_chosen_logps, ref_rejected_logps         the frozen reference        (B,) each, or None
    LossOutput(losses, chosen_rewards, rejected_rewards)                     (B,) each
        -> loss = losses.mean(); values = `pair_values(...)`                 (len(PAIR_KEYS), B)

The reference (`dpokit.models.reference`) is built in `prepare`: a frozen copy, the LoRA base with
adapters off, a precomputed table per split (`dpokit.models.refcache`), or none for
reference-free losses. The likelihood-displacement warning is DPO's (`check_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data import pairs as pair_data
from dpokit.data.collate import TokenizedPair
from dpokit.errors import ConfigError
from dpokit.models import layout, refcache
from dpokit.models import reference as references
from dpokit.models.forward import LM_HEAD_CHUNK, PolicyLogps, concatenated_logps
from dpokit.objectives.base import Batch, Objective, ObjectiveSetup
from dpokit.objectives.losses import LOSSES, LossOutput, LossParams, compute_loss

# Per-pair quantities averaged over pairs, in a fixed order (one device vector holds their sums).
PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logratios/chosen",
    "logratios/rejected",
)


def reference_mode(cfg: Config) -> str:
    """reference.mode with auto resolved: none for reference-free losses, else adapter with LoRA, copy without."""
    mode = cfg.reference.mode
    if mode == "auto":
        if LOSSES[cfg.loss.type].reference_free:
            return "none"
        return "adapter" if cfg.lora.enabled else "copy"
    return mode


def loss_params(cfg: Config) -> LossParams:
    lo = cfg.loss
    return LossParams(
        beta=lo.beta,
        label_smoothing=lo.label_smoothing,
        ipo_length_normalize=lo.ipo_length_normalize,
        simpo_gamma=lo.simpo_gamma,
    )


def pair_length(pair: TokenizedPair) -> int:
    """Tokens of the longer of the pair's two padded rows (the collator pads both to it)."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def per_token_logratio(policy_logps: Tensor, ref_logps: Tensor | None, lengths: Tensor) -> Tensor:
    """(log pi(y|x) - log ref(y|x)) / |y|: nats per response token the policy moved away from the
    reference (just log pi / |y| for reference-free losses). (B,) detached fp32.

    Per token and relative to the reference, so it compares across batches of different lengths
    and pairs: the summed `logps/chosen` of a batch mostly measures how long its responses are.
    """
    moved = policy_logps.detach().float() - (0.0 if ref_logps is None else ref_logps.detach().float())
    return moved / lengths.to(moved.device).float().clamp(min=1.0)


def pair_values(
    out: LossOutput, pol: PolicyLogps, ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None
) -> Tensor:
    """Stack the per-pair metric values in PAIR_KEYS order: (len(PAIR_KEYS), B), detached fp32."""
    chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    return torch.stack(
        [
            out.losses.detach().float(),
            chosen,
            rejected,
            chosen - rejected,
            (chosen > rejected).float(),
            pol.chosen_logps.detach().float(),
            pol.rejected_logps.detach().float(),
            per_token_logratio(pol.chosen_logps, ref_chosen_logps, pol.chosen_lengths),
            per_token_logratio(pol.rejected_logps, ref_rejected_logps, pol.rejected_lengths),
        ]
    )


def likelihood_displacement(history: Sequence[dict[str, Any]], min_drop: float = 0.05) -> str | None:
    """A warning when the chosen responses become steadily LESS likely than under the reference
    while the reward margins rise, else None. Pure: logged rows in, message out.

    DPO only pushes the *margin* up; it can do so while lowering the likelihood of the chosen
    responses too ("likelihood displacement", Razin et al. 2024), moving probability mass to
    responses that were in neither set. The signal is `logratios/chosen`: the per-token log-ratio
    policy / reference of the chosen responses. It is read on a fixed probe when there is one
    (the eval pairs, `eval/...` rows: the same pairs every time, so a trend is the model's and not
    the batches'), else on the training rows (different pairs each row; per token and relative to
    the reference, so lengths and easy-vs-hard pairs mostly cancel). Over the last `window` rows
    (3 eval rows, or 5 training rows) the log-ratio must fall in at least 3/4 of the intervals,
    by at least `min_drop` nats per token overall, and end at least `min_drop / 2` below 0 (the
    policy now finds the chosen responses clearly less likely than the reference did), while
    `rewards/margins` rises.
    """
    for prefix, window in (("eval/", 3), ("", 5)):
        rows = [r for r in history if f"{prefix}logratios/chosen" in r and f"{prefix}rewards/margins" in r]
        if len(rows) >= window:
            break
    else:
        return None
    rows = rows[-window:]
    ratio = [float(r[f"{prefix}logratios/chosen"]) for r in rows]
    margins = [float(r[f"{prefix}rewards/margins"]) for r in rows]
    falls = sum(b < a for a, b in zip(ratio, ratio[1:]))
    if falls * 4 < 3 * (window - 1) or ratio[0] - ratio[-1] < min_drop or ratio[-1] > -min_drop / 2 or margins[-1] <= margins[0]:
        return None
    probe = "the eval pairs" if prefix else "the training batches"
    return (
        f"likelihood displacement: on {probe}, the chosen responses' log-ratio to the reference fell from "
        f"{ratio[0]:+.3f} to {ratio[-1]:+.3f} nats/token over the last {window} log rows while rewards/margins "
        f"rose from {margins[0]:.3f} to {margins[-1]:.3f}; the model is making the preferred responses less "
        "likely too (Razin et al. 2024). Consider loss.nll_weight (e.g. 0.1-1.0) to keep the chosen log-probs up"
    )


class DPOObjective(Objective):
    """Preference pairs -> a registered preference loss (`loss.type`) against the reference."""

    name: ClassVar[str] = "dpo"
    metric_keys: ClassVar[tuple[str, ...]] = PAIR_KEYS
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("loss", "loss", ".4f"),
        ("rewards/accuracies", "acc", ".3f"),
        ("rewards/margins", "margin", ".3f"),
        ("logps/chosen", "logp_c", ".1f"),
    )
    unit: ClassVar[str] = "pairs"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.params = loss_params(cfg) if cfg.loss.type in LOSSES else None
        self.lm_head_chunk = LM_HEAD_CHUNK  # `prepare` takes the loop's choice
        # split -> reference; live references serve both splits, precomputed ones have a table each
        self.references: dict[str, references.Reference] = {}

    def validate(self) -> None:
        if self.cfg.loss.type not in LOSSES:
            raise ConfigError(f"loss.type '{self.cfg.loss.type}' is not one of: {', '.join(sorted(LOSSES))}")
        if self.cfg.data.sft_target is not None:  # a key of another objective would be silently ignored
            raise ConfigError("data.sft_target is for `dpokit sft` (supervised fine-tuning on the chosen responses); "
                              "`dpokit train` trains DPO on the pairs: remove the key")

    # ---- data ----------------------------------------------------------------------------------
    def load_examples(
        self, files: list[str], tokenizer: Any, skipped_path: Path | None
    ) -> tuple[list[TokenizedPair], pair_data.DataSummary]:
        return pair_data.load_pairs(files, tokenizer, self.cfg.data, skipped_path=skipped_path)

    def preflight(self, train_files: list[str], eval_files: list[str]) -> None:
        """Files exist and their first rows are valid pairs, before the model loads."""
        for files in (train_files, eval_files):
            if files:
                pair_data.check_pairs(files, self.cfg.data)

    def example_length(self, example: TokenizedPair) -> int:
        return pair_length(example)

    def memory_reference(self) -> str:
        mode = reference_mode(self.cfg)
        return "precompute" if self.cfg.reference.precompute and mode != "none" else mode

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        # padded [chosen; rejected] rows, or packed / prefix-shared rows (data.packing / data.prefix_sharing)
        return layout.build_collator(self.cfg.data, pad_token_id, model, device)  # the model sizes packed rows

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self, setup: ObjectiveSetup) -> None:
        """The reference: one live object for both splits, or one precomputed table per split, computed
        from the not-yet-trained policy (or loaded from the cache) so no reference model stays in memory."""
        cfg, dist = self.cfg, setup.dist
        self.lm_head_chunk = setup.lm_head_chunk
        mode = reference_mode(cfg)
        if cfg.reference.precompute and mode != "none":
            setup.policy.to(dist.device)  # the wrapper would move it next anyway
            self.references = refcache.precompute_references(
                cfg, setup.policy, setup.tokenizer, setup.dtype, setup.splits, setup.collator, dist, setup.lm_head_chunk
            )
            return
        ref = references.build_reference(cfg, setup.policy, setup.dtype, mode, setup.lm_head_chunk)
        if ref.model is not None:  # a frozen copy: sharded like the policy under FSDP
            ref.model = dist.place_frozen(ref.model)
        self.references = {"train": ref, "eval": ref}

    def attach(self, policy: Any) -> None:
        for ref in self.references.values():
            if ref.mode == "adapter":  # adapters are toggled on the unwrapped module the loop hands over
                ref.policy = policy

    def set_reference(self, reference: references.Reference, split: str | None = None) -> None:
        """Use `reference` for `split` (both splits when None): for callers that build their own."""
        for s in (split,) if split else ("train", "eval"):
            self.references[s] = reference

    # ---- the step ------------------------------------------------------------------------------
    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch of pairs and its per-pair metric values (len(PAIR_KEYS), B)."""
        pol = concatenated_logps(model, batch, self.lm_head_chunk)
        ref_chosen_logps, ref_rejected_logps = self.references[split].logps(batch)
        out = compute_loss(
            self.cfg.loss.type,
            pol.chosen_logps,
            pol.rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            pol.chosen_lengths,
            pol.rejected_lengths,
            self.params,
            nll_weight=self.cfg.loss.nll_weight,
        )
        return out.losses.mean(), pair_values(out, pol, ref_chosen_logps, ref_rejected_logps)

    # ---- reporting -----------------------------------------------------------------------------
    def check_rows(self, rows: Sequence[dict[str, Any]]) -> str | None:
        return likelihood_displacement(rows)
