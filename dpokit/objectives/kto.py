"""KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) as an objective on the training loop (`dpokit kto`).

Rows are thumbs up / down: ``{"prompt", "completion", "label": true|false}``, prompt and completion
as text or as message lists (`dpokit.data.completions` reads them with ``labels=True``: the same
files, selection, truncation and bad-row handling as `dpokit sft`). No pairs: each example is one
completion, desirable (label true) or undesirable.

The reference point. KTO's value function compares each completion's log-ratio to the reference,
``r = log pi(y|x) - log ref(y|x)``, with z0, an estimate of KL(pi || ref). As TRL's KTOTrainer,
z0 is estimated from MISMATCHED sequences: example i's prompt followed by another example's
completion (its "KL sequence"), ``z0 = max(0, mean_i (log pi(y'_i|x_i) - log ref(y'_i|x_i)))``,
detached, over the batch. Which completion an example borrows is fixed when the split is loaded
(`kl_order`: a seeded shuffle of the split, each example taking the completion of the one before
it in that order, the first the last's: a rotation by one, TRL's rule, over the whole split rather
than within each batch). So the KL sequences do not depend on how examples are batched or split
over processes, and under DDP / FSDP the mean is over the GLOBAL micro-batch (one all-reduce of
its sum and count, `Dist.reduce_sum`): micro_batch 8 on one process and 4 on each of two give the
same z0 and the same step. With gradient accumulation each micro-batch has its own z0 (as TRL).
Evaluation uses each eval batch's own z0 on its process (no collective: processes may run different
numbers of eval batches), so eval/ numbers depend on train.eval_batch_size, as TRL's do; with the
eval set in one batch they are TRL's (tests/integration/test_kto.py).

Differences from TRL's KTOTrainer: the KL partner (above: TRL takes the previous row in dataset order,
within chunks of per_device_train_batch_size, and needs sequential sampling); truncation (dpokit cuts
the prompt to data.max_prompt_length, then the completion, as for SFT; TRL cuts prompt + completion at
max_length); prompt and completion are tokenised apart (TRL tokenises them joined and cuts at the
common prefix; the same ids unless tokens merge across the boundary); z0 over processes is the pooled
mean (TRL: the mean of per-process means, the same with equal batches). Loss, rewards and z0 are TRL's.

A batch of B examples (`KTOCollator`; SFT's padded or packed completion layouts, twice):

    input_ids, attention_mask, completion_mask | position_ids...,   prompt_i + completion_i       (B, T)
        score_index (4, M), example_index (B,)
    kl_input_ids, kl_... (the same keys, prefixed)                   prompt_i + completion_j     (B, T')
    label                                                            (B,) bool, True = desirable

    policy_kl = logps(policy, kl rows)          no grad                                         (B,)
    policy    = logps(policy, rows)             the only forward that backpropagates             (B,)
    ref, ref_kl = the reference on both         copy / adapter / precomputed table               (B,) each
    z0 = kto_reference_point(policy_kl, ref_kl, reduce over processes)                           ()
    KTOLossOutput(losses, rewards) = kto_loss(policy, ref, label, z0, params)                    (B,) each
        -> loss = losses.mean(); values (len(KTO_KEYS), B)

Metrics (`KTO_KEYS`; TRL's kl, rewards/chosen, rewards/rejected, logps/chosen, ... under KTO's names):
``loss``; ``rewards/desirable`` and ``rewards/undesirable``, the mean implicit reward ``beta * r`` over
the desirable / undesirable examples; ``rewards/margins`` their difference; ``logps/desirable`` and
``logps/undesirable``, the summed completion log-probs likewise; ``kl``, z0; ``desirable``, the share
of desirable examples. The loop averages per-example values over all examples, so the per-label means
are reported as shares (as SFT's per-token loss): example i contributes ``reward_i * 1[desirable_i] /
f_D`` with f_D the desirable share of the optimizer step (`begin_step`, over its micro-batches and
processes) or of the whole eval set (`prepare`), so a training row is the mean over its steps of each
step's desirable mean (a step without desirable examples counts 0) and an eval row the mean over the
eval set's desirable examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data import completions
from dpokit.data.completions import TokenizedCompletion
from dpokit.dist import Dist
from dpokit.errors import ConfigError, DataError, DpokitError
from dpokit.models import refcache
from dpokit.models import reference as references
from dpokit.models.forward import LM_HEAD_CHUNK, final_hidden, packed_model_inputs
from dpokit.models.inference import inference_batches
from dpokit.models.logps import indexed_logps
from dpokit.objectives.base import Batch, Objective, ObjectiveSetup
from dpokit.objectives.losses import UNPAIRED_LOSSES, KTOLossOutput, KTOParams, kto_reference_point
from dpokit.objectives.sft import build_completion_collator

__all__ = ["KTO_KEYS", "KTOExample", "KTOCollator", "KTOObjective", "kl_order", "kl_partners", "kl_sequence",
           "completion_logps", "kto_values", "weight_balance_warning", "desirable_displacement"]  # fmt: skip

KTO_KEYS = ("loss", "rewards/desirable", "rewards/undesirable", "rewards/margins", "logps/desirable",
            "logps/undesirable", "kl", "desirable")  # fmt: skip
KL_PREFIX = "kl_"  # the keys of the KL rows in a KTO batch


# ---- examples and batches ------------------------------------------------------------------------
@dataclass
class KTOExample:
    """One labelled completion and its KL sequence (its prompt + another example's completion)."""

    completion: TokenizedCompletion  # prompt + completion; .label True = desirable, .index its position in the split
    kl: TokenizedCompletion  # the same prompt + the completion of the example `kl_partners` gives it

    @property
    def label(self) -> bool:
        return bool(self.completion.label)


def kl_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of range(n): example order[k] borrows the completion of order[k - 1] (`kl_partners`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def kl_partners(n: int, seed: int) -> list[int]:
    """partner[i]: whose completion example i's KL sequence borrows. A rotation by one of `kl_order`
    (TRL's rule over a list), so no example borrows its own for n >= 2. Example: order [2, 0, 1] ->
    partner[2] = 1, partner[0] = 2, partner[1] = 0."""
    order = kl_order(n, seed)
    partner = list(range(n))
    for k, i in enumerate(order):
        partner[i] = order[k - 1]
    return partner


def kl_sequence(own: TokenizedCompletion, other: TokenizedCompletion, max_length: int) -> TokenizedCompletion:
    """`own`'s prompt (the tokens before its first scored one) + `other`'s completion, its scored spans
    shifted along; cut to `max_length` keeping the start (as TRL cuts its KL rows), never below one
    scored token."""
    start, other_start = own.spans[0][0], other.spans[0][0]
    shift = start - other_start
    ids = own.input_ids[:start] + other.input_ids[other_start:]
    spans = [(a + shift, b + shift) for a, b in other.spans]
    limit = max(max_length, start + 1)
    if len(ids) > limit:
        ids = ids[:limit]
        spans = [(a, min(b, limit)) for a, b in spans if a < limit]
    return TokenizedCompletion(ids, spans, own.index, own.label)


def kto_examples(examples: list[TokenizedCompletion], seed: int, max_length: int) -> list[KTOExample]:
    """Each example with its KL sequence (`kl_partners` of the split, seeded by train.seed)."""
    partners = kl_partners(len(examples), seed)
    return [KTOExample(ex, kl_sequence(ex, examples[j], max_length)) for ex, j in zip(examples, partners)]


class KTOCollator:
    """A completion collator (`dpokit.objectives.sft.build_completion_collator`: padded or packed) run
    on the examples and on their KL sequences; the KL keys get the prefix ``kl_``, plus ``label`` (B,)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def describe(self) -> str:
        return f"{self.inner.describe()}, twice: completions and KL sequences (prompt + another example's completion)"

    def __call__(self, examples: list[KTOExample]) -> Batch:
        batch = self.inner([e.completion for e in examples])
        batch.update({KL_PREFIX + k: v for k, v in self.inner([e.kl for e in examples]).items()})
        batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)  # (B,)
        return batch


# ---- log-probs -----------------------------------------------------------------------------------
def completion_logps(model: Any, batch: Batch, lm_head_chunk: int = LM_HEAD_CHUNK, prefix: str = "") -> Tensor:
    """(N,) fp32 summed log-probs of the scored tokens of a completion batch (`prefix` ``kl_``: its KL
    rows): one forward, the chunked LM head over the scored positions only (no (N, T, V) logits)."""
    sub = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else batch
    n = sub["example_index"].shape[0]
    r, t = sub["input_ids"].shape
    if "position_ids" in sub:  # packed rows: positions restart per example (or varlen segments)
        inputs = packed_model_inputs(model, sub)
    else:  # right padding under a causal mask is exact: no padding mask, SDPA's fused kernel
        inputs = {"input_ids": sub["input_ids"], "use_cache": False}
    head = final_hidden(model, inputs) if lm_head_chunk > 0 else None
    if head is not None:
        hidden, weight, bias = head
        acts = hidden.reshape(r, t, -1)  # (R, T, H)
        logps, _ = indexed_logps(acts, *sub["score_index"], n, lm_head_weight=weight, bias=bias,
                                 chunk_size=lm_head_chunk)  # fmt: skip
    else:
        logps, _ = indexed_logps(model(**inputs).logits.reshape(r, t, -1), *sub["score_index"], n)
    return logps  # (N,)


@torch.no_grad()
def reference_logps(ref: references.Reference, batch: Batch, lm_head_chunk: int) -> tuple[Tensor, Tensor]:
    """(completions, KL sequences) (B,) each under a live reference: a frozen copy, or the policy
    with its LoRA adapters off; in eval mode (no dropout)."""
    model = ref.policy if ref.mode == "adapter" else ref.model
    off = model.disable_adapter() if ref.mode == "adapter" else contextlib.nullcontext()
    with off:
        was_training = model.training
        model.eval()
        try:
            main = completion_logps(model, batch, lm_head_chunk)  # (B,)
            return main, completion_logps(model, batch, lm_head_chunk, KL_PREFIX)
        finally:
            model.train(was_training)


def precompute_tables(cfg: Config, setup: ObjectiveSetup, length: Callable[[Any], int]) -> dict[str, Tensor]:
    """Split -> (2, n) reference log-probs (completion, KL sequence) of every example, from the
    not-yet-trained policy (adapters off under LoRA) or reference.name_or_path, in one inference pass
    before training; each process runs every world-th batch and the tables are summed over processes.
    Kept in memory only (no disk cache, unlike DPO's `dpokit.models.refcache`)."""
    dist, chunk, tables = setup.dist, setup.lm_head_chunk, {}
    with refcache.live_reference_for_pass(cfg, setup.policy, setup.dtype, dist.device, chunk) as (live, _):
        for split, examples in setup.splits.items():
            if not examples:
                continue
            table = torch.zeros(2, len(examples), dtype=torch.float32, device=dist.device)  # (2, n)
            lengths = [length(e) for e in examples]
            for idx, batch in inference_batches(examples, lengths, setup.collator, cfg.train.eval_batch_size, dist):
                if idx:
                    table[:, batch["example_index"]] = torch.stack(reference_logps(live, batch, chunk))
            tables[split] = dist.reduce_sum(table)
            dist.print(f"reference log-probs [{split}]: precomputed, {len(examples)} examples and their KL sequences")
    return tables


# ---- metrics and warnings ------------------------------------------------------------------------
def kto_values(out: KTOLossOutput, policy_logps: Tensor, labels: Tensor, kl: Tensor, desirable: float | None) -> Tensor:
    """The per-example values in KTO_KEYS order: (8, B) detached fp32. Per-label means as shares:
    ``x_i * 1[desirable_i] / f_D`` (and ``/ f_U`` for the undesirable), f_D = `desirable`, the desirable
    share of the set the means are over (None: this batch); an absent label contributes 0."""
    d = labels.to(policy_logps.device).float()  # (B,)
    f_d = d.mean() if desirable is None else torch.tensor(float(desirable), device=d.device)
    des, und = d / f_d.clamp(min=1e-12), (1.0 - d) / (1.0 - f_d).clamp(min=1e-12)  # (B,) each
    rewards, logps = out.rewards.detach().float(), policy_logps.detach().float()
    return torch.stack([out.losses.detach().float(), rewards * des, rewards * und, rewards * (des - und),
                        logps * des, logps * und, kl.detach().float().expand_as(d), d])  # fmt: skip


def weight_balance_warning(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """A warning when lambda_D n_D / (lambda_U n_U) is outside [1, 4/3] (KTO paper Eq. 8) and neither
    weight is in the range that would fix it (TRL's rule and ranges), else None."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    ratio = desirable_weight * n_d / max(undesirable_weight * n_u, 1e-12)
    return (f"{n_desirable} desirable and {n_undesirable} undesirable training examples with kto.desirable_weight="
            f"{desirable_weight:g} and kto.undesirable_weight={undesirable_weight:g}: lambda_D n_D / (lambda_U n_U) = "
            f"{ratio:.2f}, outside the [1, 4/3] the KTO paper recommends (Eq. 8); set EITHER kto.desirable_weight in "
            f"[{d_lo:g}, {d_hi:g}] OR kto.undesirable_weight in [{u_lo:g}, {u_hi:g}]")  # fmt: skip


def desirable_displacement(history: Sequence[dict[str, Any]], min_drop: float = 0.05) -> str | None:
    """A warning when the desirable completions' reward ``beta * (log pi - log ref)`` falls steadily
    below 0 while the margin to the undesirable ones rises, else None: the loss is being lowered by
    pushing everything down, the undesirable completions faster (KTO's form of likelihood
    displacement). Read on the eval rows when there are 3, else the last 5 training rows; the reward
    must fall in 3/4 of the intervals, by `min_drop` overall, and end below -min_drop / 2."""
    for prefix, window in (("eval/", 3), ("", 5)):
        rows = [r for r in history if f"{prefix}rewards/desirable" in r and f"{prefix}rewards/margins" in r]
        if len(rows) >= window:
            break
    else:
        return None
    rows = rows[-window:]
    reward = [float(r[f"{prefix}rewards/desirable"]) for r in rows]
    margins = [float(r[f"{prefix}rewards/margins"]) for r in rows]
    falls = sum(b < a for a, b in zip(reward, reward[1:]))
    steady = falls * 4 >= 3 * (window - 1) and reward[0] - reward[-1] >= min_drop
    if not steady or reward[-1] > -min_drop / 2 or margins[-1] <= margins[0]:
        return None
    probe = "the eval set" if prefix else "the training batches"
    return (f"desirable completions pushed down: on {probe}, their reward beta * (log pi - log ref) fell from "
            f"{reward[0]:+.3f} to {reward[-1]:+.3f} over the last {window} log rows while rewards/margins rose from "
            f"{margins[0]:.3f} to {margins[-1]:.3f}; the model makes the desirable completions less likely than the "
            "reference does. Consider a larger kto.desirable_weight, a lower train.lr or a larger loss.beta")


@contextlib.contextmanager
def _labelled_rows_expected() -> Iterator[None]:
    """A file of preference pairs gets KTO's hint instead of SFT's (data.sft_target)."""
    try:
        yield
    except DataError as exc:
        if exc.detail.startswith(completions.PAIRS_NEED_TARGET):
            exc.args = (exc.args[0].replace(completions.PAIRS_NEED_TARGET, (
                "this file holds preference pairs; `dpokit kto` reads unpaired rows: prompt, completion and a boolean "
                "label (true: desirable), e.g. one row per side of each pair")),)  # fmt: skip
        raise


# ---- the objective -------------------------------------------------------------------------------
class KTOObjective(Objective):
    """Labelled completions -> the KTO loss against the reference (module docstring)."""

    name: ClassVar[str] = "kto"
    metric_keys: ClassVar[tuple[str, ...]] = KTO_KEYS
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("loss", "loss", ".4f"),
        ("kl", "kl", ".3f"),
        ("rewards/margins", "margin", ".3f"),
        ("rewards/desirable", "r_d", ".3f"),
    )
    unit: ClassVar[str] = "examples"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        k = cfg.kto
        self.params = KTOParams(cfg.loss.beta, k.desirable_weight, k.undesirable_weight)
        self.loss_fn = UNPAIRED_LOSSES["kto"]
        self.lm_head_chunk = LM_HEAD_CHUNK  # `prepare` takes the loop's choice
        self.dist = Dist()  # `prepare` takes the run's (z0 is reduced over its processes)
        self.reference: references.Reference | None = None  # live: copy or adapter
        self.tables: dict[str, Tensor] = {}  # split -> (2, n) precomputed reference log-probs
        self.desirable: dict[str, float] = {}  # split -> desirable share of the set the per-label means are over

    def validate(self) -> None:
        if self.cfg.reference.mode == "none":
            raise ConfigError("`dpokit kto` needs a reference (its rewards are log-ratios to it): reference.mode "
                              "auto, copy or adapter")  # fmt: skip
        if self.cfg.data.sft_target is not None:
            raise ConfigError("data.sft_target is for `dpokit sft`; `dpokit kto` reads prompt/completion/label rows: "
                              "remove the key")  # fmt: skip

    def reference_mode(self) -> str:
        """reference.mode with auto resolved: adapter with LoRA, copy without."""
        mode = self.cfg.reference.mode
        return ("adapter" if self.cfg.lora.enabled else "copy") if mode == "auto" else mode

    def memory_reference(self) -> str:
        return "precompute" if self.cfg.reference.precompute else self.reference_mode()

    # ---- data ----------------------------------------------------------------------------------
    def preflight(self, train_files: list[str], eval_files: list[str]) -> None:
        """Files exist and their first rows are labelled completions, before the model loads."""
        for files in (train_files, eval_files):
            if files:
                with _labelled_rows_expected():
                    completions.check_completions(files, self.cfg.data, labels=True)

    def load_examples(
        self, files: list[str], tokenizer: Any, skipped_path: Path | None
    ) -> tuple[list[KTOExample], completions.CompletionSummary]:
        with _labelled_rows_expected():
            examples, summary = completions.load_completions(files, tokenizer, self.cfg.data, skipped_path, labels=True)
        n_d = sum(bool(e.label) for e in examples)
        summary.notes.append(f"labels: {n_d} desirable, {len(examples) - n_d} undesirable; each example also scored "
                             "with another example's completion (KTO's KL reference point)")  # fmt: skip
        return kto_examples(examples, self.cfg.train.seed, self.cfg.data.max_length), summary

    def example_length(self, example: KTOExample) -> int:
        return max(len(example.completion.input_ids), len(example.kl.input_ids))

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        return KTOCollator(build_completion_collator(self.cfg.data, pad_token_id, model))

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self, setup: ObjectiveSetup) -> None:
        """The reference (a frozen copy, the LoRA base, or precomputed tables), the eval set's desirable
        share, and the warning about the weights when the training labels are unbalanced."""
        self.lm_head_chunk, self.dist = setup.lm_head_chunk, setup.dist
        if setup.splits.get("eval"):
            self.set_eval_examples(setup.splits["eval"])
        train = setup.splits.get("train") or []
        n_d = sum(e.label for e in train)
        warning = weight_balance_warning(n_d, len(train) - n_d, self.params.desirable_weight,
                                         self.params.undesirable_weight)  # fmt: skip
        if train and warning:
            setup.dist.print(f"warning: {warning}")
        if self.cfg.reference.precompute:
            setup.policy.to(setup.dist.device)
            self.tables = precompute_tables(self.cfg, setup, self.example_length)
            return
        mode, chunk = self.reference_mode(), setup.lm_head_chunk
        ref = references.build_reference(self.cfg, setup.policy, setup.dtype, mode, chunk)
        if ref.model is not None:  # a frozen copy: sharded like the policy under FSDP
            ref.model = setup.dist.place_frozen(ref.model)
        self.reference = ref

    def attach(self, policy: Any) -> None:
        if self.reference is not None and self.reference.mode == "adapter":
            self.reference.policy = policy  # adapters are toggled on the unwrapped module

    def set_reference(self, reference: references.Reference) -> None:
        """Use `reference` (a live copy or adapter Reference) for both splits: for callers that build their own."""
        self.reference, self.tables = reference, {}

    def set_eval_examples(self, examples: Sequence[KTOExample]) -> None:
        """Report eval per-label means over exactly these examples (the ones `evaluate_examples` sees)."""
        self.desirable["eval"] = sum(e.label for e in examples) / max(len(examples), 1)

    # ---- the step ------------------------------------------------------------------------------
    def begin_step(self, micro_batches: Sequence[Batch], dist: Dist) -> None:
        """The desirable share of the optimizer step over its micro-batches and processes (one
        all-reduce), for the per-label metric shares."""
        desirable = sum(int(b["label"].sum()) for b in micro_batches)  # host tensors: no sync
        examples = sum(b["label"].shape[0] for b in micro_batches)
        counts = dist.reduce_sum(torch.tensor([desirable, examples], dtype=torch.float64, device=dist.device))
        total_desirable, total = counts.tolist()
        self.desirable["train"] = total_desirable / max(total, 1.0)

    def reference_logps(self, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """(completions, KL sequences) (B,) each under the reference."""
        if split in self.tables:
            index = batch["example_index"]  # (B,)
            return self.tables[split][0, index], self.tables[split][1, index]
        if self.reference is None:
            raise DpokitError("KTOObjective has no reference: prepare() (the loop calls it) or set_reference() sets it")
        return reference_logps(self.reference, batch, self.lm_head_chunk)

    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """Mean KTO loss of one micro-batch and its per-example values (len(KTO_KEYS), B)."""
        labels = batch["label"]  # (B,) bool
        with torch.no_grad():
            policy_kl = completion_logps(model, batch, self.lm_head_chunk, KL_PREFIX)  # (B,)
        policy = completion_logps(model, batch, self.lm_head_chunk)  # (B,), with grad
        ref, ref_kl = self.reference_logps(batch, split)  # (B,) each
        # training: z0 over the global micro-batch; eval: this batch (processes run different numbers)
        reduce = self.dist.reduce_sum if split == "train" and self.dist.world > 1 else None
        kl = kto_reference_point(policy_kl, ref_kl, reduce)  # ()
        out = self.loss_fn(policy, ref, labels, kl, self.params)
        return out.losses.mean(), kto_values(out, policy, labels, kl, self.desirable.get(split))  # (), (8, B)

    # ---- reporting -----------------------------------------------------------------------------
    def check_rows(self, rows: Sequence[dict[str, Any]]) -> str | None:
        return desirable_displacement(rows)
