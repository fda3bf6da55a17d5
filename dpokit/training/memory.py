"""The memory plan: one process's peak memory for a run, estimated before it trains.

    peak = runtime + weights + reference + gradients + optimizer state          (held all run)
         + saved activations of the largest micro-batch                        (forward -> backward)
         + the backward's working set (one layer's activations again, its
           recomputation when checkpointed, the LM head's chunk)                (transient)
         [+ on CPU, glibc's fragmentation of the transient memory]

Everything comes from the model's config (`dpokit.models.memory.ModelShape`), the config and the
shapes of real collated micro-batches (the data's length percentiles), so `dpokit plan` answers
without loading weights, and the loop uses the same numbers to choose
`train.gradient_checkpointing: auto` against `train.memory_budget` and to refuse a run that
cannot fit (`choose_checkpointing`). Per-process numbers under each distributed strategy:
`for_strategy`. The CPU constants (runtime, allocator factor) are calibrated against the peak
resident set (VmHWM) of real runs; docs/benchmarks.md has the plan-vs-measured column.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dpokit import allocator
from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.models import quantize
from dpokit.models.loading import fixed_checkpointing
from dpokit.models.memory import ModelShape
from dpokit.training.optim import optimizer_state_bytes_per_param

GIB = 2**30

# CPU: the resident set of a process that has imported torch, transformers, peft and accelerate and
# built a model, before weights count (measured VmRSS, torch 2.13 / transformers 5.24).
CPU_RUNTIME_BYTES = int(0.42 * GIB)
# CPU: the resident peak exceeds the live peak by this factor of the step's transient memory, per
# allocator (dpokit.allocator): mimalloc, which `dpokit train` preloads, returns freed blocks;
# glibc's heaps keep them and fragment (measured on SmolLM2 LoRA and full at two lengths:
# docs/benchmarks.md, and the slow test in tests/integration/test_memory_budget.py).
CPU_ALLOCATOR_FACTORS = {"mimalloc": 1.25, "glibc": 1.6}
# what auto budgets leave free: this fraction of the free memory (other processes, the page cache,
# the CUDA context and allocator slack)
BUDGET_MARGIN = 0.10

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3")
CHECKPOINT_CHOICES = (0, 4, 3, 2, 1)  # train.gradient_checkpointing=auto tries these, cheapest first


@dataclass(frozen=True)
class BatchShape:
    """One collated micro-batch as the forward sees it."""

    rows: int  # R: sequences (or packed rows) in the forward
    length: int  # T: padded length
    scored: int  # positions the LM head scores
    mask_bytes: int = 0  # a 4D attention mask's bytes (prefix sharing / packing), else 0

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> BatchShape:
        ids = batch["input_ids"]  # (R, T)
        if "score_index" in batch:  # packed / prefix-shared: (4, M) scored positions
            scored = int(batch["score_index"].shape[1])
        elif "completion_mask" in batch:
            scored = int(batch["completion_mask"].sum())
        else:
            scored = ids.shape[0]  # a value head: one score per row
        rows, length = ids.shape
        # packed / prefix-shared rows get an (R, 1, T, T) boolean mask in the forward (models.forward)
        mask = rows * length * length if "segment_ids" in batch and "cu_seq_q" not in batch else 0
        return cls(rows, length, scored, mask)


@dataclass
class PlanItem:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """Line items of one process's estimated peak, and the budget it is checked against."""

    items: list[PlanItem]
    checkpoint_every: int  # 0 = no checkpointing, k = every k-th layer
    budget: int | None = None
    device: str = "cpu"
    strategy: str = "single"
    world: int = 1
    percentiles: dict[str, int] = field(default_factory=dict)  # "p50" -> peak at that batch shape
    allocator: str = ""  # CPU: the allocator the factor is for (dpokit.allocator)
    alternatives: dict[str, int] = field(default_factory=dict)  # "checkpointing off" -> that plan's total

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def item(self, name: str) -> int:
        return sum(i.bytes for i in self.items if i.name == name)

    def render(self) -> str:
        """The table `dpokit plan` prints."""
        lines = [f"memory plan: {self.strategy}, {self.world} process(es), {self.device}, "
                 f"checkpointing {describe_checkpointing(self.checkpoint_every)}"]  # fmt: skip
        for i in self.items:
            lines.append(f"  {i.name:<22} {gib(i.bytes):>9}  {i.note}")
        lines.append(f"  {'total (peak)':<22} {gib(self.total):>9}")
        if self.percentiles:
            lines.append("  peak at the data's micro-batch length percentiles: "
                         + ", ".join(f"{k} {gib(v)}" for k, v in self.percentiles.items()))  # fmt: skip
        if self.alternatives:
            lines.append("  the same run with " + ", ".join(f"{k}: {gib(v)}" for k, v in self.alternatives.items()))
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  budget {gib(self.budget)}: {verdict}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One log line: `memory: plan 11.2 GiB of 14.0 budget; checkpointing every 2nd layer`."""
        budget = f" of {self.budget / GIB:.1f} budget" if self.budget is not None else ""
        alloc = f"; CPU allocator {self.allocator}" if self.allocator else ""
        return (f"memory: plan {self.total / GIB:.2f} GiB{budget}; checkpointing "
                f"{describe_checkpointing(self.checkpoint_every)}{alloc}")  # fmt: skip


def gib(n: float) -> str:
    """Bytes as GiB (MiB below one GiB, so a tiny model's items are not all 0.00)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def describe_checkpointing(every: int) -> str:
    if every == 0:
        return "off"
    if every == 1:
        return "every layer"
    return f"every {every}{ {2: 'nd', 3: 'rd'}.get(every, 'th') } layer"


# ---- what the run holds -------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFacts:
    """The settings the plan reads, resolved (no `auto` left)."""

    shape: ModelShape
    precision: str  # fp32 | bf16 | fp32+autocast
    objective: str  # dpo | sft | reward
    reference: str  # copy | adapter | none | precompute
    optimizer: str
    lora_r: int = 0  # 0: full fine-tuning
    lora_targets: int = 0
    lora_params: int = 0
    quantize: str = "none"
    lm_head_chunk: int = 256  # 0: full logits
    device: str = "cpu"
    grad_accum: int = 1
    allocator: str = "mimalloc"  # the CPU allocator (dpokit.allocator.active())

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @classmethod
    def from_config(cls, cfg: Config, shape: ModelShape, objective: str, reference: str, device: str,
                    dtype: torch.dtype, lm_head_chunk: int, alloc: str = "") -> RunFacts:  # fmt: skip
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        if precision == "fp32" and cfg.train.mixed_precision == "bf16":
            precision = "fp32+autocast"
        lora, alloc = cfg.lora, alloc or allocator.active()
        return cls(shape, precision, objective, reference, cfg.train.optimizer,
                   lora.r if lora.enabled else 0, shape.lora_targets(lora.target_modules) if lora.enabled else 0,
                   shape.lora_params(lora.r, lora.target_modules) if lora.enabled else 0,
                   lora.quantize, lm_head_chunk, device, cfg.train.grad_accum_steps, alloc)  # fmt: skip


def static_items(f: RunFacts) -> list[PlanItem]:
    """Weights, reference and optimizer state: held from set-up to the end (gradients: `gradient_item`)."""
    s, wb = f.shape, f.weight_bytes
    params = s.params()
    if f.lora_r:
        linear = s.layers * sum(a * b for a, b in s.linear_shapes().values())
        qbytes = quantize.bytes_per_param(f.quantize, s.hidden) if f.quantize != "none" else wb
        base = (params - linear) * wb + linear * qbytes
        weights, trainable, tbytes = base + f.lora_params * 4, f.lora_params, 4  # adapters train in fp32
        note = f"{params / 1e6:.3g}M base ({f.quantize if f.quantize != 'none' else f.precision}) + {f.lora_params / 1e6:.2f}M adapter"
    else:
        weights, trainable, tbytes = params * wb, params, wb
        note = f"{params / 1e6:.3g}M params, {wb} bytes each"
    items = [PlanItem("weights", int(weights), note)]
    if f.reference == "copy":
        items.append(PlanItem("reference", params * wb, "a frozen copy"))
    else:
        items.append(PlanItem("reference", 0, {"adapter": "the base with adapters off", "precompute":
                                               "precomputed log-probs", "none": "none"}.get(f.reference, "")))  # fmt: skip
    opt = optimizer_state_bytes_per_param(f.optimizer, tbytes)
    items.append(PlanItem("optimizer state", int(trainable * opt), f"{f.optimizer}, {opt:g} bytes per trainable"))
    return items


def gradient_bytes(f: RunFacts) -> tuple[int, int]:
    """(all gradients, those of parameters outside the decoder layers) in bytes; LoRA's train in fp32."""
    s = f.shape
    if f.lora_r:
        return f.lora_params * 4, 0
    return s.params() * f.weight_bytes, (s.params() - s.layers * s.layer_params()) * f.weight_bytes


def gradient_item(f: RunFacts, activations: int) -> PlanItem:
    """The gradients that exist at the peak. They are freed after every optimizer step and filled in
    by the backward from the last layer to the first while the activations are freed, so with one
    micro-batch per step the peak is max(activations + the gradients outside the layers (LM head,
    embeddings: computed first), all gradients); with accumulation all gradients are held while the
    next micro-batch's activations build up."""
    total, outside = gradient_bytes(f)
    held = total if f.grad_accum > 1 else max(outside, total - activations)
    return PlanItem("gradients", held, f"{gib(held)} of {gib(total)} held at the peak")


def activation_items(f: RunFacts, batch: BatchShape, every: int) -> list[PlanItem]:
    """Saved activations of one micro-batch and the backward's working set."""
    s = f.shape
    full = s.layer_activation_bytes(f.precision, f.lora_r, f.lora_targets)  # per token per layer
    kept = s.checkpointed_layer_bytes(f.precision)
    n_ckpt = math.ceil(s.layers / every) if every else 0
    per_token = (s.layers - n_ckpt) * full + n_ckpt * kept
    ab = 2 if f.precision == "bf16" else 4
    # outside the layers: the final norm (like a layer's norm), input ids and positions, the mask
    outside = batch.tokens * (2 * s.hidden * ab + 8 + 16) + batch.mask_bytes
    # SDPA with a boolean 4D mask keeps a converted copy per layer: measured R*T^2 * max(dtype bytes,
    # heads) bytes (9 bytes per mask element for SmolLM2's 9 heads; the CPU kernel's layout varies)
    mask_per_layer = batch.mask_bytes * max(ab, s.heads)
    saved = batch.tokens * per_token + outside + (s.layers - n_ckpt) * mask_per_layer
    if f.precision == "fp32+autocast":  # autocast keeps each layer's bf16 weight copies for its backward
        saved += (s.layers - n_ckpt) * (s.layer_params() + 2 * f.lora_params // max(1, s.layers)) * 2
    items = [PlanItem("activations", saved, f"{batch.rows} x {batch.length} tokens, {s.layers - n_ckpt} of "
                                            f"{s.layers} layers keep theirs")]  # fmt: skip
    # the backward of a layer holds its activations' gradients (about one layer's activations), and
    # a checkpointed layer's recomputed activations on top
    working = batch.tokens * full * (2 if n_ckpt else 1)
    if f.objective == "reward":
        head = batch.tokens * s.hidden * 4
    elif f.lm_head_chunk:  # the chunked head: (chunk, V) fp32 logits, softmax and gradient at once
        head = batch.scored * s.hidden * ab + 3 * min(f.lm_head_chunk, batch.scored) * s.vocab * 4
    else:  # full logits, their log-softmax and gradient, fp32
        head = 3 * batch.tokens * s.vocab * 4
    items.append(PlanItem("backward working set", working + head, "one layer's gradients"
                          + (" and its recomputation" if n_ckpt else "") + ", LM head"))  # fmt: skip
    return items


def plan(f: RunFacts, batch: BatchShape, every: int = 0, budget: int | None = None) -> MemoryPlan:
    """One process's plan for a single-process run."""
    items = []
    if f.device == "cpu":
        items.append(PlanItem("runtime", CPU_RUNTIME_BYTES, "torch, transformers, the interpreter"))
    items += static_items(f)
    dynamic = activation_items(f, batch, every)
    items += [gradient_item(f, dynamic[0].bytes), *dynamic]
    if f.device == "cpu":
        factor = CPU_ALLOCATOR_FACTORS.get(f.allocator, CPU_ALLOCATOR_FACTORS["glibc"])
        frag = sum(i.bytes for i in dynamic) * (factor - 1)
        items.append(PlanItem("allocator", int(frag), f"{f.allocator}: freed memory not yet returned"))
    return MemoryPlan(items, every, budget, f.device, allocator=f.allocator if f.device == "cpu" else "")


def for_strategy(p: MemoryPlan, f: RunFacts, strategy: str, world: int) -> MemoryPlan:
    """The per-process plan under a distributed strategy with `world` processes.

    ddp: a whole model per process, plus DDP's gradient buckets (a second copy of the gradients).
    fsdp (FSDP2, full shard): weights, gradients and optimizer state / world, plus two layers'
    gathered weights (the one computing and the one prefetched) and the unsharded embeddings.
    zero2: optimizer state and gradients / world. zero3: weights too (the reference stays whole:
    dpokit keeps it as a plain copy on each process). Activations do not shrink with world size.
    """
    if strategy == "single" or world == 1:
        return p
    s, wb = f.shape, f.weight_bytes
    gathered = 2 * s.layer_params() * wb + s.vocab * s.hidden * wb
    scale = {"weights": 1.0, "reference": 1.0, "gradients": 1.0, "optimizer state": 1.0}
    extra: list[PlanItem] = []
    if strategy == "ddp":
        extra.append(PlanItem("DDP buckets", gradient_bytes(f)[0], "a second copy of the gradients"))
    if strategy in ("fsdp", "zero3"):
        scale.update(weights=1 / world, gradients=1 / world)
        extra.append(PlanItem("gathered layers", gathered, "two layers' weights and the embeddings, unsharded"))
    if strategy == "fsdp":
        scale["reference"] = 1 / world
    if strategy in ("zero2", "fsdp", "zero3"):
        scale["optimizer state"] = 1 / world
        scale["gradients"] = 1 / world
    items = [replace(i, bytes=int(i.bytes * scale.get(i.name, 1.0))) for i in p.items] + extra
    return MemoryPlan(items, p.checkpoint_every, p.budget, p.device, strategy, world, allocator=p.allocator)


# ---- choosing -----------------------------------------------------------------------------------
def choose_checkpointing(make_plan: Callable[[int], MemoryPlan], requested: bool | int | str) -> MemoryPlan:
    """The plan with `train.gradient_checkpointing` resolved: as set, or for auto the cheapest
    recomputation that fits the budget (off, every 4th, 3rd, 2nd layer, every layer). When even every
    layer does not fit, that plan is returned (`fits` false) and the caller refuses with `refusal`."""
    if requested != "auto":
        return make_plan(fixed_checkpointing(requested))
    for every in CHECKPOINT_CHOICES:
        candidate = make_plan(every)
        if candidate.fits:
            return candidate
    return candidate  # every layer checkpointed, and still over: the caller refuses with `refusal`


def refusal(p: MemoryPlan, cfg: Config, unit: str) -> DpokitError:
    """Why the run cannot fit, with the plan's numbers and what to change."""
    t, fixes = cfg.train, []
    if t.micro_batch_size > 1:
        fixes.append(f"train.micro_batch_size={t.micro_batch_size // 2} train.grad_accum_steps={t.grad_accum_steps * 2} "
                     f"(the same {unit} per step)")  # fmt: skip
    if not cfg.lora.enabled:
        fixes.append("lora.enabled=true (no gradients or optimizer state for the base weights)")
    elif cfg.lora.quantize == "none":
        fixes.append("lora.quantize=nf4 (a 4-bit base)")
    if t.optimizer == "adamw":
        fixes.append("train.optimizer=adamw8bit (a quarter of AdamW's state)")
    if p.item("reference"):
        fixes.append("reference.precompute=true (no reference model while training)")
    fixes.append(f"data.max_length={cfg.data.max_length // 2} (now {cfg.data.max_length})")
    return DpokitError(
        f"this run does not fit its memory budget even with every layer checkpointed: the plan needs "
        f"{gib(p.total)} per process, the budget is {gib(p.budget or 0)} (train.memory_budget="
        f"{t.memory_budget}).\n{p.render()}\nTo use less memory: " + "; or ".join(fixes)
    )


def resolve_budget(setting: float | str, device: torch.device, local_world: int = 1) -> int:
    """train.memory_budget in bytes: the number of GiB given, or for auto the memory this process
    could grow into, less BUDGET_MARGIN: on CUDA the device's free memory + what this process's
    allocator holds; on CPU its share of the available RAM (capped by a cgroup limit; the
    `local_world` processes on this machine share it) + its own resident set."""
    if setting != "auto":
        return int(float(setting) * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((free + torch.cuda.memory_reserved(device)) * (1 - BUDGET_MARGIN))
    return int((_available_ram() / max(1, local_world) + _resident_bytes()) * (1 - BUDGET_MARGIN))


def _available_ram() -> int:
    available = _meminfo_bytes("MemAvailable") or _meminfo_bytes("MemFree")
    limit = _cgroup_limit()
    if limit is not None:
        available = min(available, max(0, limit - _cgroup_usage()))
    return available


def _meminfo_bytes(key: str) -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _cgroup_usage() -> int:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(open(path, encoding="ascii").read().strip())
        except (OSError, ValueError):
            continue
    return 0


def _resident_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- batches ------------------------------------------------------------------------------------
def batch_shapes(
    examples: Sequence[Any], length: Callable[[Any], int], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    micro_batch_size: int, grouped: bool,
) -> tuple[BatchShape, dict[str, BatchShape]]:
    """(the largest micro-batch, micro-batches at the length percentiles p50 / p90 / max), collated
    by the run's own collator. Grouped by length, the largest micro-batch is the longest examples
    together; otherwise the longest example may share a batch with any: it pads them all to its length."""
    order = sorted(examples, key=length)
    n = len(order)
    # `length` orders for batching; what the forward sees (e.g. one prompt + chosen + rejected row under
    # prefix sharing) can order the longest few differently, so those are ranked by their collated size
    longest = sorted(order[-4 * micro_batch_size:], key=lambda e: BatchShape.of(collate([e])).tokens)
    percentiles = {f"p{q}": BatchShape.of(collate([order[min(n - 1, (n * q) // 100)]] * micro_batch_size))
                   for q in (50, 90)}  # fmt: skip
    top = longest[-micro_batch_size:] if grouped else [longest[-1]] * micro_batch_size
    largest = BatchShape.of(collate(list(top)))
    percentiles["max"] = largest
    return largest, percentiles


# ---- a run --------------------------------------------------------------------------------------
@dataclass
class RunInputs:
    """What `plan_run` reads: the config and the pieces a run has set up (or `dpokit plan` built)."""

    cfg: Config
    model_config: Any  # the transformers config
    dtype: torch.dtype
    device: torch.device
    objective: str  # Objective.name
    reference: str  # Objective.memory_reference()
    examples: Sequence[Any]
    length: Callable[[Any], int]  # Objective.example_length
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    lm_head_chunk: int
    strategy: str = "single"  # one of STRATEGIES
    world: int = 1
    allocator: str = ""  # the CPU allocator the run trains on; "" = this process's (dpokit.allocator.active)


def plan_run(inputs: RunInputs, budget: int | None) -> MemoryPlan:
    """The run's plan with train.gradient_checkpointing resolved against `budget` (bytes; None = no
    budget), per process under `inputs.strategy`."""
    cfg, facts = inputs.cfg, _facts(inputs)
    largest, percentiles = batch_shapes(inputs.examples, inputs.length, inputs.collate, cfg.train.micro_batch_size,
                                        cfg.data.group_by_length)  # fmt: skip

    def make(every: int) -> MemoryPlan:
        p = for_strategy(plan(facts, largest, every, budget), facts, inputs.strategy, inputs.world)
        p.percentiles = {k: for_strategy(plan(facts, b, every), facts, inputs.strategy, inputs.world).total
                         for k, b in percentiles.items()}  # fmt: skip
        return p

    chosen = choose_checkpointing(make, cfg.train.gradient_checkpointing)
    chosen.alternatives = {f"checkpointing {describe_checkpointing(k)}": make(k).total
                           for k in (0, 1) if k != chosen.checkpoint_every}  # fmt: skip
    return chosen


def plan_of_batches(inputs: RunInputs, batches: Sequence[Sequence[Any]], every: int) -> MemoryPlan:
    """The plan for the micro-batches a run actually took (the costliest of them), checkpointing as
    it ran: what its measured peak is compared with (the benchmark's plan column)."""
    facts = _facts(inputs)
    plans = [for_strategy(plan(facts, BatchShape.of(inputs.collate(list(b))), every), facts, inputs.strategy,
                          inputs.world) for b in batches]  # fmt: skip
    return max(plans, key=lambda p: p.total)


def _facts(inputs: RunInputs) -> RunFacts:
    shape = ModelShape.from_config(inputs.model_config)
    return RunFacts.from_config(inputs.cfg, shape, inputs.objective, inputs.reference, inputs.device.type,
                                inputs.dtype, inputs.lm_head_chunk, inputs.allocator)  # fmt: skip
