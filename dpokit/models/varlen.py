"""Variable-length attention for packed and prefix-shared batches (``model.attn_implementation: varlen``).

Why: `dpokit.data.packing` removes padding and the repeated prompt, but it tells SDPA about sequence
boundaries with a dense (R, 1, T, T) mask. On CUDA a dense mask takes SDPA off the flash kernels,
and the masked-out blocks are computed anyway, so on a GPU the shared prompt saved less than the
mask cost (docs/benchmarks-gpu.md: 0.70x of the padded run). Flash attention's *varlen* kernel
instead takes the batch as one stream of tokens cut into segments by cumulative lengths, and does
no work outside each segment's causal triangle.

Every packed unit becomes query segments, each with the key segment it attends to (the kernel's
causal mask is aligned bottom-right, so query j of a segment of Lq queries over Lk keys sees keys
0 .. Lk - Lq + j)::

    packing, sequence [x]               queries [x]        keys [x]
    prefix sharing, pair [P, C, R]      queries [P, C]     keys [P, C]   (an ordinary causal sequence)
                                        queries [R]        keys [P, R]   (R sees the prompt, not C)
    row padding [pad]                   queries [pad]      keys [pad]

Queries are the tokens in their batch order, so the output needs no reordering; only keys and
values are gathered (`key_index`), which copies each prompt's K/V once more per layer but adds no
FLOPs. The attention FLOPs are exactly those of the two unshared causal sequences, and the
linear layers (most of the model) see the prompt once.

Batch keys (built by `packing.PackedCollator`, flattened row-major over its (R, T) rows)::

    cu_seq_q    (S + 1,) int32  query segment boundaries in the flattened (R * T) token stream
    cu_seq_k    (S + 1,) int32  key segment boundaries in the gathered key stream
    key_index   (N_k,)   long   flattened token index of every key (prefix sharing only; packing: identity)
    varlen_max  (0, max_q, max_k) empty tensor: the longest query / key segment, carried in its SHAPE so
                                that reading them never waits for the GPU (a .item() would sync)

On CUDA with bf16/fp16 weights the segments go to torch's flash varlen kernel
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10). Elsewhere (CPU, fp32) a per-segment SDPA
loop computes the same thing (causal segments on SDPA's fused kernel); the tests compare both with
dense masked attention.

Imports only torch; `register()` adds the implementation to transformers when a model is loaded.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMPL_NAME", "VarlenLayout", "attention_forward", "flash_available", "register", "segment_attention", "varlen_layout",
]

IMPL_NAME = "dpokit_varlen"  # the name transformers knows it by (config `model.attn_implementation: varlen`)


@dataclass(frozen=True)
class VarlenLayout:
    """Segments of one flattened batch; see the module docstring."""

    cu_seq_q: Tensor  # (S + 1,) int32
    cu_seq_k: Tensor  # (S + 1,) int32
    key_index: Tensor | None  # (N_k,) long, None = keys are the tokens themselves
    max_q: int
    max_k: int


def varlen_layout(batch: dict[str, Tensor]) -> VarlenLayout:
    """The `VarlenLayout` of a packed batch (no device sync: the maxima come from a tensor shape)."""
    _, max_q, max_k = batch["varlen_max"].shape
    return VarlenLayout(batch["cu_seq_q"], batch["cu_seq_k"], batch.get("key_index"), int(max_q), int(max_k))


@functools.cache
def _flash_kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@functools.cache
def _kernel_params(kernel: Any) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def flash_available() -> bool:
    """Does this torch have the flash varlen kernel (torch >= 2.10, used on CUDA only)?"""
    return _flash_kernel() is not None


def _use_flash(query: Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and flash_available()


def _flash(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float) -> Tensor:
    """torch's flash varlen kernel, whichever of its signatures this torch has.

    torch 2.10: (..., is_causal=False); 2.12+: (..., *, scale=None, window_size=(-1, -1), enable_gqa=False)
    where causal is window_size (-1, 0). Both align the causal mask bottom-right, as we need.
    """
    kernel = _flash_kernel()
    params = _kernel_params(kernel)
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(D)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, **kwargs)


def _reference(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float) -> Tensor:
    """The portable path: one SDPA call per segment (CPU, fp32, or no flash kernel).

    A segment whose queries are its keys ([P, C], a packed sequence, padding) is a plain causal
    attention: SDPA's `is_causal` with no mask, which runs torch's fused (flash-style) kernel on CPU
    too. The rejected segment (queries R over keys [P, R]) needs the causal mask aligned to the
    bottom-right, which `is_causal` (top-left) is not, so it gets an explicit (R, P + R) mask.
    """
    groups = q.shape[1] // k.shape[1]
    cu_q, cu_k = layout.cu_seq_q.tolist(), layout.cu_seq_k.tolist()
    outs = []
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        qs = q[q0:q1].transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].transpose(0, 1)  # (H_kv, Lk, D)
        vs = v[k0:k1].transpose(0, 1)
        lq, lk = q1 - q0, k1 - k0
        if lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=groups > 1)
        else:  # query j (0-based) sees keys 0 .. lk - lq + j
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_(diagonal=lk - lq)  # (Lq, Lk)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
        outs.append(o.transpose(0, 1))  # (Lq, H, D)
    return torch.cat(outs)  # (N, H, D): the query segments tile the batch in order


def segment_attention(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float) -> Tensor:
    """Attention of every query segment over its key segment.

    q (N, H, D) in batch order; k, v (N, H_kv, D) per token, gathered by `layout.key_index`.
    Returns (N, H, D).
    """
    if layout.key_index is not None:
        k, v = k.index_select(0, layout.key_index), v.index_select(0, layout.key_index)  # (N_k, H_kv, D)
    if _use_flash(q):
        return _flash(q, k, v, layout, scale)
    return _reference(q, k, v, layout, scale)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function interface: query (B, H, T, D), key/value (B, H_kv, T, D) ->
    ((B, T, H, D), None).

    A batch from `dpokit.data.packing` carries ``dpokit_varlen`` (a `VarlenLayout`) through the model's
    kwargs; anything else (a padded batch, generation) runs transformers' SDPA function unchanged.
    """
    layout: VarlenLayout | None = kwargs.pop("dpokit_varlen", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("attn_implementation varlen does not support attention dropout")
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    q = query.transpose(1, 2).reshape(b * t, h, d)  # (N, H, D): rows flattened, as the layout counts
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)  # (N, H_kv, D)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    out = segment_attention(q, k, v, layout, scale)  # (N, H, D)
    return out.reshape(b, t, h, d), None


def register() -> None:
    """Make ``attn_implementation="dpokit_varlen"`` known to transformers (idempotent).

    No mask function is registered on purpose: transformers then builds no attention mask at all
    for this implementation (masking_utils skips unknown implementations), which is what we want:
    the segments say everything, and a (T, T) mask of a long packed row would cost memory.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL_NAME, attention_forward)
