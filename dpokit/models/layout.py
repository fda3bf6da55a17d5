"""Choosing a model's batch layout: which collator a model gets and how its packed rows are sized.

The collators themselves (`dpokit.data.collate`, `dpokit.data.packing`) know nothing about models;
this module reads the model (its attention kernel, sliding window, sizes) and the device to pick
the layout `data.packing` / `data.prefix_sharing` ask for.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from dpokit.data.collate import PreferenceCollator
from dpokit.data.packing import PackedCollator
from dpokit.errors import ConfigError
from dpokit.models.varlen import IMPL_NAME as VARLEN

if TYPE_CHECKING:
    from dpokit.config import DataConfig


def attention_cost_tokens(model: Any) -> float:
    """K: context length at which one token's attention FLOPs equal its linear-layer FLOPs.

    Per layer and token, the linear layers cost ~2 * params_per_layer and attention over a dense
    (masked) row of T tokens ~4 * T * heads * head_dim, so K = params_per_layer / (2 * heads * head_dim).
    Infinite for flash attention and dpokit's varlen (no work across sequences). A rough model: 4096 when the
    config does not name the usual sizes.
    """
    conf = base_config(model)
    if any(k in attn_implementation_of(model) for k in ("flash", "varlen")):
        return math.inf
    try:
        hidden, inter, heads = conf.hidden_size, conf.intermediate_size, conf.num_attention_heads
        kv_heads = getattr(conf, "num_key_value_heads", None) or heads
        head_dim = getattr(conf, "head_dim", None) or hidden // heads
    except AttributeError:
        return 4096.0
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter  # q, o, k, v; gated MLP
    return per_layer / (2 * heads * head_dim)


def build_collator(
    data: DataConfig, pad_token_id: int, model: Any = None, device: torch.device | str | None = None
) -> PreferenceCollator | PackedCollator:
    """The collator `data.packing` / `data.prefix_sharing` ask for (padded rows when neither is on).

    `model` (optional) resolves ``prefix_sharing: auto`` (`resolve_prefix_sharing`; off without a
    model) and sizes the automatic packed rows (`attention_cost_tokens`). `device`: where the model
    will run (default: where its parameters are now).
    """
    multiple = data.pad_to_multiple_of or None
    prefix_sharing = resolve_prefix_sharing(data, model, device)
    if not (data.packing or prefix_sharing):
        return PreferenceCollator(pad_token_id=pad_token_id, pad_to_multiple_of=multiple)
    return PackedCollator(
        pad_token_id,
        packing=data.packing,
        prefix_sharing=prefix_sharing,
        max_tokens=data.packing_max_tokens,
        pad_to_multiple_of=multiple,
        attention_tokens=attention_cost_tokens(model) if model is not None else 4096.0,
        varlen=model is not None and _runs_varlen(model),
    )


def base_config(model: Any) -> Any:
    """The transformers config of a possibly DDP- / PEFT-wrapped model (None if it has none)."""
    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT
    return getattr(base, "config", None)


def attn_implementation_of(model: Any) -> str:
    """The attention kernel the (possibly DDP- / PEFT-wrapped) model runs with; sdpa if it does not say."""
    return str(getattr(base_config(model), "_attn_implementation", None) or "sdpa")


def _sliding_window(conf: Any) -> int | None:
    """The attention window of a sliding-window model (Mistral, Qwen2 with use_sliding_window, Gemma 2/3)."""
    window = getattr(conf, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(conf, "use_sliding_window", True) is False:
        return None
    return window


def resolve_prefix_sharing(data: DataConfig, model: Any = None, device: torch.device | str | None = None) -> bool:
    """``data.prefix_sharing`` as a bool. auto is on where sharing is exact AND faster: on CPU with
    sdpa / eager (a 4D mask; measured ~1.8x per step, docs/benchmarks.md) and with dpokit's varlen
    kernel (docs/benchmarks-gpu.md); off on a GPU with SDPA, whose 4D mask leaves the flash kernels.

    Sharing replaces the model's own mask, so a sliding window shorter than `max_length` would be
    lost: auto is off for such a model, and an explicit true is refused.
    """
    conf = base_config(model) if model is not None else None
    window = _sliding_window(conf)
    if window is not None and window < data.max_length:
        if data.prefix_sharing is True:
            raise ConfigError(
                f"data.prefix_sharing: the model attends within a sliding window of {window} tokens, which "
                f"the shared-prefix mask cannot express for sequences up to data.max_length={data.max_length}; "
                "set data.prefix_sharing=false (or data.max_length <= the window)"
            )
        return False
    if data.prefix_sharing != "auto":
        return bool(data.prefix_sharing)
    if model is None:
        return False
    impl = attn_implementation_of(model)
    if impl == VARLEN:
        return True
    if device is None:
        device = next(iter(model.parameters())).device
    return torch.device(device).type == "cpu" and impl in ("sdpa", "eager")


def _runs_varlen(model: Any) -> bool:
    """Does `model` (possibly DDP- / PEFT-wrapped) run dpokit's varlen attention?"""
    return attn_implementation_of(model) == VARLEN
