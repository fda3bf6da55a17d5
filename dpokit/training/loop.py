"""The training loop: one thin loop over Accelerate for every objective on it (DPO, and more).

Order of one optimizer step (nanoGPT style): for each of `grad_accum_steps` micro-batches, the
objective turns the batch into a mean loss and per-example values -> backward (scaled by
1/grad_accum_steps); then clip -> optimizer step -> scheduler step -> log / eval / save.

The loop knows nothing about preference pairs: what a batch is, what its loss and metrics are,
what a reference is and which warnings to give belong to the `Objective`
(`dpokit.objectives.base`; DPO is `dpokit.objectives.dpo`). Hooks (`dpokit.training.hooks`) watch it.
Set-up, evaluation, logging and checkpointing are named helpers below, not inline blocks.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed
from torch import Tensor

from dpokit import faults
from dpokit.config import Config
from dpokit.data.files import data_files, write_rows
from dpokit.data.stream import ExampleStream
from dpokit.dist import Dist, local_value, make_accelerator, strategy
from dpokit.errors import DpokitError, WriteError, writing
from dpokit.models.forward import LM_HEAD_CHUNK
from dpokit.models.layout import attn_implementation_of, base_config
from dpokit.models.loading import apply_checkpointing, resolve_dtype
from dpokit.objectives.base import MetricAccumulator, Objective, ObjectiveSetup, evaluate_examples
from dpokit.objectives.dpo import DPOObjective
from dpokit.objectives.kto import KTOObjective
from dpokit.objectives.reward import RewardObjective
from dpokit.objectives.sft import SFTObjective
from dpokit.training import card as cards
from dpokit.training import checkpoint as ckpt
from dpokit.training import memory, outputs
from dpokit.training import metrics as M
from dpokit.training.hooks import Hook
from dpokit.training.optim import build_optimizer, build_scheduler, total_steps
from dpokit.training.signals import StopSignals

# The objectives on this loop by `Objective.name`: `dpokit train` trains "dpo", `dpokit sft` "sft",
# `dpokit reward` "reward", `dpokit kto` "kto" (the CLI and `dpokit compare` pick them here).
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (DPOObjective, SFTObjective, RewardObjective, KTOObjective)
}


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    stopped_by: int = 0  # the signal that stopped the run early (0: it ran to the end)
    checkpoint: str = ""  # the checkpoint written when it stopped early
    already_complete: bool = False  # train.resume=auto found the run finished: nothing was trained


def accumulate_gradients(
    acc: Any,
    policy: Any,
    objective: Objective,
    micro_batches: list[dict[str, Tensor]],
    running: MetricAccumulator,
) -> None:
    """Forward + backward over the micro-batches of one optimizer step.

    Each micro-batch's mean loss is divided by the number of micro-batches, so the summed
    gradient equals the gradient of the mean loss over all examples of the step (equal-size
    micro-batches): micro_batch 4 x accum 1 == micro_batch 1 x accum 4.
    """
    n = len(micro_batches)
    # DeepSpeed's engine divides by its gradient_accumulation_steps (= n) itself, and steps (clip,
    # update, zero) inside the backward of the micro-batch Accelerate marks as the last one.
    deepspeed = strategy(acc) == "deepspeed"
    for i, batch_cpu in enumerate(micro_batches):
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch_cpu.items()}
        sync = i == n - 1  # all-reduce gradients across processes only on the last micro-batch
        with acc.no_sync(policy) if not sync else contextlib.nullcontext(), acc.autocast():
            loss, values = objective.batch_values(policy, batch, "train")
        acc.sync_gradients = sync
        acc.backward(loss if deepspeed else loss / n)
        running.add(values)
    acc.sync_gradients = True


# ---- setup ------------------------------------------------------------------------------
@dataclass
class Setup:
    accelerator: Any
    dist: Dist
    policy: Any
    tokenizer: Any
    train_examples: list[Any]
    eval_examples: list[Any]
    collator: Any
    lm_head_chunk: int
    summaries: dict[str, Any] = field(default_factory=dict)  # split -> the objective's data summary (model card)
    plan: memory.MemoryPlan | None = None  # the memory plan the run was set up with


def setup(cfg: Config, out: Path, objective: Objective) -> Setup:
    """Accelerator, model, data and the objective's own pieces (a reference), in the order that keeps
    memory lowest."""
    t = cfg.train
    accelerator = make_accelerator(t.mixed_precision, t.micro_batch_size, t.grad_accum_steps, t.max_grad_norm)
    dist = Dist.from_accelerator(accelerator)
    if dist.strategy != "single":
        dist.print(f"{dist.world} processes, {dist.strategy}")
    set_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    with dist.loading():
        policy, tokenizer = objective.load_model(dtype)
    skipped = out / "skipped.jsonl" if dist.is_main else None  # data.on_bad_row=skip lists them
    train_files, eval_files = data_files(cfg.data, cfg.train.seed)  # Hub splits, eval_fraction, train_weights
    train_examples, summary = objective.load_examples(train_files, tokenizer, skipped)
    dist.print(summary.render())
    eval_examples: list[Any] = []
    summaries = {"train": summary}  # for the model card
    if eval_files:  # data.eval_files, or the slice data.eval_fraction holds out of the training rows
        skipped_eval = out / "skipped_eval.jsonl" if dist.is_main else None
        eval_examples, summaries["eval"] = objective.load_examples(eval_files, tokenizer, skipped_eval)
        dist.print(summaries["eval"].render())
    if not train_examples:
        raise DpokitError(f"no training {objective.unit} left after validation and truncation (see the summary above)")
    lm_head_chunk = LM_HEAD_CHUNK  # under DDP / FSDP it runs through the wrapper (models.forward.final_hidden)
    if dist.zero_stage == 3:  # ZeRO-3 gathers the head's weight inside its forward only, then frees it
        lm_head_chunk = 0
        dist.print("chunked LM head off under DeepSpeed ZeRO-3 (its weight exists only inside the forward); "
                   "full logits instead")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = objective.build_collator(pad_id, policy, accelerator.device)
    dist.print(f"batches: {collator.describe()}")
    plan = _plan_memory(cfg, objective, policy, dtype, dist, collator, train_examples, lm_head_chunk)
    apply_checkpointing(policy, plan.checkpoint_every)  # before the reference copy, which turns it off again
    splits = {"train": train_examples, "eval": eval_examples}
    objective.prepare(ObjectiveSetup(policy, tokenizer, dtype, dist, collator, lm_head_chunk, splits))
    return Setup(accelerator, dist, policy, tokenizer, train_examples, eval_examples, collator, lm_head_chunk,
                 summaries, plan)


def _plan_memory(cfg: Config, objective: Objective, policy: Any, dtype: torch.dtype, dist: Dist, collator: Any,
                 examples: list[Any], lm_head_chunk: int) -> memory.MemoryPlan:  # fmt: skip
    """The memory plan of this run on this process; it resolves train.gradient_checkpointing=auto
    against train.memory_budget, and a run that cannot fit stops here, before its first step."""
    inputs = memory.RunInputs(cfg, base_config(policy), dtype, dist.device, objective.name,
                              objective.memory_reference(), examples, objective.example_length, collator,
                              lm_head_chunk, dist.memory_strategy, dist.world)  # fmt: skip
    budget = memory.resolve_budget(cfg.train.memory_budget, dist.device, dist.local_world)
    plan = memory.plan_run(inputs, budget)
    if not plan.fits:
        raise memory.refusal(plan, cfg, objective.unit)
    dist.print(plan.summary())
    return plan


# ---- the loop ---------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop carries from one step to the next. A checkpoint stores it (with the data
    position), so a resumed run logs the same rows and stops on the same bad-step streak."""

    step: int = 0
    running: MetricAccumulator = field(default_factory=MetricAccumulator)  # examples since the last row
    last: dict[str, float] = field(default_factory=dict)  # the last training row
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    bad_streak: int = 0  # ... in a row, up to now
    history: list[dict[str, float]] = field(default_factory=list)  # recent rows, for the objective's warnings
    warned_displacement: bool = False  # the objective's warning was given (once per run)
    rows: int = 0  # rows written to metrics.jsonl, so a resume can drop the ones logged after the checkpoint

    def to_dict(self, consumed: int) -> dict[str, Any]:
        running = {k: None if v is None else v.cpu() for k, v in self.running.state_dict().items()}
        return {"step": self.step, "consumed": consumed, "running": running, "last": self.last,
                "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak, "history": self.history,
                "warned_displacement": self.warned_displacement, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: Any) -> LoopState:
        state = cls(d["step"], MetricAccumulator(), d["last"], d["skipped_steps"], d["bad_streak"], d["history"],
                    d["warned_displacement"], d["rows"])
        state.running.load_state_dict(d["running"], device)
        return state


@dataclass
class _Run:
    """The objects of one run that the loop's helpers share."""

    cfg: Config
    out: Path
    s: Setup
    objective: Objective
    policy: Any
    optimizer: Any
    scheduler: Any
    stream: ExampleStream
    steps: int
    hooks: Sequence[Hook] = ()
    logger: Any = None  # M.MetricsLogger, opened once the resume point is known
    bar: Any = None
    bar_on: bool = False  # a live progress bar (a terminal); else one console line per log step


def train(
    cfg: Config,
    objective: Objective | None = None,
    hooks: Sequence[Hook] = (),
    train_data: Iterable[Any] | None = None,
    eval_data: Iterable[Any] | None = None,
) -> TrainResult:
    """Train `cfg.model` with `objective` (default: DPO, `loss.type`) on `cfg.data.train_files`;
    write everything to train.output_dir. `hooks` observe the loop (`dpokit.training.hooks`).

    `train_data` / `eval_data`: rows in memory (a list of dicts or a `datasets.Dataset`) instead of
    data.train_files / data.eval_files; they are written into the run folder as `train_data.jsonl` /
    `eval_data.jsonl` and read like files (same checks, errors naming the row, resumable).
    """
    cfg.validate()
    objective = objective or DPOObjective(cfg)
    objective.validate()
    done = outputs.read_completion(Path(cfg.train.output_dir))
    if done is not None and ckpt.resume_mode(cfg.train.resume) == "auto":  # finished: never train it again
        print(outputs.finished_message(Path(cfg.train.output_dir), done), flush=True)
        return TrainResult(cfg.train.output_dir, done.steps, written=done.written, already_complete=True)
    if train_data is None and eval_data is None:
        objective.preflight(*data_files(cfg.data, cfg.train.seed))  # bad data fails before the model loads
    claim = outputs.prepare(cfg)  # the folder's lock is held from here to the end of the run
    with claim.starting():  # no empty run folder after a failed start
        cfg = _rows_in_memory(cfg, claim.out, objective, train_data, eval_data)
        run, state = _start(cfg, claim.out, objective, hooks)
    with claim.running():
        return _train_steps_and_finish(run, state)


def _train_steps_and_finish(run: _Run, state: LoopState) -> TrainResult:
    with StopSignals() as signals:
        try:
            stopped = _run_steps(run, state, signals)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _is_out_of_memory(exc):
                raise
            run.optimizer.zero_grad(set_to_none=True)  # room for the message; the step is lost anyway
            raise DpokitError(_out_of_memory_message(run, state, exc)) from None
        if stopped is not None:
            return stopped
        return _finish(run, state)


def _rows_in_memory(
    cfg: Config, out: Path, objective: Objective, train_data: Iterable[Any] | None, eval_data: Iterable[Any] | None
) -> Config:
    """The config with data.train_files / eval_files pointing at in-memory rows written into the run
    folder, checked like files before the model loads. (Under several processes each writes the same
    bytes and renames them into place atomically, so no process reads a half-written file.)"""
    if train_data is None and eval_data is None:
        return cfg
    changes = []
    for name, rows, key in (("train_data", train_data, "train_files"), ("eval_data", eval_data, "eval_files")):
        if rows is not None:
            path = out / f"{name}.jsonl"
            with writing(f"the in-memory {name} rows", path):
                write_rows(rows, path, name)
            changes.append(f"data.{key}=[{path}]")
    cfg = cfg.override(changes)
    objective.cfg = cfg
    objective.preflight(*data_files(cfg.data, cfg.train.seed))
    return cfg


def _start(cfg: Config, out: Path, objective: Objective, hooks: Sequence[Hook]) -> tuple[_Run, LoopState]:
    """Everything before the first step: set-up, optimizer, wrapping, data order, resume, logger."""
    s = setup(cfg, out, objective)
    acc, t = s.accelerator, cfg.train
    steps = total_steps(cfg, len(s.train_examples), s.dist.world)
    optimizer = build_optimizer(cfg, s.policy)
    scheduler = build_scheduler(cfg, optimizer, steps)
    # Signals and non-finite streaks write a checkpoint even with save_every=0: fail now, not then.
    ckpt.check_disk_space(out, ckpt.estimate_bytes(s.policy, t.optimizer))
    policy, optimizer = acc.prepare(s.policy, optimizer)
    objective.attach(acc.unwrap_model(policy))
    lengths = [objective.example_length(e) for e in s.train_examples]
    stream = ExampleStream(s.train_examples, lengths, t.micro_batch_size, t.seed, s.dist.world, s.dist.rank,
                           group_by_length=cfg.data.group_by_length, grad_accum_steps=t.grad_accum_steps,
                           unit=objective.unit)  # fmt: skip
    run = _Run(cfg, out, s, objective, policy, optimizer, scheduler, stream, steps, hooks)
    state = _resume(run)  # a fresh LoopState unless train.resume finds a checkpoint
    if s.dist.is_main:
        with writing("the run's config", out / "config.yaml"):
            cfg.save(out / "config.yaml")
    run.logger = M.MetricsLogger(out, t.report_to, enabled=s.dist.is_main, append=state.step > 0,
                                 config=cfg.to_dict())  # fmt: skip
    # A bar on a terminal; in a log file (no TTY) one plain line per log step instead of \r frames.
    run.bar_on = t.progress_bar and s.dist.is_main and sys.stderr.isatty()
    run.bar = M.progress_bar(steps, enabled=run.bar_on, initial=state.step, desc=objective.name)
    for hook in hooks:
        hook.on_setup({"batches": s.collator.describe(), "attention": attn_implementation_of(policy),
                       "gradient_checkpointing": memory.describe_checkpointing(s.plan.checkpoint_every if s.plan else 0),
                       "checkpoint_every": str(s.plan.checkpoint_every if s.plan else 0),
                       "memory_plan_bytes": str(s.plan.total if s.plan else 0)})
    return run, state


def _run_steps(run: _Run, state: LoopState, signals: StopSignals) -> TrainResult | None:
    """Optimizer steps from the resume point to the end; a TrainResult when a signal stopped the run."""
    s, t, acc, objective = run.s, run.cfg.train, run.s.accelerator, run.objective
    examples = iter(run.stream)
    tokens, t0 = 0, time.perf_counter()
    run.policy.train()
    for step in range(state.step + 1, run.steps + 1):
        micro_batches = []
        for _ in range(t.grad_accum_steps):
            taken = next(examples)
            for hook in run.hooks:
                hook.on_micro_batch(step, taken)
            micro_batches.append(s.collator(taken))
        tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches)  # host tensors: no sync
        step_metrics = MetricAccumulator()
        objective.begin_step(micro_batches, s.dist)
        accumulate_gradients(acc, run.policy, objective, micro_batches, step_metrics)
        grad_norm = _clip(acc, run.policy, t.max_grad_norm)
        finite, stop = _check_finite(s.dist, objective, step_metrics, grad_norm, signals.requested)
        if finite:
            run.optimizer.step()
            faults.reach("step.optimizer")  # a kill here loses the step: the resume repeats it
            state.running.merge(step_metrics)
        _count_bad_step(run, state, finite, step)
        run.scheduler.step()  # on skipped steps too: the lr stays a function of the step number
        run.optimizer.zero_grad(set_to_none=True)
        state.step = step
        row = None
        if step % t.log_every == 0 or step == run.steps:
            elapsed = time.perf_counter() - t0
            row = _log_train_row(run, state, grad_norm if finite else None, tokens * s.dist.world / elapsed)
            tokens, t0 = 0, time.perf_counter()
        elif t.eval_every and step % t.eval_every == 0 and s.eval_examples:
            _log(run, state, step, evaluate_during_training(run))
        for hook in run.hooks:
            hook.on_step_end(step, row)
        run.bar.update(1)
        if state.bad_streak >= t.max_bad_steps:
            _stop_on_bad_steps(run, state)
        if stop:  # a signal (here or on another process): checkpoint, then leave cleanly
            return _stopped(run, state, signals.signum or signal.SIGTERM, _save_checkpoint(run, state))
        # The last step is always saved: a kill or a full disk during the final save then resumes here and
        # finishes the save instead of training again (with save_every=0 it is deleted once the run is complete).
        if step == run.steps or (t.save_every and step % t.save_every == 0):
            _save_checkpoint(run, state)
    return None


def _finish(run: _Run, state: LoopState) -> TrainResult:
    """The final evaluation and the final save."""
    s, steps = run.s, run.steps
    run.bar.close()
    eval_metrics: dict[str, float] = {}
    if s.eval_examples:
        eval_metrics = evaluate_during_training(run)
        _log(run, state, steps, eval_metrics)
        s.dist.print(M.format_line(steps, steps, {**state.last, **eval_metrics}, run.objective.console_keys))
    run.logger.close()
    # Writing the model serialises a copy of the weights; the optimizer state (2x the trainable
    # weights for AdamW) is no longer needed, so free it first: the save must not set the peak.
    run.optimizer.state.clear()
    written = _save(run)
    marked = _attempt(lambda: outputs.mark_complete(run.out, steps, written)) if s.dist.is_main else None
    failure = s.dist.first_failure(marked)  # last of all: only now does the folder hold a finished run
    if failure is not None:
        raise failure
    if s.dist.is_main and not run.cfg.train.save_every:  # the final step's checkpoint was only a safety net
        ckpt.remove_checkpoint(run.out / ckpt.CHECKPOINTS, steps)
    _push(run)
    return TrainResult(str(run.out), steps, state.last, eval_metrics, written)


def _epoch(step: int, cfg: Config, s: Setup) -> float:
    examples = step * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * s.dist.world
    return examples / len(s.train_examples)


def _clip(acc: Any, model: Any, max_norm: float) -> Tensor:
    """Clip to `max_norm` (0: no clipping) and return the total gradient norm, a plain tensor on
    every process. Accelerate computes it across processes (FSDP's shards, DDP's replicas); with
    max_norm=inf the clip factor is 1, so the norm is still logged and checked for NaN."""
    norm = acc.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    # DeepSpeed clips inside its step and reports the norm as a float
    return local_value(torch.as_tensor(norm if norm is not None else 0.0))


# ---- numerical faults ---------------------------------------------------------
def _check_finite(
    dist: Dist, objective: Objective, step_metrics: MetricAccumulator, grad_norm: Tensor, stop: bool
) -> tuple[bool, bool]:
    """(is this step's loss and gradient finite, should the run stop after this step).

    The loop's one host sync per step: whether to call optimizer.step() must be known on the
    host before calling it, and keeping a skipped update entirely on the device would mean
    undoing the optimizer's state. The gradient norm is the one clipping already computed (a
    NaN/inf anywhere in any gradient makes it non-finite); with several processes one
    max-reduce of the two flags makes every rank skip or stop together.
    """
    loss_sum = step_metrics.sums[objective.metric_keys.index("loss")]  # () on the device
    bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm.to(loss_sum.device)))
    flags = torch.stack([bad.float(), torch.tensor(float(stop), device=loss_sum.device)])
    flags = dist.reduce_sum(flags)
    any_bad, any_stop = flags.tolist()
    return any_bad == 0, any_stop > 0


def _count_bad_step(run: _Run, state: LoopState, finite: bool, step: int) -> None:
    if finite:
        state.bad_streak = 0
        return
    state.skipped_steps += 1
    state.bad_streak += 1
    run.s.dist.print(
        f"warning: step {step}: non-finite loss or gradient, update skipped "
        f"({state.bad_streak} in a row, {state.skipped_steps} in total; the run stops at {run.cfg.train.max_bad_steps} in a row)"
    )


def _stop_on_bad_steps(run: _Run, state: LoopState) -> None:
    path = _save_checkpoint(run, state)
    t, m = run.cfg.train, run.cfg.model
    first = state.step - state.bad_streak + 1
    raise DpokitError(
        f"steps {first}-{state.step}: {state.bad_streak} steps in a row had a non-finite loss or gradient and were "
        f"skipped (train.max_bad_steps={t.max_bad_steps}); stopped. The weights of the last good step are saved in "
        f"{path}. Usual causes: a learning rate too high for this model (train.lr is {t.lr}; try a tenth) or too "
        f"little precision (model.dtype is {m.dtype}, train.mixed_precision is {t.mixed_precision}; try "
        f"model.dtype=float32 train.mixed_precision=no). Continue with train.resume=auto after changing them"
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's failure (a RuntimeError)."""
    text = str(exc)
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text


def _out_of_memory_message(run: _Run, state: LoopState, exc: BaseException) -> str:
    """What ran out and where, what the run can continue from, and what to change. Nothing is saved:
    the step was half done; the last complete checkpoint stays as it is."""
    cfg, t = run.cfg, run.cfg.train
    saved = ckpt.list_checkpoints(run.out / ckpt.CHECKPOINTS)
    where = (f"The last checkpoint, {saved[-1][1]} (step {saved[-1][0]}), is kept: change one of the settings "
             "below and run again with train.resume=auto" if saved else
             "No checkpoint had been written (train.save_every)")  # fmt: skip
    fixes = []
    if t.micro_batch_size > 1:
        fixes.append(f"train.micro_batch_size={t.micro_batch_size // 2} train.grad_accum_steps={t.grad_accum_steps * 2} "
                     f"(the same {run.objective.unit} per step)")  # fmt: skip
    plan = run.s.plan
    if plan is None or plan.checkpoint_every != 1:
        fixes.append("train.gradient_checkpointing=true (recompute every layer's activations in the backward)")
    if not cfg.lora.enabled:
        fixes.append("lora.enabled=true (no gradients or optimizer state for the base weights)")
    if run.objective.name == "dpo" and not cfg.reference.precompute:
        fixes.append("reference.precompute=true (no reference model while training)")
    fixes.append(f"data.max_length={cfg.data.max_length // 2} (now {cfg.data.max_length})")
    reason = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
    planned = (f" The memory plan estimated {memory.gib(plan.total)} per process against a budget of "
               f"{memory.gib(plan.budget or 0)}: {_plan_line(plan)}." if plan is not None else "")  # fmt: skip
    return (f"out of memory in step {state.step + 1} on {run.s.dist.device} ({reason}); stopped.{planned} {where}. "
            "To use less memory: " + "; or ".join(fixes) + (". Lower train.memory_budget to make the plan choose "
            "more checkpointing (and to see what it predicts: dpokit plan CONFIG)" if plan is not None else ""))


def _plan_line(plan: memory.MemoryPlan) -> str:
    return ", ".join(f"{i.name} {memory.gib(i.bytes)}" for i in plan.items if i.bytes)


def _stopped(run: _Run, state: LoopState, signum: int, saved: Path) -> TrainResult:
    run.bar.close()
    run.logger.close()
    name = signal.Signals(signum).name
    run.s.dist.print(
        f"{name}: stopped after step {state.step}/{run.steps}; checkpoint {saved}. "
        "Run the same command with train.resume=auto to continue"
    )
    return TrainResult(str(run.out), state.step, state.last, stopped_by=signum, checkpoint=str(saved))


# ---- logging --------------------------------------------------------------------------
def _log(run: _Run, state: LoopState, step: int, row: dict[str, Any]) -> None:
    """Write one metrics row (training, eval or warnings) and let the objective read the trend."""
    run.logger.log(step, row)
    state.rows += 1
    _check_warnings(run, state, row)


def _log_train_row(run: _Run, state: LoopState, grad_norm: Tensor | None, tokens_per_sec: float) -> dict[str, Any]:
    """Average the examples since the last row (skipped steps excluded), log them and return the row."""
    s, t, step, objective = run.s, run.cfg.train, state.step, run.objective
    # {} when every step since the last row was skipped
    row: dict[str, Any] = state.running.compute(objective.metric_keys, s.dist.reduce_sum)
    state.running.reset()
    if grad_norm is not None:  # a skipped step's norm is NaN/inf: leave it out of the JSON
        row["grad_norm"] = float(grad_norm)
    row.update(lr=run.scheduler.get_last_lr()[0], tokens_per_sec=tokens_per_sec,
               epoch=_epoch(step, run.cfg, s), skipped_steps=state.skipped_steps)
    if t.eval_every and step % t.eval_every == 0 and s.eval_examples and step != run.steps:
        row.update(evaluate_during_training(run))
    state.last = row
    _log(run, state, step, row)
    if "loss" in row:
        shown = objective.console_keys[:2]
        run.bar.set_postfix_str(" ".join(f"{short} {row[k]:{fmt}}" for k, short, fmt in shown if k in row))
    if not run.bar_on:
        s.dist.print(M.format_line(step, run.steps, row, objective.console_keys))
    return row


def _check_warnings(run: _Run, state: LoopState, row: dict[str, Any]) -> None:
    """The objective's warning about the recent logged rows (training and eval): once per run, to
    the console and a `warnings` row of metrics.jsonl."""
    keys = {k for k in run.objective.metric_keys} | {f"eval/{k}" for k in run.objective.metric_keys}
    kept = {k: v for k, v in row.items() if k in keys}
    if not kept:
        return
    state.history = [*state.history, {"step": state.step, **kept}][-_HISTORY:]
    message = run.objective.check_rows(state.history)
    if message and not state.warned_displacement:
        state.warned_displacement = True
        run.s.dist.print(f"warning: {message}")
        _log(run, state, state.step, {"warnings": [message]})


_HISTORY = 16  # training rows kept for the objective's warnings (it looks at the last few)


# ---- checkpoints ------------------------------------------------------------------------
def _save_checkpoint(run: _Run, state: LoopState) -> Path:
    """Write a checkpoint of the state after `state.step` (every process takes part: each writes its
    RNG state and, with several processes, its shards of the weights and optimizer state).

    Each phase ends with `first_failure`, a collective in place of a barrier: a write that fails on
    any process stops every process with that failure (none waits for it), and the staging folder
    is removed, so the last complete checkpoint stays the newest."""
    dist, root, sharded = run.s.dist, run.out / ckpt.CHECKPOINTS, run.s.dist.world > 1
    tmp = ckpt.staging_dir(root, state.step)
    failure = dist.first_failure(_attempt(lambda: ckpt.begin(root, state.step)) if dist.is_main else None)
    if failure is None:
        failure = dist.first_failure(_attempt(lambda: ckpt.write_rng(tmp, dist.rank)))
    if failure is None and sharded:  # DCP raises a failed write of any process on every process
        failure = dist.first_failure(_attempt(lambda: ckpt.write_sharded(tmp, run.policy, run.optimizer)))
    if failure is None:
        failure = dist.first_failure(_attempt(lambda: _publish_checkpoint(run, state, tmp)) if dist.is_main else None)
    if failure is not None:
        if dist.is_main:
            ckpt.discard(tmp)
        raise failure.elaborate(what=f"the checkpoint of step {state.step}")
    return root / ckpt.folder_name(state.step)


def _publish_checkpoint(run: _Run, state: LoopState, tmp: Path) -> None:
    """The main process's files of the checkpoint (all of them with one process), then the rename."""
    sharded = run.s.dist.world > 1  # the weights and optimizer state are in tmp/sharded already
    model = None if sharded else run.s.accelerator.unwrap_model(run.policy)
    ckpt.write_and_publish(tmp, state.step, model, run.optimizer, run.scheduler, state.to_dict(run.stream.consumed),
                           run.cfg.to_yaml(commented=False), run.s.dist.world, run.cfg.train.keep_checkpoints)


def _attempt(write: Callable[[], Any]) -> WriteError | None:
    """Run one writing phase; its WriteError is returned (for `Dist.first_failure`), not raised."""
    try:
        write()
    except WriteError as exc:
        return exc
    return None


def _resume(run: _Run) -> LoopState:
    """Load the checkpoint train.resume names into the model, optimizer, scheduler, data stream
    and RNGs; return the loop state to continue from (fresh when there is nothing to resume)."""
    acc, t = run.s.accelerator, run.cfg.train
    mode = ckpt.resume_mode(t.resume)
    if mode == "no":
        return LoopState()
    root = run.out / ckpt.CHECKPOINTS
    if mode == "auto":
        found = ckpt.load_newest(root, acc.process_index, warn=run.s.dist.print)
        if found is None:
            run.s.dist.print(f"train.resume=auto: no checkpoint in {root}; starting at step 0")
            return LoopState()
    else:
        found = ckpt.load_checkpoint(Path(str(t.resume)), acc.process_index)
    ckpt.check_world_size(found, run.s.dist.world)
    if found.sharded:
        ckpt.load_sharded(found.path, run.policy, run.optimizer)
    else:
        ckpt.apply_weights(acc.unwrap_model(run.policy), found.weights or {}, found.path)
        run.optimizer.load_state_dict(found.optimizer)
    run.scheduler.load_state_dict(found.scheduler)
    _adopt_changed_settings(run, found.config_yaml)
    state = LoopState.from_dict(found.state, acc.device)
    run.stream.consumed = found.state["consumed"]
    if found.rng is not None:
        ckpt.set_rng_state(found.rng)  # last: nothing between here and the first step draws numbers
    if acc.is_main_process:
        M.truncate_metrics(run.out / "metrics.jsonl", state.rows)
    if found.step >= run.steps:  # killed in the final evaluation or save: finish those, train nothing
        run.s.dist.print(f"resumed from {found.path}: training had finished (step {found.step} of {run.steps}) but "
                         "the final save had not; finishing it without training again")  # fmt: skip
    else:
        run.s.dist.print(f"resumed from {found.path} (step {found.step} of {run.steps})")
    return state


# Keys that only steer bookkeeping: changing them between a run and its resumption is expected.
_BOOKKEEPING = {"train." + k for k in ("resume", "overwrite", "output_dir", "save_every", "keep_checkpoints",
                                       "progress_bar", "report_to", "max_bad_steps", "log_every", "eval_every")}


def _adopt_changed_settings(run: _Run, config_yaml: str) -> None:
    """Warn about settings that differ from the checkpoint's run; apply a new train.lr.

    The restored optimizer and scheduler carry the old peak lr, and a lower lr is the usual
    fix after a non-finite stop, so a changed train.lr replaces it from the current step on.
    """
    old = yaml.safe_load(config_yaml) or {}
    new = run.cfg.to_dict()
    changed = [f"{sec}.{k}" for sec, keys in new.items() for k, v in keys.items()
               if f"{sec}.{k}" not in _BOOKKEEPING and (old.get(sec) or {}).get(k, v) != v]
    if changed:
        run.s.dist.print(f"warning: resuming with changed settings {', '.join(changed)}: "
                                "the result will differ from an uninterrupted run")
    if "train.lr" in changed:
        sched, lr = run.scheduler, run.cfg.train.lr
        sched.base_lrs = [lr] * len(sched.base_lrs)
        for group, factor in zip(run.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)


def evaluate_during_training(run: _Run) -> dict[str, float]:
    """The objective's metrics over the eval examples, as `eval/...` keys."""
    s = run.s
    res = evaluate_examples(run.objective, run.policy, s.eval_examples, s.collator, run.cfg.train.eval_batch_size, s.dist)
    return {f"eval/{k}": v for k, v in res.items()}


def _save(run: _Run) -> dict[str, str]:
    """The final folders, each with its model card (README.md), written by the main process into a
    staging folder and renamed into place file by file (`outputs.write_final`)."""
    dist = run.s.dist
    dist.barrier()
    model = dist.full_model(run.policy)  # FSDP / ZeRO-3: the shards gathered (every process calls it)
    written: dict[str, str] = {}

    def write(stage: Path) -> dict[str, str]:
        staged = run.objective.save(model, run.s.tokenizer, stage)
        # the metrics as logged (the logger is closed): the last training row and the final eval row
        train_metrics, eval_metrics = cards.final_metrics(run.out / "metrics.jsonl")
        facts = cards.run_facts(run.cfg, run.steps, train_metrics, eval_metrics, run.s.summaries, run.objective.name)
        cards.write_cards(staged, facts)
        summary = {"written": outputs.final_paths(staged, stage, run.out)}
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        return staged

    def save() -> None:
        written.update(outputs.write_final(run.out, write))

    failure = dist.first_failure(_attempt(save) if dist.is_main else None)
    if failure is not None:
        raise failure.elaborate(what="the final model")
    dist.barrier()
    return written


def _push(run: _Run) -> None:
    """With train.push_to_hub, the finished run folder goes to the Hub (main process only). A failed
    push does not fail the run: it is saved and complete, and the warning says how to push it."""
    t = run.cfg.train
    if run.s.dist.is_main and t.push_to_hub and t.hub_model_id:
        try:
            run.s.dist.print(f"pushed {run.out} to the Hub: {cards.push_to_hub(run.out, t.hub_model_id)}")
        except DpokitError as exc:
            print(f"warning: {exc}", file=sys.stderr)
