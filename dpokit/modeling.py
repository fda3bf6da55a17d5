"""Policy and reference models, the concatenated forward, and saving.

Owns: loading the policy (any source `dpokit.sources` understands), wrapping it with LoRA,
building the reference (frozen copy, adapter-disabled base, or none), turning a collated batch
into per-sequence log-probs with one forward pass, and writing a Hugging Face folder at the end.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit import varlen
from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.logps import chunked_lm_head_logps, indexed_logps, sequence_logps
from dpokit.packing import attn_implementation_of, block_causal_mask

# Scored positions per LM-head chunk. Each chunk holds ~3 (chunk, V) fp32 blocks at once (logits,
# softmax, their gradient): 256 x 49k vocab x 4 B x 3 = 150 MB, against 600 MB at 1024, for a head
# matmul still large enough to run at full speed.
LM_HEAD_CHUNK = 256


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, fp32 elsewhere (fp16 is never chosen: it NaNs DPO)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    on_cuda = (device is not None and device.type == "cuda") or (device is None and torch.cuda.is_available())
    if on_cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attn_implementation(cfg: Config, dtype: torch.dtype) -> str:
    """`model.attn_implementation`, with auto resolved: dpokit's flash varlen kernel on a CUDA GPU
    computing in half precision (the flash kernels need it), SDPA everywhere else."""
    impl = cfg.model.attn_implementation
    if impl != "auto":
        return impl
    half = dtype in (torch.bfloat16, torch.float16) or cfg.train.mixed_precision == "bf16"
    return "varlen" if half and torch.cuda.is_available() and varlen.flash_available() else "sdpa"


def load_model_and_tokenizer(name_or_path: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    from dpokit import sources

    source = sources.resolve_source(name_or_path)
    model = sources.load_model(
        source,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        attn_implementation=resolve_attn_implementation(cfg, dtype),
    )
    tokenizer = sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    return model, tokenizer


def reference_mode(cfg: Config) -> str:
    """Resolve reference.mode='auto' against LoRA and the loss type."""
    from dpokit.losses import LOSSES

    mode = cfg.reference.mode
    if mode == "auto":
        if LOSSES[cfg.loss.type].reference_free:
            return "none"
        return "adapter" if cfg.lora.enabled else "copy"
    return mode


def load_policy(cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """The trainable model (LoRA-wrapped when enabled) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg, dtype)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model, tokenizer


def apply_lora(model: Any, cfg: Config) -> Any:
    import peft

    targets: Any = cfg.lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora_cfg = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return peft.get_peft_model(model, lora_cfg)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules}: {exc}") from None


# ---- log-probs --------------------------------------------------------------------------
@dataclass
class PolicyLogps:
    """Per-sequence outputs of one concatenated forward (B pairs)."""

    chosen_logps: Tensor  # (B,) fp32 summed log-probs of the chosen responses
    rejected_logps: Tensor  # (B,)
    chosen_lengths: Tensor  # (B,) scored tokens per chosen response
    rejected_lengths: Tensor  # (B,)


def _lm_head_parts(model: Any) -> tuple[Any, Tensor, Tensor | None] | None:
    """(decoder, lm_head weight, bias) when the chunked head is exact for this model, else None.

    The chunked path skips `model.forward`'s final projection, so it is only used when that
    projection is a plain Linear with no logit scaling or soft-capping.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    conf = getattr(base, "config", None)
    scaled = any(getattr(conf, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if type(head) is not torch.nn.Linear or decoder is None or scaled:
        return None
    return decoder, head.weight, head.bias


def concatenated_logps(model: Any, batch: dict[str, Tensor], lm_head_chunk: int = LM_HEAD_CHUNK) -> PolicyLogps:
    """One forward over [chosen; rejected] (2B rows) and the per-sequence log-probs.

    With `lm_head_chunk > 0` and a plain Linear head, logits are computed only at scored
    positions, chunk by chunk, so the (2B, T, V) logits tensor never exists.
    A packed / prefix-shared batch (`dpokit.packing`, recognised by its ``score_index``) goes
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
    parts = _lm_head_parts(model) if lm_head_chunk > 0 else None
    if parts is not None:
        decoder, weight, bias = parts
        hidden = decoder(**inputs).last_hidden_state  # (2B, T, H)
        logps, lengths = chunked_lm_head_logps(hidden, weight, input_ids, completion_mask, lm_head_chunk, bias)
    else:
        logits = model(**inputs).logits  # (2B, T, V)
        logps, lengths = sequence_logps(logits, input_ids, completion_mask)
    b = input_ids.shape[0] // 2
    return PolicyLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


def _packed_model_inputs(model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
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
    if impl == varlen.IMPL_NAME:  # segments instead of a mask (dpokit/varlen.py); no mask is built
        if "cu_seq_q" not in batch:
            raise ValueError("attn_implementation varlen needs a batch from packing.build_collator(..., model=model)")
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
    inputs = _packed_model_inputs(model, batch)
    parts = _lm_head_parts(model) if lm_head_chunk > 0 else None
    if parts is not None:
        decoder, weight, bias = parts
        hidden = decoder(**inputs).last_hidden_state.reshape(r, t, -1)  # (R, T, H) (un-flattened for flash)
        logps, lengths = indexed_logps(
            hidden, rows, cols, targets, seqs, 2 * b, lm_head_weight=weight, bias=bias, chunk_size=lm_head_chunk
        )
    else:
        logits = model(**inputs).logits.reshape(r, t, -1)  # (R, T, V)
        logps, lengths = indexed_logps(logits, rows, cols, targets, seqs, 2 * b)
    return PolicyLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


# ---- reference --------------------------------------------------------------------------
class Reference:
    """Computes reference log-probs for a batch; never tracks gradients.

    copy:    a frozen copy of the starting weights (or of reference.name_or_path)
    adapter: the policy's base weights with LoRA adapters switched off (no second model)
    cached:  log-probs precomputed once (`dpokit.refcache`), looked up by batch["pair_index"];
             no model at all. One table per split: never share a cached Reference across splits.
    none:    no reference; callers get None (reference-free losses)
    """

    def __init__(
        self, mode: str, model: Any = None, policy: Any = None, lm_head_chunk: int = LM_HEAD_CHUNK, table: Any = None
    ):
        if mode == "cached" and table is None:
            raise ValueError("Reference('cached') needs a table (dpokit.refcache.RefTable)")
        self.mode, self.model, self.policy, self.lm_head_chunk = mode, model, policy, lm_head_chunk
        self.table = table  # refcache.RefTable in cached mode

    @contextlib.contextmanager
    def _active(self) -> Iterator[Any]:
        if self.mode == "adapter":
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.model

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | tuple[None, None]:
        if self.mode == "none":
            return None, None
        if self.mode == "cached":
            return self.table.lookup(batch)
        with self._active() as model:
            was_training = model.training
            model.eval()  # no dropout in the reference
            out = concatenated_logps(model, batch, self.lm_head_chunk)
            model.train(was_training)
        return out.chosen_logps, out.rejected_logps


def build_reference(cfg: Config, policy: Any, dtype: torch.dtype, lm_head_chunk: int = LM_HEAD_CHUNK) -> Reference:
    """Build the live reference the config asks for. Call before the policy is trained.

    With reference.precompute, `dpokit.refcache.precompute_references` builds cached references
    instead (trainer.setup does); it reuses the policy rather than building a copy.
    """
    mode = reference_mode(cfg)
    if mode == "none":
        return Reference("none")
    if mode == "adapter":
        if not cfg.lora.enabled:
            raise ConfigError("reference.mode=adapter needs lora.enabled=true")
        return Reference("adapter", policy=policy, lm_head_chunk=lm_head_chunk)
    if cfg.reference.name_or_path:
        ref, _ = load_model_and_tokenizer(cfg.reference.name_or_path, cfg, dtype)
    elif cfg.lora.enabled:  # a copy without the LoRA layers is the starting base model
        ref = copy.deepcopy(policy).unload()
    else:
        ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    if cfg.train.gradient_checkpointing:  # the reference never runs backward
        ref.gradient_checkpointing_disable()
    return Reference("copy", model=ref, lm_head_chunk=lm_head_chunk)


# ---- saving -----------------------------------------------------------------------------
def save_final(model: Any, tokenizer: Any, cfg: Config, out_dir: Path) -> dict[str, str]:
    """Write the trained model: full weights, or the LoRA adapter (+ merged model if asked).

    Returns a dict naming what was written, for the run summary.
    """
    from dpokit import sources

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if cfg.lora.enabled:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        written["adapter"] = str(out_dir)
        if cfg.lora.merge:
            merged = copy.deepcopy(model).merge_and_unload()
            sources.save_pretrained_clean(merged, tokenizer, out_dir / "merged")
            written["merged"] = str(out_dir / "merged")
    else:
        sources.save_pretrained_clean(model, tokenizer, out_dir)
        written["model"] = str(out_dir)
    return written
