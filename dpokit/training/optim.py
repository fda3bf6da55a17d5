"""The optimizer, the learning-rate schedule and the run length in optimizer steps."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.models.quantize import import_torchao


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
    if t.optimizer == "adamw8bit":
        return build_adamw8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    # The fused kernel (CPU and CUDA) updates each tensor in one pass: faster than the per-tensor loop,
    # and no per-step temporaries the size of the model. Plain tensors only (not FSDP's DTensors).
    fused = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                and p.dtype in (torch.float32, torch.bfloat16) for p in params)  # fmt: skip
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


# ---- 8-bit AdamW (torchao) ---------------------------------------------------------------
ADAMW8BIT_NEEDS = "train.optimizer=adamw8bit needs torchao: pip install 'dpokit[quant]'"
ADAMW8BIT_BLOCK = 256  # torchao's default: one fp32 scale per 256 values of a moment
ADAMW8BIT_MIN_NUMEL = 4096  # torchao keeps the moments of smaller tensors (and of sizes not a multiple of the block) unquantised
_ADAMW8BIT_DEVICES = ("cpu", "cuda")


def _import_torchao_optim() -> Any:
    """`torchao.optim`, imported on first use: torchao is an optional extra (`dpokit[quant]`), and
    importing it registers its tensor subclasses, which a run with another optimizer does not need."""
    return import_torchao("torchao.optim", ADAMW8BIT_NEEDS)


def build_adamw8bit(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with both moments stored in 8 bits (block-wise dynamic quantisation, torchao).

    Why torchao: it is pure PyTorch (each parameter's update is one `torch.compile`d function), so
    it runs on CPU as well as CUDA, unlike bitsandbytes' CUDA kernels. The first step compiles one
    kernel per distinct parameter shape (seconds); later steps reuse them.
    """
    devices = sorted({p.device.type for p in params} - set(_ADAMW8BIT_DEVICES))
    if devices:
        raise DpokitError(f"train.optimizer=adamw8bit (torchao) runs on CPU or CUDA parameters, not {', '.join(devices)}; "
                          "use train.optimizer=adamw")
    cls = _adamw8bit_class(_import_torchao_optim().AdamW8bit)
    return cls(params, lr=lr, weight_decay=weight_decay, block_size=ADAMW8BIT_BLOCK)


def _adamw8bit_class(base: type) -> type:
    """torchao's AdamW8bit, with the lr kept a plain float in `param_groups`.

    torchao stores each group's lr as a tensor (so its compiled step does not recompile when the
    schedule changes it). The rest of dpokit expects floats there: the scheduler's `get_last_lr()`
    goes into metrics.jsonl, and resuming with a new train.lr assigns a float. So the float stays
    in the group and is copied into a tensor of the group's own just for the step.
    """

    class AdamW8bit(base):  # type: ignore[misc, valid-type]
        def add_param_group(self, param_group: dict[str, Any]) -> None:
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            group["lr"] = float(group["lr"])

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            floats = [g["lr"] for g in self.param_groups]
            if not hasattr(self, "_lr_tensors"):
                self._lr_tensors: list[torch.Tensor] = []
            while len(self._lr_tensors) < len(self.param_groups):
                self._lr_tensors.append(torch.zeros((), dtype=torch.float32))
            try:
                for group, lr, t in zip(self.param_groups, floats, self._lr_tensors):
                    group["lr"] = t.fill_(float(lr))
                return _compile_errors_named(super().step, closure)
            finally:
                for group, lr in zip(self.param_groups, floats):
                    group["lr"] = lr

    return AdamW8bit


def _compile_errors_named(step: Any, closure: Any) -> Any:
    """Run torchao's step; a failure to compile its kernel (on CPU: no C++ compiler) becomes a
    DpokitError saying what is needed instead of a long inductor traceback."""
    try:
        return step(closure)
    except Exception as exc:  # torch._dynamo.exc.BackendCompilerFailed and friends
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise DpokitError(
                "train.optimizer=adamw8bit: torchao's update kernel did not compile "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it needs torch.compile "
                "to work here (on CPU a C++ compiler such as g++; on CUDA, triton). Use train.optimizer=adamw"
            ) from exc
        raise


def optimizer_state_bytes_per_param(name: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter of `param_bytes` bytes (the memory plan's number).

    adamw:     two moments (exp_avg, exp_avg_sq) in the parameter's dtype: 2 * param_bytes.
    rmsprop:   one (square_avg): param_bytes.
    adamw8bit: two moments of one byte each (uint8 codes), plus for each moment one fp32 scale per
               block of 256 values: 2 * (1 + 4/256) = 2.03125 bytes, whatever the parameter's dtype.
               Exception: torchao keeps the moments of a tensor with fewer than ADAMW8BIT_MIN_NUMEL (4096)
               values, or a size not a multiple of 256, unquantised, i.e. 2 * param_bytes. A LoRA adapter of
               rank r on a layer of width d has r * d values, so needs r * d >= 4096 to be quantised (r=16:
               d >= 256); norms and biases never are. Each quantised moment also holds a 256-entry fp32
               lookup table (1 KiB per tensor, not per value; ignored here).
    """
    if name == "adamw8bit":
        return 2 * (1 + 4 / ADAMW8BIT_BLOCK)
    if name == "rmsprop":
        return float(param_bytes)
    if name == "adamw":
        return 2.0 * param_bytes
    raise ValueError(f"unknown optimizer '{name}'")


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


