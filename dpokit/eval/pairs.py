"""`dpokit evaluate --data`: the DPO loss and implicit-reward metrics of a model over every pair of a file.

The numbers are the DPO objective's own (`dpokit.objectives.dpo`), computed by the same
objective-agnostic evaluation the training loop runs on its eval files
(`dpokit.objectives.base.evaluate_examples`, over the one inference pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config
from dpokit.data.files import DataFiles
from dpokit.dist import Dist
from dpokit.errors import ConfigError
from dpokit.models import refcache
from dpokit.models.loading import load_model_and_tokenizer, resolve_dtype
from dpokit.models.reference import Reference
from dpokit.objectives.base import evaluate_examples
from dpokit.objectives.dpo import DPOObjective
from dpokit.objectives.losses import LOSSES


def evaluate(
    model: str,
    data_files: list[str],
    ref: str | None = None,
    cfg: Config | None = None,
    skipped_path: str | None = None,
) -> dict[str, float]:
    """Load `model` (a HF folder, .gguf, alias, or a LoRA adapter folder) and its reference, and
    evaluate every pair of `data_files`. Settings (loss, beta, max_length, ...) come from `cfg`.

    Reference: `ref` if given; else the adapter's base with adapters off for an adapter folder;
    none for reference-free losses. Its log-probs come from the reference cache (`dpokit.models.refcache`)
    when one exists for exactly that reference + data; reference.precompute=true also writes one.
    With data.on_bad_row=skip, `skipped_path` receives the skipped rows (JSON Lines).
    """
    cfg = cfg or Config()
    objective = DPOObjective(cfg)
    objective.validate()
    dtype = resolve_dtype(cfg.model.dtype)
    dist = Dist.local()
    policy, tokenizer, is_adapter = load_for_eval(model, cfg, dtype)
    if ref is not None:
        ref_model, _ = load_model_and_tokenizer(ref, cfg, dtype)
        reference = Reference("copy", model=ref_model.to(dist.device).eval())
        del ref_model  # only `reference` holds it now, so a cache hit below frees the model
    elif is_adapter:
        reference = Reference("adapter", policy=policy)
    elif LOSSES[cfg.loss.type].reference_free:
        reference = Reference("none")
    else:
        raise ConfigError(f"loss '{cfg.loss.type}' needs a reference model: pass --ref PATH")
    policy.to(dist.device)
    # a Hub dataset id in --data reads the eval split (data.eval_split), as evaluation files do in training
    files = DataFiles(data_files, split=cfg.data.eval_split, subset=cfg.data.subset)
    pairs, summary = objective.load_examples(files, tokenizer, Path(skipped_path) if skipped_path else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = objective.build_collator(pad_id, policy, dist.device)
    if reference.mode != "none":  # precomputed log-probs for exactly this reference + data, if cached
        reference = refcache.cached_reference_for_eval(
            reference, tokenizer, pairs, cfg, collator, dist, log=lambda m: print(m, file=sys.stderr)
        )  # stderr: stdout may be --json
    objective.set_reference(reference)
    result: dict[str, Any] = evaluate_examples(objective, policy, pairs, collator, cfg.train.eval_batch_size, dist)
    result["pairs"] = len(pairs)
    result["dropped"] = sum(summary.dropped.values())
    return result


def load_for_eval(model: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_adapter). An adapter folder is loaded on top of its base model."""
    adapter_cfg = Path(model) / "adapter_config.json"
    if adapter_cfg.is_file():
        import peft
        from transformers import AutoTokenizer

        base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        base, _ = load_model_and_tokenizer(base_path, cfg, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model)  # saved beside the adapter by dpokit
        return peft.PeftModel.from_pretrained(base, model), tokenizer, True
    policy, tokenizer = load_model_and_tokenizer(model, cfg, dtype)
    return policy, tokenizer, False
