"""Rank and process helpers: the one place that knows about several processes.

Everything that shards work, reduces numbers across processes or lets only one process write goes
through `Dist`, so the training loop, the inference pass, evaluation and the reference cache never
branch on Accelerate themselves. A single-process run uses `Dist.local()`; a run under Accelerate
(`accelerate launch`, `torchrun`) uses `Dist.from_accelerator(make_accelerator(...))`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpokit.errors import DpokitError, WriteError


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and the collectives it needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    accelerator: Any = None  # accelerate.Accelerator when the run has one

    @classmethod
    def local(cls, device: torch.device | str | None = None) -> Dist:
        """One process on `device` (default: CUDA when available, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(0, 1, torch.device(device))

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Dist:
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (the identity with one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of `items`: every world-th one, starting at the rank."""
        return items[self.rank :: self.world]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's mixed-precision context (a no-op without an accelerator)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    @property
    def strategy(self) -> str:
        """'single', 'ddp', 'fsdp' or 'deepspeed' (see `strategy`)."""
        return strategy(self.accelerator)

    @property
    def sharded(self) -> bool:
        """Are the model's parameters split over processes (FSDP, DeepSpeed)? Then every forward is
        collective: all processes must run the same number of them."""
        return self.strategy in ("fsdp", "deepspeed")

    def full_model(self, model: Any) -> Any:
        """The trained module with whole, plain weights on the main process, for saving; None on
        the others. Under FSDP/DeepSpeed every process must call it: the shards are gathered onto
        the main process's CPU and put in place of the sharded parameters (the module is only
        saved afterwards, never run)."""
        acc = self.accelerator
        module = acc.unwrap_model(model) if acc is not None else model
        if self.strategy in ("single", "ddp"):
            return module if self.is_main else None
        full = acc.get_state_dict(model)  # collective; the whole state on the main process
        if not self.is_main:
            return None
        # Not load_state_dict: FSDP2's load hook would re-shard what it is given.
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, value in full.items():
            if name in params:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, torch.nn.Parameter(value, requires_grad=False))
        return module

    def place_frozen(self, model: Any) -> Any:
        """A frozen model (DPO's reference copy) placed like the policy, in evaluation mode: sharded
        the same way under FSDP (each process holds its shards, gathered layer by layer in the
        forward), on this process's device otherwise (DDP, DeepSpeed: one copy per process)."""
        if self.strategy == "fsdp":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            model = fsdp2_prepare_model(self.accelerator, model)
        else:
            if self.zero_stage == 3:
                self.print("reference: a whole copy on each process under DeepSpeed ZeRO-3 (LoRA, or "
                           "reference.precompute=true, keeps no second model)")
            model.to(self.device)
        model.eval()  # (DeepSpeed's engine returns None from eval())
        return model

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """The context models are loaded in: under DeepSpeed, whole on each process, not partitioned
        while loading (Accelerate registers its config with transformers, which then partitions any
        ZeRO-3 load, whatever zero3_init_flag says), so the reference copy and the precompute pass
        see real weights; the engine partitions the policy when it is prepared."""
        if self.strategy != "deepspeed":
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    @property
    def zero_stage(self) -> int:
        """DeepSpeed's ZeRO stage (0 without DeepSpeed)."""
        if self.strategy != "deepspeed":
            return 0
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    @property
    def memory_strategy(self) -> str:
        """The strategy as the memory plan names it: single, ddp, fsdp, zero2 or zero3 (ZeRO-1 counts as 2)."""
        if self.strategy == "deepspeed":
            return "zero3" if self.zero_stage == 3 else "zero2"
        return self.strategy

    @property
    def local_world(self) -> int:
        """Processes on this machine (they share its RAM): torchrun / Accelerate's LOCAL_WORLD_SIZE."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.world > 1 else 1

    def print(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def first_failure(self, failure: WriteError | None) -> WriteError | None:
        """Collective: every process learns the write failure of any process (the lowest rank's), so
        that all of them stop with its message instead of the others waiting for it at a barrier."""
        if self.world == 1:
            return failure
        mine = None if failure is None else (failure.path, failure.reason)
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, mine)
        for rank, found in enumerate(gathered):
            if found is not None:
                return WriteError(found[0], f"{found[1]} (on process {rank})")
        return None

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. writes a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def local_value(tensor: Tensor) -> Tensor:
    """A plain tensor of the full value: a DTensor (FSDP2's parameters, norms) is gathered; a
    plain tensor is returned as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def is_deepspeed_engine(model: Any) -> bool:
    """Is `model` DeepSpeed's engine (what Accelerate's prepare returns under DeepSpeed)? Checked by
    class name: deepspeed is an optional extra, not imported here."""
    return type(model).__name__ == "DeepSpeedEngine"


def launched_world() -> int:
    """The number of processes the launcher (torchrun, `accelerate launch`) started: WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK), before any process group exists; 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def close_process_group() -> None:
    """A launched worker's last act: wait for the others, then shut the process group down.

    A gloo group that is never destroyed is torn down by the interpreter's exit, where gloo's
    threads may still be joinable: the process then aborts ("terminate called without an active
    exception", SIGABRT) after a run that finished, and the launcher reports the run failed (seen
    in 1 of 30 two-process FSDP runs here). No-op when no group was started (one process).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def deepspeed_requested() -> bool:
    """Did the launcher (an Accelerate config with distributed_type DEEPSPEED) ask for DeepSpeed?"""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_run_settings(
    ds_config: dict[str, Any], micro_batch_size: int, grad_accum_steps: int, max_grad_norm: float, world: int
) -> dict[str, Any]:
    """The DeepSpeed config with the run's batch, accumulation and clipping filled in.

    DeepSpeed runs these itself (its engine steps on the accumulation boundary and clips), so they
    must equal dpokit's train.* settings: a value left out or "auto" takes dpokit's; a different
    number is an error naming both.
    """
    want = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum_steps,
            "train_batch_size": micro_batch_size * grad_accum_steps * world, "gradient_clipping": max_grad_norm}
    dpokit_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                  "gradient_accumulation_steps": "train.grad_accum_steps",
                  "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x processes",
                  "gradient_clipping": "train.max_grad_norm"}  # fmt: skip
    out = dict(ds_config)
    for key, value in want.items():
        have = out.get(key, "auto")
        if have not in ("auto", None) and float(have) != float(value):
            raise DpokitError(
                f"the DeepSpeed config sets {key}={have}, but this run has {dpokit_key[key]} = {value}: "
                f"set {key} to \"auto\" (dpokit fills it) or change {dpokit_key[key]}"
            )
        out[key] = value
    return out


def make_accelerator(
    mixed_precision: str, micro_batch_size: int = 1, grad_accum_steps: int = 1, max_grad_norm: float = 0.0,
    **kwargs: Any,
) -> Any:
    """An Accelerator for this run: every launched process in one process group, FSDP when the
    launcher asked for it, and a fresh one when an earlier run in this process used another precision.

    * Without CUDA, Accelerate joins launched processes into a gloo group only when told `cpu=True`;
      otherwise each would train alone and all would write the same folder. So `cpu=True` is passed
      when WORLD_SIZE > 1 and there is no GPU, and a process that still finds itself alone fails.
    * Accelerate applies FSDP on accelerators only; on CPU (gloo: this project's tests) it would
      silently fall back to DDP. FSDP2's `fully_shard` runs on CPU, so the state Accelerate sets on
      a GPU is set here: the same `fsdp2_prepare_model` path as on a GPU.
    * Accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator with
      a different `mixed_precision` (a notebook that trains twice, or the test suite). The process
      group (PartialState) is kept; only the per-run settings are dropped.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    world, deepspeed = launched_world(), deepspeed_requested()
    no_gpu = world > 1 and not torch.cuda.is_available()
    cpu_group = no_gpu and not deepspeed
    if no_gpu and deepspeed:  # Accelerate drops DeepSpeed with cpu=True: name the backend instead
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu_group or kwargs.pop("cpu", False), **kwargs)
    if acc.num_processes != world:
        raise DpokitError(
            f"this process was launched as 1 of {world} (WORLD_SIZE={world}) but joined a group of "
            f"{acc.num_processes}; launch with `dpokit train ... --num-processes {world}`, "
            "`accelerate launch` or `torchrun`"
        )
    plugin = getattr(acc.state, "fsdp_plugin", None) or _env_fsdp_plugin()
    if cpu_group and plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        if plugin.fsdp_version != 2:
            raise DpokitError("FSDP on CPU needs FSDP2 (fsdp_version: 2 in the Accelerate config)")
        acc.state.fsdp_plugin = plugin
        # both singletons, as Accelerate's own GPU branch does (AcceleratorState re-reads PartialState)
        acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds_config = acc.state.deepspeed_plugin.deepspeed_config  # updated in place: the plugin reads this dict
        ds_config.update(deepspeed_run_settings(ds_config, micro_batch_size, grad_accum_steps, max_grad_norm,
                                                acc.num_processes))  # fmt: skip
    return acc


def _env_fsdp_plugin() -> Any:
    """The FSDP plugin `accelerate launch` describes in ACCELERATE_USE_FSDP / FSDP_* variables, or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def strategy(accelerator: Any) -> str:
    """'single', 'ddp', 'fsdp' or 'deepspeed': how the run's model is spread over processes."""
    if accelerator is None or accelerator.num_processes == 1 and accelerator.distributed_type.name == "NO":
        return "single"
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(accelerator.distributed_type.name, "ddp")
