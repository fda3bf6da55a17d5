"""Sequence log-probabilities of response tokens.

Alignment (see docs/design.md): the token at position ``t`` is scored with the logits at position
``t - 1``, so ``completion_mask[:, 0]`` is never scored and the logits at the last position are never
used. Every function returns ``(logps (N,), n_tokens (N,))``: the fp32 SUM of
``log p(token_t | tokens_<t)`` over scored positions and the number of scored positions (long).

Three implementations of the same quantity:

* `naive_sequence_logps`: ``log_softmax`` over everything; obviously correct, used in tests.
* `sequence_logps`: from model logits, touching only the scored positions, fp32 in row chunks.
* `chunked_lm_head_logps`: from the final hidden states and the LM-head weight; the (N, T, V)
  logits are never built, neither in forward nor in backward.

Both lean paths are thin wrappers over `indexed_logps`, the general form: a list of scoring
tuples ``(row, col, target, seq)`` = "the logits at (row, col) predict token ``target``, summed
into sequence ``seq``". The padded layout derives them from ``completion_mask`` (seq = row); the
packed / prefix-shared layouts of `dpokit.data.packing` carry them in the batch, where one (row, col)
may predict two targets (the first chosen and first rejected token both follow the prompt).

Imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["chunked_lm_head_logps", "indexed_logps", "naive_sequence_logps", "sequence_logps"]

# Target size, in elements, of one fp32 (rows, V) working block when no chunk size is given:
# 2**25 floats = 128 MiB, so the peak extra memory stays small next to the logits themselves.
_AUTO_CHUNK_ELEMENTS = 2**25


def _check_shapes(leading: Tensor, input_ids: Tensor, completion_mask: Tensor) -> None:
    if input_ids.shape != completion_mask.shape or leading.shape[:2] != input_ids.shape:
        raise ValueError(
            "expected (N, T, *) activations with (N, T) input_ids and completion_mask, got "
            f"{tuple(leading.shape)}, {tuple(input_ids.shape)}, {tuple(completion_mask.shape)}"
        )


def _scored_positions(input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where the scored tokens are.

    Returns:
        rows (M,), cols (M,): index of the PREDICTING position (logits / hidden state at ``t - 1``);
        targets (M,): the token ids at ``t``; n_tokens (N,): scored positions per row (long).
    """
    scored = completion_mask[:, 1:].bool()  # (N, T-1): True where token t = col + 1 is scored
    rows, cols = scored.nonzero(as_tuple=True)  # (M,), (M,) row-major, so rows are sorted
    targets = input_ids[:, 1:][rows, cols]  # (M,)
    n_tokens = scored.sum(dim=1)  # (N,) long
    return rows, cols, targets, n_tokens


def _sum_per_seq(token_logps: Tensor, seqs: Tensor, n_seqs: int) -> Tensor:
    """Scatter-add (M,) token log-probs into (S,) sequence sums (differentiable, empty sequences get 0)."""
    out = torch.zeros(n_seqs, dtype=token_logps.dtype, device=token_logps.device)  # (S,)
    return out.index_add(0, seqs, token_logps)


def _resolve_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, _AUTO_CHUNK_ELEMENTS // max(1, vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def naive_sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Reference implementation: fp32 ``log_softmax`` over all positions, then gather.

    Builds an fp32 (N, T-1, V) tensor, so it is only meant for tests and tiny inputs.

    Args:
        logits: (N, T, V) model logits, any float dtype.
        input_ids: (N, T) token ids.
        completion_mask: (N, T) bool, True on response tokens.

    Returns:
        (logps (N,) fp32 summed over scored tokens, n_tokens (N,) long).
    """
    _check_shapes(logits, input_ids, completion_mask)
    logprobs = logits[:, :-1].to(_acc_dtype(logits.dtype)).log_softmax(-1)  # (N, T-1, V)
    per_token = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    scored = completion_mask[:, 1:].bool()  # (N, T-1)
    # where, not multiply: a -inf log-prob at an unscored position must not turn into NaN
    logps = torch.where(scored, per_token, torch.zeros_like(per_token)).sum(-1)  # (N,)
    return logps, scored.sum(-1)


class _GatheredTokenLogps(torch.autograd.Function):
    """log softmax(logits[r, c])[target] for M selected rows of (N, T, V) logits, fp32 in row chunks.

    Backward writes ``g * (onehot - softmax)`` into only the selected rows of a zero gradient,
    recomputing the softmax chunk by chunk from the saved logits and logsumexp, so no (M, V)
    fp32 tensor is kept alive between forward and backward. A (row, col) may be selected more
    than once (prefix sharing scores two targets at the prompt's last position); the gradients add.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, chunk: int) -> Tensor:
        acc = _acc_dtype(logits.dtype)
        m = rows.numel()
        lse = torch.empty(m, dtype=acc, device=logits.device)  # (M,)
        target_logits = torch.empty(m, dtype=acc, device=logits.device)  # (M,)
        for start in range(0, m, chunk):
            sl = slice(start, start + chunk)
            block = logits[rows[sl], cols[sl]].to(acc)  # (c, V) fp32 copy of only the scored rows
            lse[sl] = block.logsumexp(-1)
            target_logits[sl] = block.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk = chunk
        return target_logits - lse  # (M,)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        logits, rows, cols, targets, lse = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)  # (N, T, V): unscored positions get exactly 0
        grad_out = grad_out.to(lse.dtype)  # (M,)
        for start in range(0, rows.numel(), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            g = grad_out[sl].unsqueeze(-1)  # (c, 1)
            block = logits[rows[sl], cols[sl]].to(lse.dtype)  # (c, V)
            # in place: advanced indexing made `block` a fresh copy, so it can become the gradient
            grad_block = block.sub_(lse[sl].unsqueeze(-1)).exp_().mul_(-g)  # (c, V) -softmax * g
            grad_block.scatter_add_(-1, targets[sl].unsqueeze(-1), g)  # + onehot * g
            # accumulate, not assign: a (row, col) can appear twice (two targets from one position)
            grad_logits.index_put_((rows[sl], cols[sl]), grad_block.to(logits.dtype), accumulate=True)
        return grad_logits, None, None, None, None


def sequence_logps(
    logits: Tensor, input_ids: Tensor, completion_mask: Tensor, *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Summed fp32 log-probs of the response tokens, computed from logits without a full log_softmax.

    Only the M scored positions are read (prompt and padding cost nothing); each is upcast to fp32
    ``chunk_size`` rows at a time for the logsumexp. Equal to `naive_sequence_logps` in value and in
    gradient w.r.t. ``logits``.

    Args:
        logits: (N, T, V) model logits, any float dtype (bf16 is fine: reductions run in fp32).
        input_ids: (N, T) token ids.
        completion_mask: (N, T) bool, True on response tokens.
        chunk_size: Rows per fp32 block; default: as many as fit in ~128 MiB.

    Returns:
        (logps (N,) fp32, n_tokens (N,) long).
    """
    _check_shapes(logits, input_ids, completion_mask)
    rows, cols, targets, _ = _scored_positions(input_ids, completion_mask)
    # the padded layout scores each row as its own sequence
    return indexed_logps(logits, rows, cols, targets, rows, logits.shape[0], chunk_size=chunk_size)


class _LMHeadTokenLogps(torch.autograd.Function):
    """log softmax(scale * (h @ W.T + b))[target] for M hidden states, chunk by chunk.

    Forward keeps only the (M,) logsumexp. Backward recomputes each chunk's logits and uses
    ``d logp / d z = scale * (onehot - softmax)`` to form ``grad_h = dz @ W``, ``grad_W = dz.T @ h``
    and ``grad_b = dz.sum(0)``, so at most one (chunk, V) block exists at a time.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
        scale: float,
    ) -> Tensor:
        acc = _acc_dtype(hidden.dtype)
        m = hidden.shape[0]
        lse = torch.empty(m, dtype=acc, device=hidden.device)  # (M,)
        target_logits = torch.empty(m, dtype=acc, device=hidden.device)  # (M,)
        for start in range(0, m, chunk):
            sl = slice(start, start + chunk)
            z = _head_block(hidden[sl], weight, bias, scale, acc)  # (c, V) fp32
            lse[sl] = z.logsumexp(-1)
            target_logits[sl] = z.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.scale = scale
        return target_logits - lse  # (M,)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_out = grad_out.to(acc)  # (M,)
        grad_h = torch.empty_like(hidden) if need_h else None  # (M, H)
        # Weight/bias grads sum over every chunk: accumulate in fp32 so bf16 rounding does not
        # compound across chunks (costs one fp32 (V, H) buffer, only when W is trained).
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None  # (V,)
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            g = grad_out[sl].unsqueeze(-1)  # (c, 1)
            z = _head_block(hidden[sl], weight, bias, ctx.scale, acc)  # (c, V) recomputed
            # in place: z is a fresh block, and reusing it keeps a single fp32 (c, V) buffer alive
            dz = z.sub_(lse[sl].unsqueeze(-1)).exp_().mul_(-g)  # (c, V) -softmax * g
            dz.scatter_add_(-1, targets[sl].unsqueeze(-1), g)  # + onehot * g
            if need_b:
                grad_b += dz.sum(0) * ctx.scale  # (V,)
            if ctx.scale != 1.0:
                dz.mul_(ctx.scale)
            dz = dz.to(weight.dtype)  # (c, V) grad w.r.t. h @ W.T + b (no copy in fp32); matmuls in input dtype
            if need_h:
                grad_h[sl] = (dz @ weight).to(hidden.dtype)  # (c, H)
            if need_w:
                if grad_w.dtype == weight.dtype:
                    grad_w.addmm_(dz.t(), hidden[sl])  # (V, H)
                else:
                    grad_w.add_(dz.t() @ hidden[sl])  # (V, H) bf16 product, fp32 running sum
            del z, dz  # free this chunk's (c, V) blocks before the next one allocates its own
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def _head_block(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, acc: torch.dtype) -> Tensor:
    """``scale * (hidden @ weight.T + bias)`` for one chunk: matmul in the input dtype, result in ``acc``."""
    z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())  # (c, V) input dtype
    z = z.to(acc)  # (c, V) fp32 for the softmax statistics
    if scale != 1.0:
        z = z * scale
    return z


def chunked_lm_head_logps(
    hidden: Tensor,
    weight: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Summed fp32 log-probs of the response tokens from final hidden states, never building logits.

    The LM head ``logits = logit_scale * (hidden @ weight.T + bias)`` is applied only to the hidden
    states at scored positions, ``chunk_size`` of them at a time; backward recomputes each chunk.
    Matmuls run in the input dtype (bf16 is fine), softmax statistics in fp32. Models whose head
    is not of this form (e.g. tanh logit soft-capping) must use `sequence_logps` instead.

    Args:
        hidden: (N, T, H) final hidden states (after the final norm).
        weight: (V, H) LM-head weight; its gradient is computed only if it requires grad.
        input_ids: (N, T) token ids.
        completion_mask: (N, T) bool, True on response tokens.
        chunk_size: Scored positions per block; peak extra memory is about ``chunk_size * V`` floats.
        bias: Optional (V,) LM-head bias.
        logit_scale: Multiplier applied to the logits (e.g. Cohere's ``logit_scale``).

    Returns:
        (logps (N,) fp32, n_tokens (N,) long).
    """
    _check_shapes(hidden, input_ids, completion_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, cols, targets, _ = _scored_positions(input_ids, completion_mask)
    return indexed_logps(
        hidden, rows, cols, targets, rows, hidden.shape[0],
        lm_head_weight=weight, bias=bias, logit_scale=logit_scale, chunk_size=chunk_size,
    )


def indexed_logps(
    acts: Tensor,
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    seqs: Tensor,
    n_seqs: int,
    *,
    lm_head_weight: Tensor | None = None,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed fp32 log-probs for explicit scoring tuples: the general form of both lean paths.

    Tuple k says: the logits at ``(rows[k], cols[k])`` predict ``targets[k]``, and that log-prob is
    added to sequence ``seqs[k]``. Nothing else is read, so any layout (padded, packed, prefix-shared)
    works as long as it can list its tuples. A (row, col) may appear in several tuples.

    Args:
        acts: (R, T, V) logits when ``lm_head_weight`` is None, else (R, T, H) final hidden states
            (then logits exist only for the M selected positions, ``chunk_size`` at a time).
        rows, cols, targets, seqs: (M,) long each.
        n_seqs: S, the number of sequences (``seqs`` values lie in [0, S)).
        lm_head_weight: (V, H) LM-head weight, to score from hidden states; see `chunked_lm_head_logps`.
        bias: Optional (V,) LM-head bias (hidden-state path only).
        logit_scale: Logit multiplier (hidden-state path only).
        chunk_size: Scored positions per fp32 block; default: ~128 MiB worth (logits path) or 1024.

    Returns:
        (logps (S,) fp32 sums, n_tokens (S,) long: tuples per sequence).
    """
    if not (rows.dim() == 1 and rows.shape == cols.shape == targets.shape == seqs.shape):
        raise ValueError(
            "rows, cols, targets and seqs must be 1-D and of equal length, got "
            f"{tuple(rows.shape)}, {tuple(cols.shape)}, {tuple(targets.shape)}, {tuple(seqs.shape)}"
        )
    if acts.dim() != 3:
        raise ValueError(f"expected (R, T, V) logits or (R, T, H) hidden states, got {tuple(acts.shape)}")
    # index_add, not bincount: bincount sizes its output from the data, a device sync on GPU
    n_tokens = torch.zeros(n_seqs, dtype=torch.long, device=seqs.device).index_add_(
        0, seqs, torch.ones_like(seqs)
    )  # (S,)
    if lm_head_weight is None:
        if bias is not None or logit_scale != 1.0:
            raise ValueError("bias and logit_scale apply only with lm_head_weight (hidden-state input)")
        chunk = _resolve_chunk(chunk_size, acts.shape[-1])
        token_logps = _GatheredTokenLogps.apply(acts, rows, cols, targets, chunk)  # (M,)
    else:
        chunk = _resolve_chunk(1024 if chunk_size is None else chunk_size, lm_head_weight.shape[0])
        selected = acts[rows, cols]  # (M, H): autograd scatter-adds its grad back into (R, T, H)
        token_logps = _LMHeadTokenLogps.apply(
            selected, lm_head_weight, bias, targets, chunk, float(logit_scale)
        )  # (M,)
    return _sum_per_seq(token_logps, seqs, n_seqs), n_tokens
