"""`dpokit plan CONFIG`: the memory a run will need, before anything heavy loads.

Reads the model's config (not its weights), tokenizes the training data (the tokenized cache
makes a second look free), collates the micro-batches at the data's length percentiles with
the run's own collator, and prints `dpokit.training.memory`'s plan: the run as configured
against its budget (with train.gradient_checkpointing=auto resolved), then one process's peak
under each distributed strategy at --num-processes N. (Its arguments are defined in dpokit.cli.)
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any

import torch

from dpokit import allocator
from dpokit.config import Config
from dpokit.data.files import data_files
from dpokit.models.forward import LM_HEAD_CHUNK
from dpokit.models.loading import load_config_and_tokenizer, resolve_dtype
from dpokit.training import memory
from dpokit.training.loop import OBJECTIVES

COMMAND_OBJECTIVE = {"train": "dpo", "sft": "sft", "reward": "reward", "kto": "kto"}


def build_inputs(cfg: Config, command: str, device: torch.device, strategy: str = "single",
                 world: int = 1) -> memory.RunInputs:  # fmt: skip
    """The plan's inputs for `cfg` without loading weights: model config, tokenized data, collator."""
    objective = OBJECTIVES[COMMAND_OBJECTIVE[command]](cfg)
    objective.validate()
    if device.type == "cuda" and not torch.cuda.is_available() and cfg.model.dtype == "auto":
        dtype = torch.bfloat16  # planning for a GPU from a machine without one: what auto picks on a recent GPU
    else:
        dtype = resolve_dtype(cfg.model.dtype, device)
    conf, tokenizer = load_config_and_tokenizer(cfg.model.name_or_path, cfg, dtype)
    train_files, _ = data_files(cfg.data, cfg.train.seed)
    examples, _ = objective.load_examples(train_files, tokenizer, None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config_only = SimpleNamespace(config=conf)  # what the collator reads of a model: its config
    collator = objective.build_collator(pad_id, config_only, device)
    return memory.RunInputs(cfg, conf, dtype, device, objective.name, objective.memory_reference(), examples,
                            objective.example_length, collator, LM_HEAD_CHUNK, strategy, world,
                            allocator.for_training())  # fmt: skip


def plan_command(args: argparse.Namespace, cfg: Config) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    inputs = build_inputs(cfg, args.for_command, device)
    run = memory.plan_run(inputs, _budget(cfg.train.memory_budget, device))
    world = args.num_processes if args.num_processes > 1 else 8
    table = strategy_table(inputs, run.checkpoint_every, world)
    if args.json:
        print(json.dumps({"run": _as_dict(run), "strategies": {s: _as_dict(p) for s, p in table.items()}}, indent=2))
        return 0
    print(run.render())
    if not run.fits:
        print(memory.refusal(run, cfg, OBJECTIVES[COMMAND_OBJECTIVE[args.for_command]].unit), flush=True)
    print()
    print(render_table(table, world))
    return 0 if run.fits else 1


def _budget(setting: float | str, device: torch.device) -> int | None:
    """train.memory_budget in bytes; None for auto when planning for a GPU this machine does not have."""
    if setting == "auto" and device.type == "cuda" and not torch.cuda.is_available():
        return None
    return memory.resolve_budget(setting, device)


def strategy_table(inputs: memory.RunInputs, every: int, world: int) -> dict[str, memory.MemoryPlan]:
    """One process's plan under each strategy at `world` processes, checkpointing as the run chose."""
    cfg = inputs.cfg.override([f"train.gradient_checkpointing={every if every else 'false'}"])
    plans = {}
    for strategy in memory.STRATEGIES:
        n = 1 if strategy == "single" else world
        chunk = 0 if strategy == "zero3" else inputs.lm_head_chunk  # ZeRO-3: full logits (training.loop.setup)
        changed = {**vars(inputs), "cfg": cfg, "strategy": strategy, "world": n, "lm_head_chunk": chunk}
        plans[strategy] = memory.plan_run(memory.RunInputs(**changed), None)
    return plans


def render_table(plans: dict[str, memory.MemoryPlan], world: int) -> str:
    names = ["weights", "reference", "gradients", "optimizer state", "activations"]
    head = f"per process at {world} processes (single: 1)"
    lines = [head, "| strategy | " + " | ".join(names) + " | other | total |", "|---" * (len(names) + 3) + "|"]
    for strategy, p in plans.items():
        cells = [p.item(n) for n in names]
        other = p.total - sum(cells)
        lines.append(f"| {strategy} | " + " | ".join(memory.gib(c) for c in cells)
                     + f" | {memory.gib(other)} | **{memory.gib(p.total)}** |")  # fmt: skip
    return "\n".join(lines)


def _as_dict(p: memory.MemoryPlan) -> dict[str, Any]:
    return {"total_bytes": p.total, "budget_bytes": p.budget, "fits": p.fits, "strategy": p.strategy,
            "world": p.world, "checkpoint_every": p.checkpoint_every, "percentiles": p.percentiles,
            "items": {i.name: i.bytes for i in p.items}}  # fmt: skip
