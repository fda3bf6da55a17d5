"""Benchmark worker: train with dpokit for `spec.steps` optimizer steps and print one result line.

    python -m bench.workers.dpokit_worker '<Spec JSON>'

Runs dpokit's own `train()` unchanged, observed through the loop's hooks (`dpokit.training.hooks`):
* `on_setup`: the batch layout and attention kernel the `auto` settings resolved to;
* `on_micro_batch`: each micro-batch's prompt/chosen/rejected token counts;
* `on_step_end`: a wall timestamp per optimizer step, taken after the step's metrics row (with
  train.log_every=1 every step logs one, and computing it syncs with the device).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from dpokit.training.hooks import Hook  # light: the heavy modules load inside run(), inside the timed wall

T_START = time.perf_counter()


def _overrides(spec: Any, data_file: Path) -> list[str]:
    dtype = "bfloat16" if spec.precision == "bf16" else "float32"
    autocast = "bf16" if spec.precision in ("bf16", "bf16-mixed") else "no"
    return [
        f"model.name_or_path={spec.model_dir}",
        f"model.dtype={dtype}",
        f"data.train_files=[{data_file}]",
        "data.eval_files=[]",
        f"data.max_length={spec.max_length}",
        f"data.max_prompt_length={spec.max_length - 1}",  # as TRL: no prompt-only limit (no row is cut)
        "loss.type=sigmoid",
        f"loss.beta={spec.beta}",
        "reference.mode=auto",  # copy for full fine-tuning, adapter (LoRA off) with LoRA: as TRL
        f"reference.cache_dir={Path(spec.run_dir) / 'ref_cache'}",  # fresh per run: precompute is always paid
        f"lora.enabled={str(spec.lora).lower()}",
        f"lora.r={spec.lora_r}",
        f"lora.alpha={spec.lora_alpha}",
        "lora.dropout=0.0",
        f"train.output_dir={Path(spec.run_dir) / 'out'}",
        "train.overwrite=true",
        f"train.max_steps={spec.steps}",
        f"train.micro_batch_size={spec.micro_batch}",
        f"train.grad_accum_steps={spec.grad_accum}",
        f"train.lr={spec.lr}",
        "train.warmup_steps=0",
        "train.scheduler=linear",
        f"train.seed={spec.seed}",
        f"train.mixed_precision='{autocast}'",  # quoted: YAML reads a bare no as false
        "train.log_every=1",
        "train.progress_bar=false",
    ]


class _Probe(Hook):
    """Records what the benchmark reports; changes nothing the loop computes."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stamps: list[float] = []  # wall time at the end of each optimizer step
        self.micro: list[list[tuple[int, int, int]]] = []  # (prompt, chosen, rejected) lengths per micro-batch
        self.layout: dict[str, str] = {}  # what `auto` resolved to
        self.batches: list[list[Any]] = []  # every micro-batch's examples, for the memory plan of what ran

    def on_setup(self, info: dict[str, str]) -> None:
        self.layout.update(info)

    def on_micro_batch(self, step: int, examples: list[Any]) -> None:
        self.micro.append([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in examples])
        self.batches.append(list(examples))

    def on_step_end(self, step: int, row: dict[str, Any] | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def run(spec: Any) -> dict[str, Any]:
    import torch

    from bench.workers import prepare
    from dpokit import allocator
    from dpokit.apps.plan import build_inputs
    from dpokit.config import Config
    from dpokit.objectives.dpo import reference_mode
    from dpokit.training import memory
    from dpokit.training.loop import train

    cuda, run_dir, rows = prepare(spec)
    data_file = run_dir / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    cfg = Config().override(_overrides(spec, data_file) + list(spec.extra))
    probe = _Probe(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_train = time.perf_counter()
    result = train(cfg, hooks=[probe])
    t_end = time.perf_counter()
    stamps, micro, layout = probe.stamps, probe.micro, probe.layout

    if len(stamps) != spec.steps:
        raise RuntimeError(f"expected {spec.steps} step timestamps (train.log_every=1), got {len(stamps)}")
    steps = [micro[i * spec.grad_accum:(i + 1) * spec.grad_accum] for i in range(spec.steps)]
    applied = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in spec.extra}

    ref_forward = reference_mode(cfg) != "none" and not cfg.reference.precompute
    # dpokit's memory plan for the micro-batches this run took, checkpointing as it chose: the plan column
    inputs = build_inputs(cfg, "train", torch.device(spec.device))
    inputs.allocator = allocator.active()  # the one this run trained on
    planned = memory.plan_of_batches(inputs, probe.batches, int(layout.get("checkpoint_every", "0")))
    return {
        "plan_bytes": planned.total,
        "stamps": stamps,
        "steps_pairs": steps,
        "t_train": t_train,
        "t_end": t_end,
        "ref_forward": ref_forward,
        "flags": [f"{k}={v}" for k, v in applied.items()],
        "resolved": {
            "group_by_length": getattr(cfg.data, "group_by_length", None),
            "packing": getattr(cfg.data, "packing", None),
            "prefix_sharing": getattr(cfg.data, "prefix_sharing", None),
            **{k: v for k, v in layout.items() if k not in ("memory_plan_bytes", "checkpoint_every")},
            "reference.precompute": cfg.reference.precompute,
            "mixed_precision": cfg.train.mixed_precision,
            "model.dtype": cfg.model.dtype,
            "gradient_checkpointing": f"{cfg.train.gradient_checkpointing} ({layout.get('gradient_checkpointing')})",
            "memory_budget": cfg.train.memory_budget,
            "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
        },
        "steps_done": result.steps,
    }


if __name__ == "__main__":
    from bench.workers import main

    sys.exit(main("dpokit", run, sys.argv[1:], T_START))
