"""Rollouts: sample responses with the one sampler, score them, and take the per-token quantities the
RL losses need (policy and reference log-probs, values) in one no-grad forward per model.

Batch layout of a rollout (documented in docs/design.md, "RL rollouts"): N = prompts x samples
responses, in prompt-major order (row ``i * k + j`` is sample j of prompt i).

* ``input_ids`` / ``attention_mask`` (N, T): prompt + response tokens, right-padded;
* ``positions`` (N, R): for response slot t of row i, the position whose logits predict that token
  (``len(prompt_i) - 1 + t``); 0 on padding slots;
* ``response_ids`` / ``mask`` (N, R): the generated tokens (EOS included when it came) and which slots
  are real.

Log-probs come from a forward over the whole row (not from the sampler's incremental decoding), so
the first PPO update sees ratio 1 up to float noise and the reference log-probs are taken the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpokit.eval.sampling import Sample
from dpokit.models.reward import position_scores


@dataclass
class RolloutBatch:
    """The token tensors of N sampled responses (see the module docstring for the layout)."""

    input_ids: Tensor  # (N, T) prompt + response, right-padded
    attention_mask: Tensor  # (N, T)
    positions: Tensor  # (N, R) logits position predicting each response slot
    response_ids: Tensor  # (N, R)
    mask: Tensor  # (N, R) bool: real response tokens

    def rows(self, idx: Tensor) -> RolloutBatch:
        """The sub-batch of rows ``idx``, trimmed to its own longest row and response (less padding)."""
        mask = self.mask[idx]
        width_r = max(1, int(mask.sum(1).max()))
        attn = self.attention_mask[idx]
        width_t = max(1, int(attn.sum(1).max()))
        return RolloutBatch(self.input_ids[idx, :width_t], attn[:, :width_t], self.positions[idx, :width_r],
                            self.response_ids[idx, :width_r], mask[:, :width_r])  # fmt: skip

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_batch(samples: Sequence[Sample], pad_id: int) -> RolloutBatch:
    """Right-padded tensors of ``samples`` (N of them). A response with no token at all (the model
    produced nothing before max_new_tokens, impossible with max_new_tokens >= 1) cannot occur."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    t = max(len(r) for r in rows)
    r = max(1, max(len(s.response_ids) for s in samples))
    n = len(samples)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    positions = torch.zeros((n, r), dtype=torch.long)
    response_ids = torch.full((n, r), pad_id, dtype=torch.long)
    mask = torch.zeros((n, r), dtype=torch.bool)
    for i, (s, row) in enumerate(zip(samples, rows)):
        lp, lr = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        positions[i, :lr] = torch.arange(lp - 1, lp - 1 + lr)
        response_ids[i, :lr] = torch.tensor(s.response_ids, dtype=torch.long)
        mask[i, :lr] = True
    return RolloutBatch(input_ids, attention_mask, positions, response_ids, mask)


def _gather_rows(x: Tensor, positions: Tensor) -> Tensor:
    """x (n, T, ...) at positions (n, R) -> (n, R, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], positions]


def response_logps(
    model: Any, batch: RolloutBatch, temperature: float, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(log-probs (n, R) fp32 of the response tokens under ``model`` at ``temperature``, their entropy (n, R)
    or None). One forward; runs with or without grad (the caller decides). Padding slots hold junk, masked
    by the caller."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # (n, T, V)
    picked = _gather_rows(logits, batch.positions).float() / temperature  # (n, R, V): only the response slots
    norm = torch.logsumexp(picked, dim=-1)  # (n, R)
    logps = picked.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - norm
    entropy = None
    if with_entropy:  # H = logsumexp(z) - sum softmax(z) * z
        entropy = norm - (torch.softmax(picked, dim=-1) * picked).sum(-1)
    return logps, entropy


def response_values(value_model: Any, batch: RolloutBatch) -> Tensor:
    """(n, R) fp32: the value model's estimate at the state before each response token."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    return _gather_rows(position_scores(value_model, inputs), batch.positions).float()


def chunks(n: int, size: int) -> Iterator[Tensor]:
    """Index tensors 0..n-1 in consecutive pieces of ``size``."""
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


@dataclass
class TokenStats:
    """The no-grad per-token quantities of a rollout, each (N, R) fp32 (values None without a value model)."""

    logps: Tensor
    ref_logps: Tensor
    entropy: Tensor
    values: Tensor | None


def token_stats(
    policy: Any, reference: Any, value_model: Any, batch: RolloutBatch, temperature: float, chunk: int,
    autocast: Any = contextlib.nullcontext,
) -> TokenStats:  # fmt: skip
    """Policy log-probs and entropy, reference log-probs and values of every response token, ``chunk``
    rows per forward. ``reference`` None: ``policy`` is a PEFT model and its reference is its base with the
    adapters disabled (no second copy in memory)."""
    n, r = batch.mask.shape
    out = {k: torch.zeros((n, r)) for k in ("logps", "ref_logps", "entropy", "values")}
    was = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            for idx in chunks(n, chunk):
                part = batch.rows(idx)
                w = part.mask.shape[1]
                with autocast():
                    logps, entropy = response_logps(policy, part, temperature, with_entropy=True)
                    ctx = policy.disable_adapter() if reference is None else contextlib.nullcontext()
                    with ctx:
                        ref_logps, _ = response_logps(policy if reference is None else reference, part, temperature)
                    values = response_values(value_model, part) if value_model is not None else None
                out["logps"][idx, :w], out["ref_logps"][idx, :w] = logps, ref_logps
                out["entropy"][idx, :w] = entropy  # type: ignore[assignment]
                if values is not None:
                    out["values"][idx, :w] = values
    finally:
        policy.train(was)
    return TokenStats(out["logps"], out["ref_logps"], out["entropy"], out["values"] if value_model is not None else None)
