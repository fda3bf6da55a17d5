"""Scoring sampled responses: their log-probs under a model, a KL estimate, and win rates.

Log-probs of samples go through the one inference pass (`dpokit.models.inference`): the same
length-sorted, sharded batching that pair evaluation and the reference precompute use, here over
rows ``prompt_ids + response_ids`` whose response tokens are scored (`dpokit.models.logps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dpokit.dist import Dist
from dpokit.eval.sampling import Sample
from dpokit.models.inference import inference_batches
from dpokit.models.logps import sequence_logps


def _collate_samples(samples: list[Sample]) -> dict[str, Tensor]:
    """Right-padded rows ``prompt_ids + response_ids``, with the response tokens marked for scoring.

    The pad id is irrelevant: padded positions are masked from attention and never scored, and
    right padding leaves every real position's causal context unchanged.
    """
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, (s, r) in enumerate(zip(samples, rows)):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[k, : len(r)] = 1
        completion[k, len(s.prompt_ids) : len(r)] = True
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": completion}


def sequence_logps_of_samples(
    model: Any, samples: Sequence[Sample], batch_size: int = 16, dist: Dist | None = None
) -> list[float]:
    """Summed log-probs of each sample's response tokens under ``model``, in the order of ``samples``.

    ``dist`` (default: this process alone, on the model's device) shards the batches; the per-sample
    values are summed over processes, so every process gets all of them.
    """
    if not samples:
        return []
    dist = dist or Dist.local(next(model.parameters()).device)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    values = torch.zeros(len(samples), dtype=torch.float32, device=dist.device)
    was_training = model.training
    model.eval()
    try:
        for idx, batch in inference_batches(samples, lengths, _collate_samples, batch_size, dist):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps, _ = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
            values[torch.tensor(idx, device=dist.device)] = logps.float()
        with torch.inference_mode():
            values = dist.reduce_sum(values)
    finally:
        model.train(was_training)
    return [float(v) for v in values.cpu()]


def kl_estimate(policy: Any, samples: Sequence[Sample], batch_size: int = 16) -> tuple[float, float]:
    """(mean, standard error) over samples of sum_t [log pi(y_t) - log ref(y_t)].

    The Monte-Carlo estimate of the sequence-level KL(pi || ref) when ``samples`` were drawn from pi.
    ``policy`` is a PEFT model; its reference is the same model with the adapters disabled.
    """
    pol = sequence_logps_of_samples(policy, samples, batch_size)
    with policy.disable_adapter():
        ref = sequence_logps_of_samples(policy, samples, batch_size)
    diffs = [p - r for p, r in zip(pol, ref)]
    if not diffs:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def win_rate(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of prompts where the candidate's response scores higher than the baseline's; ties count 1/2."""
    if not candidate:
        return float("nan")
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate)
