"""The optimizer, the learning-rate schedule and the run length in optimizer steps."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpokit.config import Config
from dpokit.errors import DpokitError


def total_steps(cfg: Config, n_examples: int, world: int) -> int:
    """train.max_steps, or the steps train.epochs passes over `n_examples` take at this batch size."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    per_step = t.micro_batch_size * t.grad_accum_steps * world
    return max(1, math.ceil(t.epochs * n_examples / per_step))


def build_optimizer(cfg: Config, model: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DpokitError("the model has no trainable parameters (check lora.target_modules)")
    t = cfg.train
    if t.optimizer == "rmsprop":  # the reference DPO implementation's choice
        return torch.optim.RMSprop(params, lr=t.lr, weight_decay=t.weight_decay)
    # The fused kernel (CPU and CUDA) updates each tensor in one pass: faster than the per-tensor loop,
    # and no per-step temporaries the size of the model. Plain tensors only (not FSDP's DTensors).
    fused = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                and p.dtype in (torch.float32, torch.bfloat16) for p in params)  # fmt: skip
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then linear/cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, steps, t.scheduler))


