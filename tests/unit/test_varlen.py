"""dpokit/models/varlen.py: the segments the collator emits, the slow reference path against dense
masked attention, and the adapter to torch's flash varlen kernel (both of its signatures)."""

from __future__ import annotations

import inspect

import pytest
import torch

from dpokit.data.collate import TokenizedPair
from dpokit.data.packing import PackedCollator, block_causal_mask
from dpokit.models import varlen

PAIR = TokenizedPair(index=0, prompt_ids=[5, 6], chosen_ids=[7, 8], rejected_ids=[9])


def test_prefix_sharing_segments_literal() -> None:
    """The packing docstring's pair: tokens [5, 6 | 7, 8 | 9] (prompt | chosen | rejected), padded to 8.

    queries [5, 6, 7, 8] over keys [5, 6, 7, 8]   (flat positions 0-3)
    queries [9]          over keys [5, 6, 9]      (positions 0, 1, 4)
    queries [pad x 3]    over keys [pad x 3]      (positions 5-7)
    """
    batch = PackedCollator(0, packing=False, prefix_sharing=True, pad_to_multiple_of=8, varlen=True)([PAIR])
    assert batch["cu_seq_q"].tolist() == [0, 4, 5, 8]
    assert batch["cu_seq_k"].tolist() == [0, 4, 7, 10]
    assert batch["key_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7]
    assert batch["varlen_max"].shape == (0, 4, 4) and batch["cu_seq_q"].dtype == torch.int32  # longest: [P, C]
    layout = varlen.varlen_layout(batch)
    assert (layout.max_q, layout.max_k) == (4, 4)


def test_packing_segments_literal() -> None:
    """Packing alone: one segment per sequence (chosen 0..B-1, then rejected), keys = queries."""
    batch = PackedCollator(0, packing=True, attention_tokens=float("inf"), varlen=True)([PAIR])
    # one row: [5, 6, 7, 8] then [5, 6, 9] (longest first)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 5, 6, 9]]
    assert batch["cu_seq_q"].tolist() == [0, 4, 7] and batch["cu_seq_k"].tolist() == [0, 4, 7]
    assert "key_index" not in batch and batch["varlen_max"].shape == (0, 4, 4)
    assert "cu_seq_q" not in PackedCollator(0, packing=True)([PAIR])  # only when asked for


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the whole flat batch; q (N, H, D), k/v (N, H_kv, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (H, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("packing", [False, True])
def test_reference_path_equals_block_mask_attention(packing: bool) -> None:
    """Segments + key gather give what the (T, T) block mask of packing.py gives, on random q/k/v."""
    pairs = [
        TokenizedPair(index=0, prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6, 7, 8, 9]),
        TokenizedPair(index=1, prompt_ids=[1], chosen_ids=[4, 5, 6], rejected_ids=[7]),
        PAIR,
    ]
    batch = PackedCollator(0, packing=packing, prefix_sharing=True, pad_to_multiple_of=4,
                           attention_tokens=float("inf"), varlen=True)(pairs)  # fmt: skip
    r, t = batch["input_ids"].shape
    mask = block_causal_mask(batch["segment_ids"], batch["branch_ids"])[:, 0]  # (R, T, T)
    flat = torch.block_diag(*mask)  # (R*T, R*T): rows never see each other
    g = torch.Generator().manual_seed(0)
    q = torch.randn(r * t, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(r * t, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(r * t, 2, 8, generator=g, dtype=torch.float64)
    got = varlen.segment_attention(q, k, v, varlen.varlen_layout(batch), scale=0.3)
    torch.testing.assert_close(got, _dense(q, k, v, flat, 0.3))


def _fake_kernels():  # noqa: ANN202
    """Stand-ins with the signatures of torch 2.10 and of torch 2.12+, computing with the reference path."""
    calls: list[dict] = []

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # noqa: ANN001, ANN202
        assert k.shape[1] == q.shape[1] or calls[-1].get("enable_gqa")
        layout = varlen.VarlenLayout(cu_q, cu_k, None, max_q, max_k)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return varlen._reference(q, k, v, layout, scale)

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa: ANN001, ANN202
        calls.append({"is_causal": is_causal})
        assert is_causal
        return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, query.shape[-1] ** -0.5)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,  # noqa: ANN001, ANN202
            window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append({"window_size": window_size, "enable_gqa": enable_gqa})
        assert tuple(window_size) == (-1, 0)
        return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    return calls, old, new


@pytest.mark.parametrize("which", ["torch-2.10", "torch-2.12+"])
def test_flash_adapter_signatures(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_flash` asks both kernel signatures for causal attention, the model's scale and GQA."""
    calls, old, new = _fake_kernels()
    kernel = old if which == "torch-2.10" else new
    monkeypatch.setattr(varlen, "_flash_kernel", lambda: kernel)  # _kernel_params caches per kernel object
    batch = PackedCollator(0, packing=False, prefix_sharing=True, varlen=True)([PAIR, PAIR])
    layout = varlen.varlen_layout(batch)
    n = batch["input_ids"].numel()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    k_gathered, v_gathered = k.index_select(0, layout.key_index), v.index_select(0, layout.key_index)
    for scale in (8**-0.5, 0.2):  # the default scale and a model-specific one
        want = varlen._reference(q, k_gathered, v_gathered, layout, scale)
        torch.testing.assert_close(varlen._flash(q, k_gathered, v_gathered, layout, scale), want)
    assert len(calls) == 2
    if which == "torch-2.12+":
        assert all(c["enable_gqa"] for c in calls)


def test_real_kernel_signature_is_one_we_handle() -> None:
    """Guards a torch upgrade: the installed varlen_attn still has one of the two known forms."""
    kernel = varlen._flash_kernel()
    if kernel is None:
        pytest.skip("torch < 2.10 has no varlen_attn")
    params = inspect.signature(kernel).parameters
    assert {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"} <= set(params)
    assert "is_causal" in params or "window_size" in params


@pytest.mark.gpu
def test_flash_equals_reference_on_cuda() -> None:
    """On a GPU: the flash kernel equals the per-segment SDPA path, forward and backward (bf16)."""
    pairs = [TokenizedPair(index=i, prompt_ids=list(range(1, 40 + 7 * i)), chosen_ids=list(range(3, 20 + 5 * i)),
                           rejected_ids=list(range(2, 9 + 11 * i))) for i in range(4)]  # fmt: skip
    batch = PackedCollator(0, packing=True, prefix_sharing=True, pad_to_multiple_of=8,
                           attention_tokens=float("inf"), varlen=True)(pairs)  # fmt: skip
    layout = varlen.varlen_layout({k: v.cuda() for k, v in batch.items()})
    n = batch["input_ids"].numel()
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(n, h, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 4, 4)]
    outs, grads = [], []
    for flash in (True, False):
        q, k, v = (x.float() if not flash else x for x in leaves)
        out = varlen.segment_attention(q, k, v, layout, scale=64**-0.5) if flash else \
            varlen._reference(q, k.index_select(0, layout.key_index), v.index_select(0, layout.key_index), layout, 64**-0.5)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([x.grad.float().clone() for x in leaves])
        for x in leaves:
            x.grad = None
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_model_varlen_equals_padded_on_cuda(tiny_model_dir) -> None:  # noqa: ANN001
    """On a GPU, bf16: a tiny Llama on the flash varlen path (packing + prefix sharing) gives the
    padded SDPA path's sequence log-probs, within bf16 tolerance."""
    from pathlib import Path

    from dpokit.config import Config
    from dpokit.data import pairs as data
    from dpokit.data.collate import PreferenceCollator
    from dpokit.models.forward import concatenated_logps
    from dpokit.models.layout import build_collator
    from dpokit.models.loading import load_policy
    from tests.conftest import TOY

    repo = Path(__file__).resolve().parents[2]
    cfg = Config.from_yaml(repo / "configs" / "tiny.yaml").override(
        [f"model.name_or_path={tiny_model_dir}", "data.packing=true", "data.prefix_sharing=true"])
    results = []
    for impl in ("sdpa", "varlen"):
        model, tok = load_policy(cfg.override([f"model.attn_implementation={impl}"]), torch.bfloat16)
        model.cuda()
        pairs, _ = data.load_pairs([str(TOY / "train.jsonl")], tok, cfg.data)
        collate = PreferenceCollator(tok.pad_token_id) if impl == "sdpa" else build_collator(cfg.data, tok.pad_token_id, model)
        batch = {k: v.cuda() for k, v in collate(pairs[:8]).items()}
        assert ("cu_seq_q" in batch) == (impl == "varlen")
        with torch.no_grad():
            results.append(concatenated_logps(model, batch))
    padded, fast = results
    torch.testing.assert_close(fast.chosen_logps, padded.chosen_logps, atol=0.5, rtol=2e-2)
    torch.testing.assert_close(fast.rejected_logps, padded.rejected_logps, atol=0.5, rtol=2e-2)
