"""Benchmark worker: train with TRL's DPOTrainer for `spec.steps` optimizer steps, print one result line.

    python -m bench.workers.trl_worker '<Spec JSON>'

TRL runs unchanged through its public API, with two observers:
* step end: a `TrainerCallback.on_step_end` (after the optimizer step; synchronises CUDA first)
  records a wall timestamp;
* the pairs of each micro-batch: the data collator is TRL's own `DataCollatorForPreference` with a
  counter in front; calls made while the trainer is built (reference precompute) are discarded, and
  the training calls are taken in order (the loader may prefetch, but never reorders).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

T_START = time.perf_counter()

# TRL's defaults are DPOConfig's own; "best" switches on what makes TRL 1.16 fastest at a fixed
# micro-batch (gradient checkpointing only saves memory: off is faster). padding_free is left out:
# TRL 1.16 warns that it is temporarily unavailable and falls back to padding.
BEST = {
    "precompute_ref_log_probs": True,
    "activation_checkpointing": False,
    "train_sampling_strategy": "group_by_length",  # transformers' LengthGroupedSampler on a `length` column
}


def _parse_extra(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _lengths(rows: list[dict[str, Any]], tok: Any) -> list[int]:
    """Longest row of each pair (prompt + longer response) for the length-grouped sampler."""
    out = []
    for row in rows:
        p = len(tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False))
        r = max(len(tok.apply_chat_template(row["prompt"] + row[k], tokenize=True, return_dict=False))
                for k in ("chosen", "rejected"))
        out.append(max(p, r))
    return out


def _flags_and_rows(spec: Any, rows: list[dict[str, Any]], tok: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The DPOConfig flags of this mode (BEST and/or --trl-set), and the rows (with `length` for grouping)."""
    extra = _parse_extra(spec.extra)
    replace_best = extra.pop("__replace_best__", False)  # compare.py --trl-best: the given flags only
    chosen = dict(BEST) if spec.mode == "best" and not replace_best else {}
    chosen.update(extra)
    if chosen.get("train_sampling_strategy") == "group_by_length":
        chosen.setdefault("length_column_name", "length")
        chosen.setdefault("remove_unused_columns", False)  # keep `length` until the sampler reads it
        return chosen, [dict(r, length=n) for r, n in zip(rows, _lengths(rows, tok))]
    return chosen, rows


def _dpo_config(config_cls: Any, spec: Any, chosen: dict[str, Any], run_dir: Any, cuda: bool) -> Any:
    """TRL's DPOConfig for the shared workload settings plus this mode's flags."""
    return config_cls(
        output_dir=str(run_dir / "out"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=spec.beta,
        loss_type=["sigmoid"],
        max_length=spec.max_length,
        truncation_mode="keep_start",
        bf16=spec.precision in ("bf16", "bf16-mixed"),
        use_cpu=not cuda,
        seed=spec.seed,
        logging_steps=1,  # as dpokit's train.log_every=1: one metric sync per step on both sides
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **chosen,
    )


def run(spec: Any) -> dict[str, Any]:
    import torch

    from bench import common
    from bench.workers import prepare

    cuda, run_dir, rows = prepare(spec)

    t_train = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chosen, dataset_rows = _flags_and_rows(spec, rows, tok)
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    args = _dpo_config(DPOConfig, spec, chosen, run_dir, cuda)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype, attn_implementation="sdpa")
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(common.LORA_TARGETS), task_type="CAUSAL_LM", bias="none")

    calls: list[list[tuple[int, int, int]]] = []

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            calls.append([(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples])
            return super().torch_call(examples)

    pad = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
    collator = CountingCollator(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                truncation_mode=args.truncation_mode, pad_to_multiple_of=pad)
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(dataset_rows),
                         processing_class=tok, data_collator=collator, peft_config=peft_config,
                         callbacks=[StepClock()])
    calls.clear()  # the reference precompute went through the collator: not training batches
    trainer.train()
    t_end = time.perf_counter()

    if len(stamps) != spec.steps:
        raise RuntimeError(f"expected {spec.steps} step timestamps, got {len(stamps)}")
    a = spec.grad_accum
    steps = [calls[i * a:(i + 1) * a] for i in range(spec.steps)]
    ref_forward = not trainer.precompute_ref_logps
    resolved = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "precompute_ref_log_probs",
                                              "padding_free", "pad_to_multiple_of", "optim",
                                              "train_sampling_strategy")}
    resolved["optim"] = str(resolved["optim"])
    return {
        "stamps": stamps,
        "steps_pairs": steps,
        "t_train": t_train,
        "t_end": t_end,
        "ref_forward": ref_forward,
        "flags": [f"{k}={v}" for k, v in chosen.items() if k not in ("length_column_name", "remove_unused_columns")],
        "resolved": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v)) for k, v in resolved.items()},
    }


if __name__ == "__main__":
    from bench.workers import main

    sys.exit(main("trl", run, sys.argv[1:], T_START))
