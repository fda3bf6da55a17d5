"""Tests for dpokit.models.logps: a hand-computed row, and the lean paths against the naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.models.logps import chunked_lm_head_logps, naive_sequence_logps, sequence_logps

LN2 = math.log(2.0)


def hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row, T = 3, V = 4: prompt token 2, response tokens 1 then 0.

    * position 0 scores token 1 with logits [0, 0, 0, 0]: p = 1/4, log p = -2 ln 2;
    * position 1 scores token 0 with logits [ln 3, 0, 0, 0]: Z = 3 + 1 + 1 + 1 = 6, p = 3/6, log p = -ln 2;
    * position 2 scores nothing (its logits are junk and must be ignored).
    Sum = -3 ln 2 ~ -2.07944 over 2 tokens.
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0], [100.0, -100.0, 7.0, 3.0]]])
    input_ids = torch.tensor([[2, 1, 0]])
    completion_mask = torch.tensor([[False, True, True]])
    return logits, input_ids, completion_mask


# d log p / d logits = onehot(target) - softmax, at the predicting positions:
#   position 0: onehot(1) - [1/4]*4 = [-1/4, 3/4, -1/4, -1/4]
#   position 1: onehot(0) - [1/2, 1/6, 1/6, 1/6] = [1/2, -1/6, -1/6, -1/6]
#   position 2: unused -> 0
HAND_GRAD = torch.tensor([[[-1 / 4, 3 / 4, -1 / 4, -1 / 4], [1 / 2, -1 / 6, -1 / 6, -1 / 6], [0.0, 0.0, 0.0, 0.0]]])


@pytest.mark.parametrize("impl", ["naive", "lean", "lm_head"])
def test_hand_computed_row(impl: str) -> None:
    """-3 ln 2 over 2 tokens (see `hand_example`), and the hand gradient above. For the LM-head path
    the hidden states ARE the logits (W = identity), so the gradient w.r.t. hidden is the same."""
    logits, input_ids, mask = hand_example()
    logits.requires_grad_(True)
    if impl == "naive":
        logps, n = naive_sequence_logps(logits, input_ids, mask)
    elif impl == "lean":
        logps, n = sequence_logps(logits, input_ids, mask)
    else:
        logps, n = chunked_lm_head_logps(logits, torch.eye(4), input_ids, mask, chunk_size=1)
    torch.testing.assert_close(logps, torch.tensor([-3 * LN2]))
    assert n.tolist() == [2] and n.dtype == torch.long and logps.dtype == torch.float32
    logps.sum().backward()
    torch.testing.assert_close(logits.grad, HAND_GRAD)


@pytest.mark.parametrize("impl", [naive_sequence_logps, sequence_logps])
def test_first_position_is_never_scored(impl) -> None:  # noqa: ANN001
    """completion_mask[:, 0] = True changes nothing: there are no logits before position 0."""
    logits, input_ids, mask = hand_example()
    mask[0, 0] = True
    logps, n = impl(logits, input_ids, mask)
    torch.testing.assert_close(logps, torch.tensor([-3 * LN2]))
    assert n.tolist() == [2]


def random_batch(
    seed: int, n: int = 5, t: int = 9, v: int = 13
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits/ids/mask with awkward rows, and random upstream weights for the backward pass.

    Row 0: a single scored token. Row 1: nothing scored. Row 2: mask[0] set (must be ignored).
    Row 3: everything scored. Other rows: random masks.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g) * 3
    input_ids = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.5
    mask[0] = False
    mask[0, t // 2] = True
    mask[1] = False
    mask[2, 0] = True
    mask[3] = True
    upstream = torch.randn(n, generator=g)  # weights each row's logp differently in the loss
    return logits, input_ids, mask, upstream


def grads(fn, inputs: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, list]:  # noqa: ANN001
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    logps = fn(*inputs)
    (logps * upstream).sum().backward()
    return logps.detach(), [x.grad for x in inputs]


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_logps_matches_naive(seed: int, chunk_size: int | None) -> None:
    logits, input_ids, mask, upstream = random_batch(seed)
    ref, (ref_grad,) = grads(lambda x: naive_sequence_logps(x, input_ids, mask)[0], [logits], upstream)
    out, (out_grad,) = grads(lambda x: sequence_logps(x, input_ids, mask, chunk_size=chunk_size)[0], [logits], upstream)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert out[1] == 0.0 and (out_grad[1] == 0).all()  # nothing scored in row 1
    _, n_ref = naive_sequence_logps(logits, input_ids, mask)
    _, n_out = sequence_logps(logits, input_ids, mask)
    assert n_out.tolist() == n_ref.tolist() and n_out[0] == 1 and n_out[1] == 0


def test_sequence_logps_bf16_logits() -> None:
    """bf16 logits: both paths upcast the same bf16 values, so values agree to fp32 rounding; the
    gradient is returned in bf16, so it agrees to bf16 rounding."""
    logits, input_ids, mask, upstream = random_batch(2)
    logits = logits.bfloat16()
    ref, (ref_grad,) = grads(lambda x: naive_sequence_logps(x, input_ids, mask)[0], [logits], upstream)
    out, (out_grad,) = grads(lambda x: sequence_logps(x, input_ids, mask, chunk_size=2)[0], [logits], upstream)
    assert out.dtype == torch.float32 and out_grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_grad.float(), ref_grad.float(), atol=1e-2, rtol=1e-2)


def test_sequence_logps_gradcheck_float64() -> None:
    """The custom backward against finite differences (float64 stays float64 inside)."""
    logits, input_ids, mask, _ = random_batch(3, n=4, t=5, v=6)
    x = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, input_ids, mask, chunk_size=2)[0], (x,))


def lm_head_batch(seed: int, n: int = 4, t: int = 8, h: int = 6, v: int = 11):  # noqa: ANN201
    logits, input_ids, mask, upstream = random_batch(seed, n=n, t=t, v=v)
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(n, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h) * 3
    bias = torch.randn(v, generator=g)
    return hidden, weight, bias, input_ids, mask, upstream


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize(("use_bias", "scale"), [(False, 1.0), (True, 0.5)])
def test_chunked_lm_head_matches_naive(chunk_size: int, use_bias: bool, scale: float) -> None:
    """Values and gradients w.r.t. hidden, weight (and bias) equal naive(scale * (hidden @ W.T + b))."""
    hidden, weight, bias, input_ids, mask, upstream = lm_head_batch(seed=chunk_size)
    if chunk_size == 1000:
        assert mask[:, 1:].sum() < chunk_size  # one chunk holds every scored token

    def naive(hd: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logits = hd @ w.t() + (b if use_bias else 0.0)
        return naive_sequence_logps(logits * scale, input_ids, mask)[0]

    def chunked(hd: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return chunked_lm_head_logps(
            hd, w, input_ids, mask, chunk_size=chunk_size, bias=b if use_bias else None, logit_scale=scale
        )[0]

    ref, ref_grads = grads(naive, [hidden, weight, bias], upstream)
    out, out_grads = grads(chunked, [hidden, weight, bias], upstream)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(["hidden", "weight", "bias"], out_grads, ref_grads):
        if name == "bias" and not use_bias:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    _, n_tokens = chunked_lm_head_logps(hidden, weight, input_ids, mask)
    assert n_tokens.tolist() == mask[:, 1:].sum(1).tolist()


def test_chunked_lm_head_frozen_weight() -> None:
    """A weight without requires_grad (LoRA: frozen head) works: hidden grads correct, no weight grad."""
    hidden, weight, _, input_ids, mask, upstream = lm_head_batch(seed=4)
    h_ref = hidden.clone().requires_grad_(True)
    (naive_sequence_logps(h_ref @ weight.t(), input_ids, mask)[0] * upstream).sum().backward()
    h = hidden.clone().requires_grad_(True)
    out, _ = chunked_lm_head_logps(h, weight, input_ids, mask, chunk_size=3)
    (out * upstream).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # reference-model style call
        out_ng, _ = chunked_lm_head_logps(hidden, weight, input_ids, mask)
    torch.testing.assert_close(out_ng, out.detach())


def test_chunked_lm_head_bf16_against_fp32() -> None:
    """bf16 hidden/weight vs the fp32 reference: bf16 matmuls round logits to ~3 significant digits,
    so values and grads agree only loosely with fp32; closely with autograd through the same bf16 matmul.
    Outputs stay fp32, grads come back in bf16."""
    hidden, weight, _, input_ids, mask, upstream = lm_head_batch(seed=5)
    ref, (ref_h, ref_w) = grads(
        lambda hd, w: naive_sequence_logps(hd @ w.t(), input_ids, mask)[0], [hidden, weight], upstream
    )
    out, (out_h, out_w) = grads(
        lambda hd, w: chunked_lm_head_logps(hd, w, input_ids, mask, chunk_size=4)[0],
        [hidden.bfloat16(), weight.bfloat16()],
        upstream,
    )
    assert out.dtype == torch.float32
    assert out_h.dtype == torch.bfloat16 and out_w.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0.15, rtol=0.02)
    torch.testing.assert_close(out_h.float(), ref_h, atol=0.08, rtol=0.05)
    torch.testing.assert_close(out_w.float(), ref_w, atol=0.08, rtol=0.05)
    # ... but against autograd through the same bf16 matmul it agrees closely
    bf, (bf_h, bf_w) = grads(
        lambda hd, w: naive_sequence_logps(hd @ w.t(), input_ids, mask)[0],
        [hidden.bfloat16(), weight.bfloat16()],
        upstream,
    )
    torch.testing.assert_close(out, bf, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out_h, bf_h, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out_w, bf_w, atol=1e-2, rtol=1e-2)


def test_chunked_lm_head_gradcheck_float64() -> None:
    hidden, weight, bias, input_ids, mask, _ = lm_head_batch(seed=6, n=4, t=5, h=3, v=5)
    inputs = tuple(x.double().requires_grad_(True) for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda hd, w, b: chunked_lm_head_logps(hd, w, input_ids, mask, chunk_size=2, bias=b, logit_scale=1.7)[0],
        inputs,
    )


@pytest.mark.parametrize("impl", ["lean", "lm_head"])
def test_no_scored_tokens_at_all(impl: str) -> None:
    """An all-False mask gives zeros and zero (not missing, not NaN) gradients."""
    hidden, weight, _, input_ids, _, _ = lm_head_batch(seed=7)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    x = hidden.clone().requires_grad_(True)
    if impl == "lean":
        logps, n = sequence_logps(x, input_ids.clamp(max=5), mask)
    else:
        logps, n = chunked_lm_head_logps(x, weight, input_ids, mask)
    assert (logps == 0).all() and (n == 0).all()
    logps.sum().backward()
    assert (x.grad == 0).all()


def test_bad_arguments_raise() -> None:
    logits, input_ids, mask = hand_example()
    with pytest.raises(ValueError, match="expected"):
        sequence_logps(logits, input_ids[:, :2], mask)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(logits, input_ids, mask, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_lm_head_logps(logits, torch.eye(4), input_ids, mask, chunk_size=0)
