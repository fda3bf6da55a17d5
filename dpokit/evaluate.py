"""Preference evaluation: DPO loss and implicit-reward metrics over every pair of a file.

Used during training (eval_files) and by `dpokit evaluate`. Pairs are sorted by length so
batches carry little padding; the result does not depend on the order (sums over pairs).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dpokit import metrics as M
from dpokit.collate import PreferenceCollator, TokenizedPair
from dpokit.config import Config
from dpokit.modeling import LM_HEAD_CHUNK


@torch.no_grad()
def evaluate_pairs(
    policy: Any,
    reference: Any,
    pairs: list[TokenizedPair],
    cfg: Config,
    collator: PreferenceCollator,
    accelerator: Any = None,
    lm_head_chunk: int = LM_HEAD_CHUNK,
) -> dict[str, float]:
    """Average loss / rewards / log-probs over `pairs` (sharded over processes, then reduced)."""
    from dpokit.trainer import batch_loss

    policy.eval()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(policy.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    bs = cfg.train.eval_batch_size
    batches = [order[i : i + bs] for i in range(0, len(order), bs)][rank::world]
    acc = M.MetricAccumulator()
    acc.add(torch.zeros(len(M.PAIR_KEYS), 0, device=device))  # a rank with no batch still joins the reduce
    for idx in batches:
        batch = {k: v.to(device) for k, v in collator([pairs[i] for i in idx]).items()}
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            _, values = batch_loss(policy, reference, batch, cfg, lm_head_chunk)
        acc.add(values)
    result = acc.compute(accelerator.reduce if accelerator is not None and world > 1 else None)
    result["pairs"] = float(len(pairs))
    return result


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
    none for reference-free losses. Its log-probs come from the reference cache (`dpokit.refcache`)
    when one exists for exactly that reference + data; reference.precompute=true also writes one.
    With data.on_bad_row=skip, `skipped_path` receives the skipped rows (JSON Lines).
    """
    from dpokit import data, modeling
    from dpokit.errors import ConfigError
    from dpokit.losses import LOSSES
    from dpokit.packing import build_collator

    cfg = cfg or Config()
    dtype = modeling.resolve_dtype(cfg.model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer, is_adapter = _load_for_eval(model, cfg, dtype)
    if ref is not None:
        ref_model, _ = modeling.load_model_and_tokenizer(ref, cfg, dtype)
        reference = modeling.Reference("copy", model=ref_model.to(device).eval())
        del ref_model  # only `reference` holds it now, so a cache hit below frees the model
    elif is_adapter:
        reference = modeling.Reference("adapter", policy=policy)
    elif LOSSES[cfg.loss.type].reference_free:
        reference = modeling.Reference("none")
    else:
        raise ConfigError(f"loss '{cfg.loss.type}' needs a reference model: pass --ref PATH")
    policy.to(device)
    pairs, summary = data.load_pairs(data_files, tokenizer, cfg.data, skipped_path=skipped_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # padded [chosen; rejected] rows by default; packed / prefix-shared rows with data.packing / data.prefix_sharing
    collator = build_collator(cfg.data, pad_id, policy)  # the policy sizes packed rows
    if reference.mode != "none":  # precomputed log-probs for exactly this reference + data, if cached
        import sys

        from dpokit import refcache

        reference = refcache.cached_reference_for_eval(
            reference, tokenizer, pairs, cfg, collator, device, log=lambda m: print(m, file=sys.stderr)
        )  # stderr: stdout may be --json
    result = evaluate_pairs(policy, reference, pairs, cfg, collator)
    result["dropped"] = float(sum(summary.dropped.values()))
    return result


def _load_for_eval(model: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_adapter). An adapter folder is loaded on top of its base model."""
    import json
    from pathlib import Path

    from dpokit import modeling

    adapter_cfg = Path(model) / "adapter_config.json"
    if adapter_cfg.is_file():
        import peft

        base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        base, _ = modeling.load_model_and_tokenizer(base_path, cfg, dtype)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)  # saved beside the adapter by dpokit
        return peft.PeftModel.from_pretrained(base, model), tokenizer, True
    policy, tokenizer = modeling.load_model_and_tokenizer(model, cfg, dtype)
    return policy, tokenizer, False
