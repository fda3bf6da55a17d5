"""Supervised fine-tuning (`dpokit sft`) as an objective on the training loop.

A batch of N completions (`dpokit.data.completions` layouts: padded or packed) becomes:

    logps, n_tokens, hits   one forward; the chunked LM head scores only the   (N,) each
                            completion tokens, so the (N, T, V) logits never exist
    SFTLossOutput(loss, nll, accuracy) = sft_loss(logps, n_tokens, hits)      (), (N,), (N,)
        -> loss; values = [nll, accuracy, n_tokens, logps]                    (len(SFT_KEYS), N)

The loss is the token-level NLL of the completion tokens only (prompt, earlier turns with
data.sft_loss_on=last_assistant, and padding are masked), normalised PER TOKEN OF THE OPTIMIZER STEP:
sum of the token NLLs / number of completion tokens in the whole step, over every micro-batch and
every process (TRL's completion-only loss with `num_items_in_batch`).

Gradient accumulation (and processes). Before the step's first forward the loop calls
`begin_step`, which counts the step's completion tokens and examples (one all-reduce with several
processes) and sets n_bar = tokens / examples. Each micro-batch's loss is then
``mean_i(-logps_i / n_bar)``; the loop divides it by train.grad_accum_steps and DDP averages over
processes, so the step's loss is sum(NLL) / sum(tokens) of the whole step: every token weighs the
same, and micro_batch 8 on one process, 4 on each of two, and 2 x 2 accumulation steps on two give
one gradient (equal-size micro-batches). Example: micro-batches A (3 tokens, NLL sum 6) and B (1
token, NLL 1), one example each: n_bar = 4 / 2 = 2, A's loss 6 / 2 = 3, B's 1 / 2 = 0.5, step loss
(3 + 0.5) / 2 = 1.75 = (6 + 1) / 4 (a mean of the micro-batches' own per-token losses would give
(6/3 + 1/1) / 2 = 1.5, and would change with how the step is split). Without `begin_step` (a direct
`batch_values` call), n_bar is the micro-batch's own.

Metrics. The loop averages per-example `values` over examples (`MetricAccumulator`), so per-token
quantities are reported as per-example SHARES: example i contributes ``nll_i / n_bar`` with n_bar
the mean completion tokens per example of the set the loss is a per-token mean over, so the mean
of the shares over that set is sum(nll) / sum(tokens). Keys (`SFT_KEYS`):

    loss                 per-token NLL. Training rows: the mean over the logged steps of each step's
                         per-token loss, i.e. the loss that was minimised. Eval rows: the per-token
                         NLL over the WHOLE eval set (n_bar of the eval set, from `prepare`), which does not
                         depend on eval batching; TRL's eval_loss averages per-batch per-token losses
                         weighted by batch size, so the two agree when TRL evaluates in one batch.
    mean_token_accuracy  share of completion tokens whose argmax prediction is the token (TRL's name),
                         averaged like `loss`.
    tokens               completion tokens per example.
    logps                summed log-probability of an example's completion; -logps / tokens of any row
                         (both are means over the same examples) is the token-weighted NLL of exactly
                         those examples, whatever the batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data import completions
from dpokit.data.completions import CompletionCollator, PackedCompletionCollator, TokenizedCompletion
from dpokit.dist import Dist
from dpokit.models.forward import LM_HEAD_CHUNK, final_hidden, packed_model_inputs
from dpokit.models.layout import attention_cost_tokens, attn_implementation_of
from dpokit.models.logps import indexed_logps
from dpokit.models.varlen import IMPL_NAME as VARLEN
from dpokit.objectives.base import Batch, Objective, ObjectiveSetup

__all__ = ["SFT_KEYS", "SFTLossOutput", "sft_loss", "CompletionScores", "completion_scores", "SFTObjective"]

SFT_KEYS = ("loss", "mean_token_accuracy", "tokens", "logps")


class SFTLossOutput(NamedTuple):
    """The SFT loss of a batch and each example's share of it.

    Attributes:
        loss: () per-token NLL, the scalar that backpropagates.
        nll: (N,) detached fp32: example i's share ``-logps_i / n_bar``; their mean is `loss`.
        accuracy: (N,) detached fp32: ``hits_i / n_bar``; their mean is the token accuracy.
    """

    loss: Tensor
    nll: Tensor
    accuracy: Tensor


def sft_loss(
    logps: Tensor, n_tokens: Tensor, hits: Tensor | None = None, mean_tokens: float | None = None
) -> SFTLossOutput:
    """Completion-only NLL normalised per token: ``sum_i -logps_i / sum_i n_tokens_i``.

    Args:
        logps: (N,) summed log-probabilities of each example's completion tokens (fp32).
        n_tokens: (N,) completion tokens per example.
        hits: (N,) completion tokens whose argmax prediction was right (None: zeros).
        mean_tokens: n_bar, the mean completion tokens per example of the set the loss is a per-token
            mean over; None = this batch (``sum(n_tokens) / N``): the training loss. Evaluation passes
            the eval set's, so the shares average to the per-token NLL of the whole set.

    Example (N = 2): logps = [-6, -1], n_tokens = [3, 1], hits = [2, 1]. n_bar = 4 / 2 = 2, so
    nll = [6 / 2, 1 / 2] = [3.0, 0.5] and loss = (3.0 + 0.5) / 2 = 1.75 = (6 + 1) / (3 + 1): per token.
    (Per sequence it would be (6/3 + 1/1) / 2 = 1.5.) accuracy = [2 / 2, 1 / 2] = [1.0, 0.5], mean
    0.75 = 3 of 4 tokens right. With mean_tokens = 2.5 (an eval set of 10 tokens in 4 examples):
    nll = [2.4, 0.4].
    """
    n = logps.shape[0]
    if mean_tokens is None:
        n_bar = n_tokens.sum().clamp(min=1).to(logps.dtype) / n  # () mean completion tokens per example
    else:
        n_bar = torch.as_tensor(float(mean_tokens), dtype=logps.dtype, device=logps.device)
    nll = -logps / n_bar  # (N,)
    correct = torch.zeros_like(logps) if hits is None else hits.to(logps.dtype)
    return SFTLossOutput(nll.mean(), nll.detach().float(), (correct / n_bar).detach().float())


@dataclass
class CompletionScores:
    """Per-example outputs of one forward over a completion batch (N examples)."""

    logps: Tensor  # (N,) fp32 summed log-probs of the completion tokens (differentiable)
    n_tokens: Tensor  # (N,) long completion tokens
    hits: Tensor  # (N,) fp32 detached: completion tokens whose argmax prediction is the token


@torch.no_grad()
def argmax_hits(acts: Tensor, score_index: Tensor, n: int, weight: Tensor | None = None,
                bias: Tensor | None = None, chunk: int = LM_HEAD_CHUNK) -> Tensor:  # fmt: skip
    """(N,) count of scored tokens that are the argmax of their logits, chunk by chunk.

    `acts`: (R, T, V) logits, or (R, T, H) hidden states with the LM head `weight` (V, H) (+ bias),
    whose logits are formed only for `chunk` scored positions at a time (one extra head matmul over
    the scored positions, no gradient: what the accuracy metric costs).
    """
    rows, cols, targets, seqs = score_index  # (M,) each
    hit = torch.empty(rows.shape[0], dtype=torch.float32, device=acts.device)  # (M,)
    for start in range(0, rows.shape[0], max(chunk, 1)):
        sl = slice(start, start + max(chunk, 1))
        block = acts[rows[sl], cols[sl]]  # (c, V) logits or (c, H) hidden states
        if weight is not None:
            block = block @ weight.t() if bias is None else torch.addmm(bias, block, weight.t())  # (c, V)
        hit[sl] = (block.argmax(-1) == targets[sl]).float()
    return torch.zeros(n, dtype=torch.float32, device=acts.device).index_add_(0, seqs, hit)


def completion_scores(model: Any, batch: Batch, lm_head_chunk: int = LM_HEAD_CHUNK) -> CompletionScores:
    """One forward over a padded or packed completion batch; scores its `score_index` tuples.

    Padded rows run without their padding mask (right padding under a causal mask is exact, and SDPA
    keeps its fused kernel); packed rows get `dpokit.models.forward`'s packed inputs (positions, or
    varlen segments). With `lm_head_chunk > 0` and a plain Linear head, logits exist only for the
    scored positions, `lm_head_chunk` at a time.
    """
    n = batch["example_index"].shape[0]
    r, t = batch["input_ids"].shape
    index = batch["score_index"]  # (4, M): row, col, target, example
    if "position_ids" in batch:
        inputs = packed_model_inputs(model, batch)
    else:
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    head = final_hidden(model, inputs) if lm_head_chunk > 0 else None
    if head is not None:
        hidden, weight, bias = head
        acts = hidden.reshape(r, t, -1)  # (R, T, H) (un-flattened for flash)
        logps, n_tokens = indexed_logps(acts, *index, n, lm_head_weight=weight, bias=bias, chunk_size=lm_head_chunk)
        hits = argmax_hits(
            acts.detach(), index, n, weight.detach(), None if bias is None else bias.detach(), lm_head_chunk
        )
    else:
        acts = model(**inputs).logits.reshape(r, t, -1)  # (R, T, V)
        logps, n_tokens = indexed_logps(acts, *index, n)
        hits = argmax_hits(acts.detach(), index, n)
    return CompletionScores(logps, n_tokens, hits)


def build_completion_collator(
    data: Any, pad_token_id: int, model: Any = None
) -> CompletionCollator | PackedCompletionCollator:
    """Padded rows, or packed rows with data.packing (sized for the model's attention cost, varlen
    segments when it runs dpokit's varlen kernel). data.prefix_sharing has nothing to share here."""
    multiple = data.pad_to_multiple_of or None
    if not data.packing:
        return CompletionCollator(pad_token_id, pad_to_multiple_of=multiple)
    return PackedCompletionCollator(
        pad_token_id, max_tokens=data.packing_max_tokens, pad_to_multiple_of=multiple,
        attention_tokens=attention_cost_tokens(model) if model is not None else 4096.0,
        varlen=model is not None and attn_implementation_of(model) == VARLEN,
    )  # fmt: skip


class SFTObjective(Objective):
    """Completions -> the per-token NLL of their completion tokens (module docstring)."""

    name: ClassVar[str] = "sft"
    metric_keys: ClassVar[tuple[str, ...]] = SFT_KEYS
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("loss", "loss", ".4f"),
        ("mean_token_accuracy", "acc", ".3f"),
        ("tokens", "tok", ".1f"),
    )
    unit: ClassVar[str] = "examples"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.lm_head_chunk = LM_HEAD_CHUNK  # `prepare` takes the loop's choice
        self.mean_tokens: dict[str, float] = {}  # split -> n_bar of the set its loss is a per-token mean over

    # ---- data ----------------------------------------------------------------------------------
    def preflight(self, train_files: list[str], eval_files: list[str]) -> None:
        """Files exist and hold rows `dpokit sft` reads (first rows checked), before the model loads."""
        for files in (train_files, eval_files):
            if files:
                completions.check_completions(files, self.cfg.data)

    def load_examples(
        self, files: list[str], tokenizer: Any, skipped_path: Path | None
    ) -> tuple[list[TokenizedCompletion], completions.CompletionSummary]:
        return completions.load_completions(files, tokenizer, self.cfg.data, skipped_path=skipped_path)

    def example_length(self, example: TokenizedCompletion) -> int:
        return len(example.input_ids)

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        return build_completion_collator(self.cfg.data, pad_token_id, model)

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self, setup: ObjectiveSetup) -> None:
        self.lm_head_chunk = setup.lm_head_chunk
        if setup.splits.get("eval"):
            self.set_eval_examples(setup.splits["eval"])

    def set_eval_examples(self, examples: list[TokenizedCompletion]) -> None:
        """Make eval `loss` / `mean_token_accuracy` per-token over exactly these examples (the ones
        `evaluate_examples` will see); without it each eval batch is normalised by its own tokens."""
        self.mean_tokens["eval"] = sum(e.n_scored for e in examples) / max(len(examples), 1)

    # ---- the step ------------------------------------------------------------------------------
    def begin_step(self, micro_batches: Sequence[Batch], dist: Dist) -> None:
        """The training loss is per token over the whole optimizer step (every micro-batch, every
        process), not over each micro-batch: n_bar = the step's completion tokens / its examples, so
        micro_batch 8 x 1 process, 4 x 2 processes and 4 x 2 accumulation steps give one gradient
        (means of per-micro-batch token means would weigh a short micro-batch's tokens more)."""
        tokens = sum(b["score_index"].shape[1] for b in micro_batches)  # host tensors: no sync
        examples = sum(b["example_index"].shape[0] for b in micro_batches)
        counts = dist.reduce_sum(torch.tensor([tokens, examples], dtype=torch.float64, device=dist.device))
        total_tokens, total_examples = counts.tolist()
        self.mean_tokens["train"] = max(total_tokens, 1.0) / max(total_examples, 1.0)

    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        """Per-token NLL of one micro-batch and its per-example values (len(SFT_KEYS), N)."""
        scores = completion_scores(model, batch, self.lm_head_chunk)
        out = sft_loss(scores.logps, scores.n_tokens, scores.hits, self.mean_tokens.get(split))
        values = torch.stack([out.nll, out.accuracy, scores.n_tokens.float(), scores.logps.detach().float()])
        return out.loss, values  # (), (4, N)
