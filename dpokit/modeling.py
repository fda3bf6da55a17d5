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

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.logps import chunked_lm_head_logps, sequence_logps


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


def load_model_and_tokenizer(name_or_path: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    from dpokit import sources

    source = sources.resolve_source(name_or_path)
    model = sources.load_model(
        source,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        attn_implementation=cfg.model.attn_implementation,
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


def concatenated_logps(model: Any, batch: dict[str, Tensor], lm_head_chunk: int = 1024) -> PolicyLogps:
    """One forward over [chosen; rejected] (2B rows) and the per-sequence log-probs.

    With `lm_head_chunk > 0` and a plain Linear head, logits are computed only at scored
    positions, chunk by chunk, so the (2B, T, V) logits tensor never exists.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (2B, T)
    completion_mask = batch["completion_mask"]  # (2B, T)
    parts = _lm_head_parts(model) if lm_head_chunk > 0 else None
    if parts is not None:
        decoder, weight, bias = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (2B, T, H)
        logps, lengths = chunked_lm_head_logps(hidden, weight, input_ids, completion_mask, lm_head_chunk, bias)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, T, V)
        logps, lengths = sequence_logps(logits, input_ids, completion_mask)
    b = input_ids.shape[0] // 2
    return PolicyLogps(logps[:b], logps[b:], lengths[:b], lengths[b:])


# ---- reference --------------------------------------------------------------------------
class Reference:
    """Computes reference log-probs for a batch; never tracks gradients.

    copy:    a frozen copy of the starting weights (or of reference.name_or_path)
    adapter: the policy's base weights with LoRA adapters switched off (no second model)
    none:    no reference; callers get None (reference-free losses)
    """

    def __init__(self, mode: str, model: Any = None, policy: Any = None, lm_head_chunk: int = 1024):
        self.mode, self.model, self.policy, self.lm_head_chunk = mode, model, policy, lm_head_chunk

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
        with self._active() as model:
            was_training = model.training
            model.eval()  # no dropout in the reference
            out = concatenated_logps(model, batch, self.lm_head_chunk)
            model.train(was_training)
        return out.chosen_logps, out.rejected_logps


def build_reference(cfg: Config, policy: Any, dtype: torch.dtype, lm_head_chunk: int = 1024) -> Reference:
    """Build the reference the config asks for. Call before the policy is trained."""
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
