"""Equivalences that must hold on a real (tiny) model:
- micro_batch 4 x accum 1 == micro_batch 1 x accum 4 (gradients and logged metrics);
- the LoRA adapter-disabled reference == a frozen copy of the base;
- the chunked LM-head path == the full-logits path (values and gradients)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.config import Config
from dpokit.data import pairs as data
from dpokit.data.collate import PreferenceCollator
from dpokit.dist import make_accelerator
from dpokit.models.forward import concatenated_logps
from dpokit.models.loading import load_policy
from dpokit.models.reference import build_reference
from dpokit.objectives.base import MetricAccumulator
from dpokit.objectives.dpo import PAIR_KEYS, DPOObjective, reference_mode
from dpokit.training.loop import accumulate_gradients
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]


def _setup(model_dir: Path, *overrides: str):
    cfg = Config.from_yaml(PRESETS / "tiny.yaml").override([f"model.name_or_path={model_dir}", *overrides])
    policy, tok = load_policy(cfg, torch.float32)
    pairs, _ = data.load_pairs([str(TOY / "train.jsonl")], tok, cfg.data)
    return cfg, policy, tok, pairs


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir)
    objective = DPOObjective(cfg)
    objective.lm_head_chunk = 1024
    objective.set_reference(build_reference(cfg, policy, torch.float32, reference_mode(cfg)))
    policy.train()
    collate = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)
    acc = make_accelerator("no", cpu=True)  # fp32, whatever precision an earlier test's run used
    chosen = pairs[:4]
    results = []
    for layout in ([chosen], [[p] for p in chosen]):  # 4 x 1 vs 1 x 4
        policy.zero_grad(set_to_none=True)
        running = MetricAccumulator()
        accumulate_gradients(acc, policy, objective, [collate(b) for b in layout], running)
        results.append((_grads(policy), running.compute(PAIR_KEYS)))
    (g1, m1), (g2, m2) = results
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)
    for key in PAIR_KEYS:
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key


def test_accumulation_invariance_through_the_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = {}
    for name, mbs, accum in (("a", 4, 1), ("b", 1, 4)):
        out = tmp_path / name
        code = main(["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={tiny_model_dir}",
                     f"train.output_dir={out}", f"data.train_files=[{TOY / 'train.jsonl'}]", "data.eval_files=[]",
                     "train.max_steps=3", "train.log_every=1", f"train.micro_batch_size={mbs}",
                     f"train.grad_accum_steps={accum}", "train.progress_bar=false", "train.lr=1e-4"])
        assert code == 0
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows["a"], rows["b"]):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4, rel=1e-4), (ra["step"], key)


def test_adapter_reference_equals_frozen_copy(tiny_model_dir: Path) -> None:
    cfg, policy, tok, pairs = _setup(tiny_model_dir, "lora.enabled=true", "lora.r=4")
    copy_ref = build_reference(cfg, policy, torch.float32, "copy")
    adapter_ref = build_reference(cfg, policy, torch.float32, "adapter")
    assert copy_ref.mode == "copy" and adapter_ref.mode == "adapter"
    with torch.no_grad():  # "train" the adapter: make lora_B non-zero so the policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = PreferenceCollator(tok.pad_token_id)(pairs[:6])
    c_chosen, c_rejected = copy_ref.logps(batch)
    a_chosen, a_rejected = adapter_ref.logps(batch)
    torch.testing.assert_close(a_chosen, c_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_rejected, c_rejected, atol=1e-5, rtol=1e-5)
    pol = concatenated_logps(policy, batch)
    assert not torch.allclose(pol.chosen_logps, c_chosen, atol=1e-3)  # the adapter is really on for the policy


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_lm_head_equals_full_logits_path(tmp_path: Path, tied: bool) -> None:
    from dpokit.models.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "m", seed=3, tie_word_embeddings=tied)
    cfg, policy, tok, pairs = _setup(model_dir)
    batch = PreferenceCollator(tok.pad_token_id)(pairs[:5])
    outs = []
    for chunk in (0, 7):  # 0 = full logits + sequence_logps; 7 = decoder + chunked head
        model = copy.deepcopy(policy)
        res = concatenated_logps(model, batch, lm_head_chunk=chunk)
        (res.chosen_logps.sum() - 2 * res.rejected_logps.sum()).backward()
        outs.append((res, _grads(model)))
    (r0, g0), (r1, g1) = outs
    torch.testing.assert_close(r1.chosen_logps, r0.chosen_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r1.rejected_logps, r0.rejected_logps, atol=1e-4, rtol=1e-5)
    assert torch.equal(r1.chosen_lengths, r0.chosen_lengths)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)
