"""Scoring sampled responses: their log-probs under a model, a KL estimate, win rates with a
bootstrap interval, and the score-length correlation.

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


KL_ESTIMATOR = "k1: mean over samples y ~ pi of sum_t [log pi(y_t) - log ref(y_t)]"


def kl_estimate(
    policy: Any, samples: Sequence[Sample], batch_size: int = 16, reference: Any = None
) -> tuple[float, float]:
    """(mean, standard error) over samples of sum_t [log pi(y_t) - log ref(y_t)] (`KL_ESTIMATOR`).

    The Monte-Carlo (k1) estimate of the sequence-level KL(pi || ref) when ``samples`` were drawn
    from pi itself (temperature 1, no top-p / top-k); under another sampling distribution it is the
    mean log-ratio over that distribution's samples, a close proxy rather than an unbiased estimate.
    ``reference``: the reference model; None means ``policy`` is a PEFT model whose reference is the
    same model with the adapters disabled.
    """
    return mean_and_sem(logratios(policy, samples, batch_size, reference))


def logratios(policy: Any, samples: Sequence[Sample], batch_size: int = 16, reference: Any = None) -> list[float]:
    """Per sample, sum_t [log pi(y_t) - log ref(y_t)] over its response tokens; ``reference`` as in
    `kl_estimate` (None: ``policy``'s PEFT base with the adapters disabled)."""
    pol = sequence_logps_of_samples(policy, samples, batch_size)
    if reference is None:
        with policy.disable_adapter():
            ref = sequence_logps_of_samples(policy, samples, batch_size)
    else:
        ref = sequence_logps_of_samples(reference, samples, batch_size)
    return [p - r for p, r in zip(pol, ref)]


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) with the n-1 variance; (nan, nan) for no values, sem 0 for one."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def win_rate(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of prompts where the candidate's response scores higher than the baseline's; ties count 1/2."""
    if not candidate:
        return float("nan")
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate)


def outcome(candidate: float, baseline: float) -> float:
    """1 for a win, 1/2 for a tie, 0 for a loss."""
    return 1.0 if candidate > baseline else 0.5 if candidate == baseline else 0.0


def prompt_outcomes(
    candidate: Sequence[Sequence[float | None]], baseline: Sequence[Sequence[float | None]]
) -> list[float]:
    """Per prompt, the mean outcome of sample j against the baseline's sample j (the same seed
    position), over the pairs both scored (None: a judge error). Prompts with no such pair are left
    out. With one sample per prompt this is `outcome` per prompt, and its mean is `win_rate`."""
    out = []
    for cand, base in zip(candidate, baseline):
        pairs = [outcome(c, b) for c, b in zip(cand, base) if c is not None and b is not None]
        if pairs:
            out.append(sum(pairs) / len(pairs))
    return out


def bootstrap_interval(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt: prompts are
    the resampled unit, so a prompt's samples stay together). Seeded, so a report is reproducible.

    Resamples ``len(values)`` values with replacement ``n_boot`` times; the bounds are the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means, linearly interpolated
    between order statistics (numpy's default ``percentile`` rule). (nan, nan) for no values.
    """
    import random

    if not values:
        return float("nan"), float("nan")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linear between order statistics (numpy's "linear" method)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of paired values; None when either side is constant or there are < 3 pairs."""
    if len(xs) != len(ys):
        raise ValueError(f"correlation of {len(xs)} and {len(ys)} values")
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
