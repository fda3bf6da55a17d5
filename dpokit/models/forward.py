"""The forward pass that turns a collated batch into per-sequence log-probs.

One forward over [chosen; rejected] rows (or packed / prefix-shared rows, `dpokit.data.packing`),
scored with the chunked LM head where it is exact, so the (2B, T, V) logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpokit.data.packing import block_causal_mask
from dpokit.dist import is_deepspeed_engine
from dpokit.errors import ConfigError
from dpokit.models import varlen
from dpokit.models.layout import attn_implementation_of
from dpokit.models.logps import chunked_lm_head_logps, indexed_logps, sequence_logps

# Scored positions per LM-head chunk. Each chunk holds ~3 (chunk, V) fp32 blocks at once (logits,
# softmax, their gradient): 256 x 49k vocab x 4 B x 3 = 150 MB, against 600 MB at 1024, for a head
# matmul still large enough to run at full speed.
LM_HEAD_CHUNK = 256


@dataclass
class PolicyLogps:
    """Per-sequence outputs of one concatenated forward (B pairs)."""

    chosen_logps: Tensor  # (B,) fp32 summed log-probs of the chosen responses
    rejected_logps: Tensor  # (B,)
    chosen_lengths: Tensor  # (B,) scored tokens per chosen response
    rejected_lengths: Tensor  # (B,)


def _is_wrapped(model: Any) -> bool:
    """A DDP or DeepSpeed wrapper, or an FSDP2-sharded module: its own forward must run (DDP
    prepares the gradient all-reduce there, FSDP gathers the parameter shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule)) or is_deepspeed_engine(model)


def _unwrapped(model: Any) -> Any:
    """The module inside a DDP / DeepSpeed wrapper (an FSDP2 module is its own)."""
    wrapper = isinstance(model, torch.nn.parallel.DistributedDataParallel) or is_deepspeed_engine(model)
    return model.module if wrapper else model


def lm_head_parts(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """(decoder, lm_head) when the chunked head is exact for this model, else None.

    The chunked path skips `model.forward`'s final projection, so it is only used when that
    projection is a plain Linear with no logit scaling or soft-capping.
    """
    base = _unwrapped(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    conf = getattr(base, "config", None)
    scaled = any(getattr(conf, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if type(head) is not torch.nn.Linear or decoder is None or scaled:
        return None
    return decoder, head


def final_hidden(model: Any, inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(last hidden states after the final norm, lm_head weight, bias) for the chunked head, or None
    when the head is not a plain Linear (the caller then takes the logits).

    A plain model runs only its decoder. A DDP / FSDP model runs its whole forward (see
    `_is_wrapped`) keeping the logits of one position and returning the hidden states; the head's
    weight is read after that forward, when FSDP has gathered it.
    """
    parts = lm_head_parts(model)
    if parts is None:
        return None
    decoder, head = parts
    if _is_wrapped(model):
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    else:
        hidden = decoder(**inputs).last_hidden_state
    return hidden, head.weight, head.bias


def concatenated_logps(model: Any, batch: dict[str, Tensor], lm_head_chunk: int = LM_HEAD_CHUNK) -> PolicyLogps:
    """One forward over [chosen; rejected] (2B rows) and the per-sequence log-probs.

    With `lm_head_chunk > 0` and a plain Linear head, logits are computed only at scored
    positions, chunk by chunk, so the (2B, T, V) logits tensor never exists.
    A packed / prefix-shared batch (`dpokit.data.packing`, recognised by its ``score_index``) goes
    through `_packed_logps`; the padded layout below is the default and the reference.
    """
    if "score_index" in batch:
        return _packed_logps(model, batch, lm_head_chunk)
    input_ids = batch["input_ids"]  # (2B, T)
    completion_mask = batch["completion_mask"]  # (2B, T)
    # Rows are RIGHT-padded (collate.py), so under the causal mask no real token ever sees a pad: the
    # padding mask changes nothing that is scored. Leaving it out lets SDPA run its fused causal
    # kernel (flash on CUDA and CPU) instead of the masked one, which on CPU materialises the (T, T)
    # attention of every head and layer (measured: faster, and peak memory well down).
    inputs = {"input_ids": input_ids, "use_cache": False}
    head = final_hidden(model, inputs) if lm_head_chunk > 0 else None
    if head is not None:
        hidden, weight, bias = head  # (2B, T, H)
        logps, lengths = chunked_lm_head_logps(hidden, weight, input_ids, completion_mask, lm_head_chunk, bias)
    else:
        logits = model(**inputs).logits  # (2B, T, V)
        logps, lengths = sequence_logps(logits, input_ids, completion_mask)
    b = input_ids.shape[0] // 2
    return PolicyLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


def packed_model_inputs(model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model kwargs that keep the packed units of `batch` apart (see dpokit/packing.py).

    What transformers 5.x does with them (masking_utils.create_causal_mask):
    * a 4D ``attention_mask`` is passed to the kernel untouched: sdpa reads a bool mask (True =
      attend), eager ADDS the mask to the scores, so eager needs 0 / -inf-like floats;
    * ``attention_mask=None`` with ``position_ids`` that restart mid-row: packed sequences are
      detected (a new sequence wherever the position does not grow by 1) and a block-diagonal causal
      mask is built for sdpa / eager / flex; flash_attention_2 derives varlen cu_seqlens from the
      same positions, but only for a single row (batch size 1).
      The detection is skipped when a KV cache exists, and with ``use_cache=True`` (the config
      default of a freshly loaded model, e.g. a reference) the forward creates one: the mask then
      silently falls back to plain causal over the whole row. Hence ``use_cache=False`` always.
    """
    impl = attn_implementation_of(model)
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]  # (R, T)
    if impl == varlen.IMPL_NAME:  # segments instead of a mask (dpokit/models/varlen.py); no mask is built
        if "cu_seq_q" not in batch:
            raise ValueError("attn_implementation varlen needs a batch from layout.build_collator(..., model=model)")
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False,
                "dpokit_varlen": varlen.varlen_layout(batch)}  # fmt: skip
    if "branch_ids" in batch:  # prefix sharing: "see the prompt, not the other branch" needs a 4D mask
        mask = block_causal_mask(batch["segment_ids"], batch["branch_ids"])  # (R, 1, T, T) bool
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        elif impl != "sdpa":
            raise ConfigError(
                f"data.prefix_sharing needs model.attn_implementation sdpa or eager, the model runs {impl}"
            )
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "use_cache": False}
    if "flash" in impl:  # varlen detection needs one row; rows are independent, so flattening is exact
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)  # (1, R*T)
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


def _packed_logps(model: Any, batch: dict[str, Tensor], lm_head_chunk: int) -> PolicyLogps:
    """`concatenated_logps` for the packed / prefix-shared layouts: score the batch's tuples."""
    rows, cols, targets, seqs = batch["score_index"]  # (M,) each
    b = batch["pair_index"].shape[0]
    r, t = batch["input_ids"].shape
    inputs = packed_model_inputs(model, batch)
    head = final_hidden(model, inputs) if lm_head_chunk > 0 else None
    if head is not None:
        hidden, weight, bias = head
        hidden = hidden.reshape(r, t, -1)  # (R, T, H) (un-flattened for flash)
        logps, lengths = indexed_logps(
            hidden, rows, cols, targets, seqs, 2 * b, lm_head_weight=weight, bias=bias, chunk_size=lm_head_chunk
        )
    else:
        logits = model(**inputs).logits.reshape(r, t, -1)  # (R, T, V)
        logps, lengths = indexed_logps(logits, rows, cols, targets, seqs, 2 * b)
    return PolicyLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


