"""The frozen reference of the preference objectives: a copy, the LoRA base with adapters off,
a precomputed table (`dpokit.models.refcache`), or none."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.models.forward import LM_HEAD_CHUNK, concatenated_logps
from dpokit.models.loading import load_model_and_tokenizer


class Reference:
    """Computes reference log-probs for a batch; never tracks gradients.

    copy:    a frozen copy of the starting weights (or of reference.name_or_path)
    adapter: the policy's base weights with LoRA adapters switched off (no second model)
    cached:  log-probs precomputed once (`dpokit.models.refcache`), looked up by batch["pair_index"];
             no model at all. One table per split: never share a cached Reference across splits.
    none:    no reference; callers get None (reference-free losses)
    """

    def __init__(
        self, mode: str, model: Any = None, policy: Any = None, lm_head_chunk: int = LM_HEAD_CHUNK, table: Any = None
    ):
        if mode == "cached" and table is None:
            raise ValueError("Reference('cached') needs a table (dpokit.models.refcache.RefTable)")
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


def build_reference(
    cfg: Config, policy: Any, dtype: torch.dtype, mode: str, lm_head_chunk: int = LM_HEAD_CHUNK
) -> Reference:
    """Build the live reference the config asks for. Call before the policy is trained.

    `mode` is reference.mode resolved against LoRA and the loss (`dpokit.objectives.dpo.reference_mode`).
    With reference.precompute, `dpokit.models.refcache.precompute_references` builds cached references
    instead; it reuses the policy rather than building a copy.
    """
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
    if getattr(ref, "is_activation_checkpointing", False):  # the reference never runs backward
        ref.activation_checkpointing_disable()
    return Reference("copy", model=ref, lm_head_chunk=lm_head_chunk)


