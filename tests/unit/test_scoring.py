"""dpokit/eval/scoring.py: log-probs of samples over the inference pass equal a naive per-sample
forward on the tiny llama, also sharded, and the KL estimate is policy minus reference (adapters off).

`win_rate` is covered with the demo's report (tests/unit/test_demo_report.py)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dpokit.config import Config
from dpokit.dist import Dist
from dpokit.eval.sampling import Sample
from dpokit.eval.scoring import kl_estimate, sequence_logps_of_samples
from dpokit.models.loading import apply_lora, load_model_and_tokenizer
from dpokit.models.logps import naive_sequence_logps
from tests.conftest import PRESETS


def _samples() -> list[Sample]:
    """Rows of different lengths, in no length order; scoring does not care which id is EOS."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n_prompt, n_resp, finished in [(5, 3, True), (9, 1, False), (3, 7, True), (12, 4, False), (4, 4, True)]:
        prompt = torch.randint(3, 60, (n_prompt,), generator=g).tolist()
        resp = torch.randint(3, 60, (n_resp,), generator=g).tolist()
        if finished:
            resp[-1] = 2
        out.append(Sample(prompt, resp, "", finished))
    return out


def _naive(model: Any, samples: list[Sample]) -> list[float]:
    """One unpadded forward per sample, full log_softmax."""
    result = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(s.prompt_ids) :] = True
            logps, _ = naive_sequence_logps(model(input_ids=ids).logits, ids, mask)
            result.append(float(logps[0]))
    return result


class _NoCollectives:
    """An accelerator stand-in for one rank of a simulated run: reducing returns this rank's share."""

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir: Path) -> Any:
    """The tiny llama with LoRA adapters moved away from zero, so policy and reference differ."""
    cfg = Config.from_yaml(PRESETS / "demo.yaml").override(
        [f"model.name_or_path={tiny_model_dir}", "model.attn_implementation=sdpa"]
    )
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), cfg, torch.float32)
    model = apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_sequence_logps_equal_naive_forward(lora_model: Any, batch_size: int) -> None:
    samples = _samples()
    got = sequence_logps_of_samples(lora_model, samples, batch_size=batch_size)
    assert got == pytest.approx(_naive(lora_model, samples), abs=1e-4, rel=1e-5)
    assert sequence_logps_of_samples(lora_model, []) == []


def test_sharded_pass_returns_every_value_on_each_rank(lora_model: Any) -> None:
    """With two ranks each runs half the batches; the sum over ranks puts all values everywhere.
    (Simulated: each rank's share is computed alone and the shares are added.)"""
    samples = _samples()
    shares = [
        sequence_logps_of_samples(lora_model, samples, 2, Dist(rank=r, world=2, accelerator=_NoCollectives()))
        for r in (0, 1)
    ]
    assert all(0.0 in share for share in shares)  # each rank left the other's samples at zero
    summed = [a + b for a, b in zip(*shares)]
    assert summed == pytest.approx(sequence_logps_of_samples(lora_model, samples, 2), abs=1e-5)


def test_kl_estimate_is_policy_minus_reference(lora_model: Any) -> None:
    samples = _samples()
    policy = _naive(lora_model, samples)
    with lora_model.disable_adapter():
        reference = _naive(lora_model, samples)
    diffs = [p - r for p, r in zip(policy, reference)]
    mean = sum(diffs) / len(diffs)
    sem = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    got_mean, got_sem = kl_estimate(lora_model, samples)
    assert abs(mean) > 1e-3  # the adapters matter, so the comparison means something
    assert got_mean == pytest.approx(mean, abs=1e-4) and got_sem == pytest.approx(sem, abs=1e-4)
    assert not lora_model.training
