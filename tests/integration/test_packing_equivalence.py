"""Every fast layout equals the padded (naive) layout on a real tiny Llama:
per-sequence log-probs and lengths, parameter gradients of a loss on them, and a CLI training run's
logged metrics, for packing, prefix sharing, and both."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.config import Config
from dpokit.data import pairs as data
from dpokit.data.collate import PreferenceCollator
from dpokit.data.packing import PackedCollator, block_causal_mask
from dpokit.models.forward import concatenated_logps
from dpokit.models.loading import load_policy
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]

LAYOUTS = {
    "packing": {"packing": True, "attention_tokens": 288},  # auto rows; K of the tiny Llama
    "packing_budget": {"packing": True, "max_tokens": 64},  # first-fit rows of <= 64 tokens
    "packing_one_row": {"packing": True, "attention_tokens": math.inf},  # as for flash attention
    "prefix_sharing": {"packing": False, "prefix_sharing": True},
    "both": {"packing": True, "prefix_sharing": True, "attention_tokens": 288},
}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):  # noqa: ANN201
    """(cfg, tokenizer, pairs, {attn_implementation: policy}); the models are deep-copied per test."""
    cfg = Config.from_yaml(PRESETS / "tiny.yaml").override([f"model.name_or_path={tiny_model_dir}"])
    models = {}
    for impl in ("sdpa", "eager", "varlen"):  # varlen: dpokit/models/varlen.py (its slow CPU path here)
        over = [f"model.attn_implementation={impl}", "data.packing=true"]
        models[impl], tok = load_policy(cfg.override(over), torch.float32)
    pairs, _ = data.load_pairs([str(TOY / "train.jsonl")], tok, cfg.data)
    # pairs 0-5, plus 3 with a longer prompt (their own, twice) so prompts dominate some pairs
    longer = [dataclasses.replace(p, prompt_ids=p.prompt_ids * 2) for p in pairs[6:9]]
    return cfg, tok, pairs[:6] + longer, models


def _run(model: torch.nn.Module, batch: dict, lm_head_chunk: int):  # noqa: ANN202
    model = copy.deepcopy(model)
    model.train()
    # as in a reference loaded with from_pretrained: with a KV cache transformers would skip its
    # packed-sequence detection, so the packed path must switch the cache off itself
    model.config.use_cache = True
    res = concatenated_logps(model, batch, lm_head_chunk=lm_head_chunk)
    # a DPO-like loss that weights every sequence differently, so a swapped sequence would show
    w = torch.linspace(0.5, 1.5, res.chosen_logps.numel())
    loss = -torch.nn.functional.logsigmoid(0.1 * w * (res.chosen_logps - res.rejected_logps)).sum() - 0.01 * res.rejected_logps.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return res, grads


# sdpa: every layout with the decoder + chunked head (lm_head_chunk 1024, the trainer's default);
# full logits + indexed_logps for packing and for prefix sharing (whose prompt-end positions are
# scored twice); eager (additive 4D mask / transformers' own packed mask): one of each.
CASES = [("sdpa", layout, 1024) for layout in LAYOUTS] + [
    ("sdpa", "packing", 0),
    ("sdpa", "both", 0),
    ("eager", "both", 1024),
    ("eager", "packing", 0),
    ("varlen", "packing_one_row", 1024),
    ("varlen", "packing_budget", 0),  # several rows, flattened into one token stream
    ("varlen", "prefix_sharing", 1024),
    ("varlen", "both", 1024),
]


@pytest.mark.parametrize(("impl", "layout", "lm_head_chunk"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_layout_equals_padded(loaded, layout: str, lm_head_chunk: int, impl: str) -> None:  # noqa: ANN001
    _, tok, pairs, models = loaded
    padded = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)(pairs)
    packed = PackedCollator(tok.pad_token_id, pad_to_multiple_of=8, varlen=impl == "varlen", **LAYOUTS[layout])(pairs)
    # the fast layout really is smaller than the padded one
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["attention_mask"].sum() <= padded["attention_mask"].sum()
    (r0, g0), (r1, g1) = (_run(models[impl], b, lm_head_chunk) for b in (padded, packed))
    torch.testing.assert_close(r1.chosen_logps, r0.chosen_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r1.rejected_logps, r0.rejected_logps, atol=1e-4, rtol=1e-5)
    assert torch.equal(r1.chosen_lengths, r0.chosen_lengths) and torch.equal(r1.rejected_lengths, r0.rejected_lengths)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_transformers_detects_our_packed_sequences(loaded) -> None:  # noqa: ANN001
    """Packing relies on transformers building the block-diagonal mask from position_ids when no
    attention mask is given: its segmentation must equal ours (guards a transformers upgrade)."""
    from transformers.masking_utils import find_packed_sequence_indices

    _, tok, pairs, _ = loaded
    batch = PackedCollator(tok.pad_token_id, packing=True, pad_to_multiple_of=8, max_tokens=64)(pairs)
    detected = find_packed_sequence_indices(batch["position_ids"])  # (R, T) sequence number per token
    assert detected is not None
    same_theirs = detected[:, :, None] == detected[:, None, :]
    same_ours = batch["segment_ids"][:, :, None] == batch["segment_ids"][:, None, :]
    assert torch.equal(same_theirs, same_ours)
    assert torch.equal(block_causal_mask(batch["segment_ids"])[:, 0], same_ours & torch.ones_like(same_ours[0]).tril())


def test_cli_training_reproduces_the_padded_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The first logged metrics of a short run are the same with every layout."""
    rows = {}
    for name, extra in (("padded", []), ("packing", ["data.packing=true"]),
                        ("prefix", ["data.packing=true", "data.prefix_sharing=true"]),
                        ("varlen", ["data.packing=true", "data.prefix_sharing=true", "model.attn_implementation=varlen"])):
        out = tmp_path / name
        code = main(["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={tiny_model_dir}",
                     f"train.output_dir={out}", f"data.train_files=[{TOY / 'train.jsonl'}]", "data.eval_files=[]",
                     "train.max_steps=3", "train.log_every=1", "train.progress_bar=false", "train.lr=1e-3", *extra])
        assert code == 0
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["padded"]) == 3
    for name in ("packing", "prefix", "varlen"):
        for ra, rb in zip(rows["padded"], rows[name]):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
                assert rb[key] == pytest.approx(ra[key], abs=1e-4, rel=1e-4), (name, ra["step"], key)
            # At step 1 the policy IS the reference, so each margin is rounding noise around 0 and its
            # sign (the accuracy) is a coin flip that any kernel change turns (seen on CUDA). Later
            # steps have real margins, and there the accuracies must agree.
            if ra["step"] > 1:
                assert rb["rewards/accuracies"] == pytest.approx(ra["rewards/accuracies"]), (name, ra["step"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_path_drops_the_padding_mask_exactly(loaded, impl: str) -> None:  # noqa: ANN001
    """concatenated_logps runs right-padded rows without their padding mask (so SDPA can use its fused
    causal kernel); log-probs and gradients equal a plain masked forward + log_softmax + gather."""
    from dpokit.models.logps import naive_sequence_logps

    _, tok, pairs, models = loaded
    batch = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)(pairs)
    assert (batch["attention_mask"] == 0).any()  # there is padding to ignore
    res, grads = _run(models[impl], batch, lm_head_chunk=1024)

    model = copy.deepcopy(models[impl])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps, _ = naive_sequence_logps(logits, batch["input_ids"], batch["completion_mask"])  # (2B,)
    b = len(pairs)
    torch.testing.assert_close(res.chosen_logps, logps[:b], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(res.rejected_logps, logps[b:], atol=1e-4, rtol=1e-5)
    w = torch.linspace(0.5, 1.5, b)
    loss = -torch.nn.functional.logsigmoid(0.1 * w * (logps[:b] - logps[b:])).sum() - 0.01 * logps[b:].sum()
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
