"""The DPO training loop: a thin, readable loop over Accelerate.

Order of one optimizer step (nanoGPT style): for each of `grad_accum_steps` micro-batches,
concatenated forward of the policy -> reference log-probs -> loss -> backward (scaled by
1/grad_accum_steps); then clip -> optimizer step -> scheduler step -> log / eval / save.
Setup, data order, evaluation and saving are named helpers below, not inline blocks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dpokit import checkpoint as ckpt
from dpokit import metrics as M
from dpokit.collate import PreferenceCollator, TokenizedPair
from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.losses import LossParams, compute_loss


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    stopped_by: int = 0  # the signal that stopped the run early (0: it ran to the end)
    checkpoint: str = ""  # the checkpoint written when it stopped early


def loss_params(cfg: Config) -> LossParams:
    lo = cfg.loss
    return LossParams(
        beta=lo.beta,
        label_smoothing=lo.label_smoothing,
        ipo_length_normalize=lo.ipo_length_normalize,
        simpo_gamma=lo.simpo_gamma,
    )


def batch_loss(policy: Any, reference: Any, batch: dict[str, Tensor], cfg: Config, lm_head_chunk: int) -> tuple[Tensor, Tensor]:
    """Mean loss of one micro-batch and its per-pair metric values (K, B)."""
    from dpokit.modeling import concatenated_logps

    pol = concatenated_logps(policy, batch, lm_head_chunk)
    ref_chosen_logps, ref_rejected_logps = reference.logps(batch)
    out = compute_loss(
        cfg.loss.type,
        pol.chosen_logps,
        pol.rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        pol.chosen_lengths,
        pol.rejected_lengths,
        loss_params(cfg),
        nll_weight=cfg.loss.nll_weight,
    )
    return out.losses.mean(), M.pair_values(out, pol.chosen_logps, pol.rejected_logps)


def accumulate_gradients(
    acc: Any,
    policy: Any,
    reference: Any,
    micro_batches: list[dict[str, Tensor]],
    cfg: Config,
    lm_head_chunk: int,
    running: M.MetricAccumulator,
) -> None:
    """Forward + backward over the micro-batches of one optimizer step.

    Each micro-batch's mean loss is divided by the number of micro-batches, so the summed
    gradient equals the gradient of the mean loss over all pairs of the step (equal-size
    micro-batches): micro_batch 4 x accum 1 == micro_batch 1 x accum 4.
    """
    n = len(micro_batches)
    for i, batch_cpu in enumerate(micro_batches):
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch_cpu.items()}
        sync = i == n - 1  # all-reduce gradients across processes only on the last micro-batch
        with acc.no_sync(policy) if not sync else contextlib.nullcontext(), acc.autocast():
            loss, values = batch_loss(policy, reference, batch, cfg, lm_head_chunk)
        acc.backward(loss / n)
        running.add(values)


# ---- data order ---------------------------------------------------------------------------
class PairStream:
    """An endless, seeded stream of micro-batches over `pairs`, epoch after epoch.

    Each micro-batch takes the next `micro_batch_size * world_size` indices of the current
    epoch's order and keeps this rank's slice, so every rank sees distinct pairs and the
    position is one integer (`consumed`), which makes resuming exact.

    The epoch's order is a pure function of (seed, epoch): a permutation, and with
    `group_by_length` that permutation regrouped (`_group_by_length`) so that the pairs of one
    optimizer step have similar lengths. The grouping unit is the optimizer step's pairs
    (micro_batch x grad_accum x world), not the micro-batch, so micro_batch 4 x accum 1 and
    micro_batch 1 x accum 4 still see the same pairs in the same steps.
    """

    GROUP_STEPS = 64  # steps sorted together: larger = less padding, smaller = more randomness

    def __init__(
        self,
        pairs: list[TokenizedPair],
        micro_batch_size: int,
        seed: int,
        world: int = 1,
        rank: int = 0,
        group_by_length: bool = False,
        grad_accum_steps: int = 1,
    ):
        if len(pairs) < micro_batch_size * world:
            raise DpokitError(
                f"only {len(pairs)} training pairs, fewer than one global micro-batch "
                f"({micro_batch_size} x {world} processes); lower train.micro_batch_size"
            )
        self.pairs, self.mbs, self.seed, self.world, self.rank = pairs, micro_batch_size, seed, world, rank
        self.group_by_length, self.accum = group_by_length, grad_accum_steps
        self.consumed = 0  # global micro-batches taken so far
        # padded length of a pair's rows: the collator pads chosen and rejected to the longer one
        self.lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
        self._cached: tuple[int, list[int]] | None = None  # (epoch, order): not rebuilt per micro-batch

    def _order(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.pairs), generator=g).tolist()
        if self.group_by_length:
            order = self._group_by_length(order, g)
        self._cached = (epoch, order)
        return order

    def _group_by_length(self, order: list[int], g: torch.Generator) -> list[int]:
        """Cut the shuffled `order` into units of one optimizer step's pairs, sort by length
        within chunks of GROUP_STEPS units, and shuffle the units' order.

        Sorting only inside chunks keeps which pairs meet in a step random across epochs; the
        stable sort breaks ties by the random permutation. Leftover pairs (fewer than one unit)
        stay at the end in random order, so the epoch length in micro-batches is unchanged.
        """
        unit = self.mbs * self.world * self.accum
        n_units = len(order) // unit
        units: list[list[int]] = []
        chunk = unit * self.GROUP_STEPS
        for start in range(0, n_units * unit, chunk):
            part = sorted(order[start : min(start + chunk, n_units * unit)], key=self.lengths.__getitem__)
            units.extend(part[i : i + unit] for i in range(0, len(part), unit))
        shuffled = torch.randperm(len(units), generator=g).tolist()
        return [i for u in shuffled for i in units[u]] + order[n_units * unit :]

    def __iter__(self) -> Iterator[list[TokenizedPair]]:
        per_global = self.mbs * self.world
        per_epoch = len(self.pairs) // per_global  # the ragged tail of an epoch is skipped
        while True:
            epoch, pos = divmod(self.consumed, per_epoch)
            order = self._order(epoch)
            start = pos * per_global + self.rank * self.mbs
            self.consumed += 1
            yield [self.pairs[i] for i in order[start : start + self.mbs]]

    def epoch_progress(self) -> float:
        return self.consumed * self.mbs * self.world / len(self.pairs)


def total_steps(cfg: Config, n_pairs: int, world: int) -> int:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    pairs_per_step = t.micro_batch_size * t.grad_accum_steps * world
    return max(1, math.ceil(t.epochs * n_pairs / pairs_per_step))


# ---- optimisation -----------------------------------------------------------------------
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


# ---- setup ------------------------------------------------------------------------------
def prepare_output_dir(cfg: Config) -> Path:
    """Create output_dir, refuse to clobber another run unless train.overwrite, check it is writable."""
    out = Path(cfg.train.output_dir)
    resuming = ckpt.resume_mode(cfg.train.resume) != "no"  # continuing a run in its own folder
    if (out / "config.yaml").exists() and not cfg.train.overwrite and not resuming:
        raise DpokitError(
            f"train.output_dir {out} already holds a run (config.yaml); continue it with train.resume=auto, "
            "choose another folder, or pass train.overwrite=true"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dpokit_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DpokitError(f"train.output_dir {out} is not writable: {exc.strerror or exc}") from None
    return out


@dataclass
class Setup:
    accelerator: Any
    policy: Any
    tokenizer: Any
    reference: Any
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    collator: PreferenceCollator
    lm_head_chunk: int
    eval_reference: Any = None  # reference for eval_pairs; a separate table when precomputed



def _accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """An Accelerator for this run, also when an earlier run in this process used another precision.

    Accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator with
    a different `mixed_precision` (a notebook that trains twice, or the test suite). The process
    group (PartialState) is kept; only the per-run settings are dropped.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def setup(cfg: Config, out: Path) -> Setup:
    """Accelerator, models, data and reference, in the order that keeps memory lowest."""
    from accelerate.utils import set_seed

    from dpokit import data, modeling
    from dpokit.packing import build_collator

    accelerator = _accelerator(cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    dtype = modeling.resolve_dtype(cfg.model.dtype, accelerator.device)
    policy, tokenizer = modeling.load_policy(cfg, dtype)
    log = accelerator.print
    skipped = out / "skipped.jsonl" if accelerator.is_main_process else None  # data.on_bad_row=skip lists them
    train_pairs, summary = data.load_pairs(cfg.data.train_files, tokenizer, cfg.data, skipped_path=skipped)
    log(summary.render())
    eval_pairs: list[TokenizedPair] = []
    if cfg.data.eval_files:
        skipped_eval = out / "skipped_eval.jsonl" if accelerator.is_main_process else None
        eval_pairs, eval_summary = data.load_pairs(
            cfg.data.eval_files, tokenizer, cfg.data, skipped_path=skipped_eval
        )
        log(eval_summary.render())
    if not train_pairs:
        raise DpokitError("no training pairs left after validation and truncation (see the summary above)")
    # The decoder-direct chunked head bypasses the wrapper's forward, which DDP/FSDP need.
    lm_head_chunk = modeling.LM_HEAD_CHUNK if accelerator.num_processes == 1 else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # padded [chosen; rejected] rows by default; packed / prefix-shared rows with data.packing / data.prefix_sharing
    collator = build_collator(cfg.data, pad_id, policy, accelerator.device)  # the policy sizes packed rows
    log(f"batches: {collator.describe()}")
    reference, eval_reference = _build_references(
        cfg, accelerator, policy, tokenizer, dtype, train_pairs, eval_pairs, collator, lm_head_chunk
    )
    return Setup(
        accelerator, policy, tokenizer, reference, train_pairs, eval_pairs, collator, lm_head_chunk, eval_reference
    )


def _build_references(
    cfg: Config,
    accelerator: Any,
    policy: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    train_pairs: list[TokenizedPair],
    eval_pairs: list[TokenizedPair],
    collator: PreferenceCollator,
    lm_head_chunk: int,
) -> tuple[Any, Any]:
    """(train reference, eval reference). Live: one object for both. Precomputed: one cached
    table per split, computed from the not-yet-trained policy (or loaded from the cache), so no
    reference model stays in memory."""
    from dpokit import modeling, refcache

    if cfg.reference.precompute and modeling.reference_mode(cfg) != "none":
        policy.to(accelerator.device)  # acc.prepare() would move it next anyway
        refs = refcache.precompute_references(
            cfg, policy, tokenizer, dtype, {"train": train_pairs, "eval": eval_pairs}, collator,
            accelerator.device, lm_head_chunk, autocast=accelerator.autocast,
            rank=accelerator.process_index, world=accelerator.num_processes,
            reduce=lambda t: accelerator.reduce(t, reduction="sum"),
            is_main=accelerator.is_main_process, log=accelerator.print,
        )
        return refs["train"], refs.get("eval")
    reference = modeling.build_reference(cfg, policy, dtype, lm_head_chunk)
    if reference.model is not None:
        reference.model.to(accelerator.device)
    return reference, reference


# ---- the loop ---------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the loop carries from one step to the next. A checkpoint stores it (with the data
    position), so a resumed run logs the same rows and stops on the same bad-step streak."""

    step: int = 0
    running: M.MetricAccumulator = field(default_factory=M.MetricAccumulator)  # pairs since the last row
    last: dict[str, float] = field(default_factory=dict)  # the last training row
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    bad_streak: int = 0  # ... in a row, up to now
    history: list[dict[str, float]] = field(default_factory=list)  # recent rows for the displacement check
    warned_displacement: bool = False
    rows: int = 0  # rows written to metrics.jsonl, so a resume can drop the ones logged after the checkpoint

    def to_dict(self, consumed: int) -> dict[str, Any]:
        running = {k: None if v is None else v.cpu() for k, v in self.running.state_dict().items()}
        return {"step": self.step, "consumed": consumed, "running": running, "last": self.last,
                "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak, "history": self.history,
                "warned_displacement": self.warned_displacement, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: Any) -> LoopState:
        state = cls(d["step"], M.MetricAccumulator(), d["last"], d["skipped_steps"], d["bad_streak"], d["history"],
                    d["warned_displacement"], d["rows"])
        state.running.load_state_dict(d["running"], device)
        return state


@dataclass
class _Run:
    """The objects of one run that the loop's helpers share."""

    cfg: Config
    out: Path
    s: Setup
    policy: Any
    optimizer: Any
    scheduler: Any
    pairs: PairStream
    steps: int
    logger: Any = None  # M.MetricsLogger, opened once the resume point is known
    bar: Any = None


def train(cfg: Config) -> TrainResult:
    """Train `cfg.model` with DPO on `cfg.data.train_files`; write everything to train.output_dir."""
    cfg.validate()
    out = prepare_output_dir(cfg)
    s = setup(cfg, out)
    acc, t = s.accelerator, cfg.train
    steps = total_steps(cfg, len(s.train_pairs), acc.num_processes)
    optimizer = build_optimizer(cfg, s.policy)
    scheduler = build_scheduler(cfg, optimizer, steps)
    # Signals and non-finite streaks write a checkpoint even with save_every=0: fail now, not then.
    ckpt.check_disk_space(out, ckpt.estimate_bytes(s.policy, t.optimizer))
    policy, optimizer = acc.prepare(s.policy, optimizer)
    if s.reference.mode == "adapter":  # adapters are toggled on the unwrapped module
        s.reference.policy = acc.unwrap_model(policy)
    pairs = PairStream(s.train_pairs, t.micro_batch_size, t.seed, acc.num_processes, acc.process_index,
                       group_by_length=cfg.data.group_by_length, grad_accum_steps=t.grad_accum_steps)
    run = _Run(cfg, out, s, policy, optimizer, scheduler, pairs, steps)
    state = _resume(run)  # a fresh LoopState unless train.resume finds a checkpoint
    if acc.is_main_process:
        cfg.save(out / "config.yaml")
    run.logger = M.MetricsLogger(out, t.report_to, enabled=acc.is_main_process, append=state.step > 0)
    run.bar = _progress_bar(steps, enabled=t.progress_bar and acc.is_main_process, initial=state.step)
    stream = iter(pairs)
    tokens, t0 = 0, time.perf_counter()
    policy.train()
    with StopSignals() as signals:
        for step in range(state.step + 1, steps + 1):
            micro_batches = [s.collator(next(stream)) for _ in range(t.grad_accum_steps)]
            tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches)  # host tensors: no sync
            step_metrics = M.MetricAccumulator()
            accumulate_gradients(acc, policy, s.reference, micro_batches, cfg, s.lm_head_chunk, step_metrics)
            grad_norm = _clip(acc, policy, t.max_grad_norm)
            finite, stop = _check_finite(acc, step_metrics, grad_norm, signals.requested)
            if finite:
                optimizer.step()
                state.running.merge(step_metrics)
            _count_bad_step(run, state, finite, step)
            scheduler.step()  # on skipped steps too: the lr stays a function of the step number
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            if step % t.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - t0
                _log_train_row(run, state, grad_norm if finite else None, tokens * acc.num_processes / elapsed)
                tokens, t0 = 0, time.perf_counter()
            elif t.eval_every and step % t.eval_every == 0 and s.eval_pairs:
                _log(run, state, step, evaluate_during_training(policy, s, cfg))
            run.bar.update(1)
            if state.bad_streak >= t.max_bad_steps:
                _stop_on_bad_steps(run, state)
            if stop:  # a signal (here or on another process): checkpoint, then leave cleanly
                return _stopped(run, state, signals.signum or signal.SIGTERM, _save_checkpoint(run, state))
            if t.save_every and step % t.save_every == 0:
                _save_checkpoint(run, state)
        run.bar.close()
        eval_metrics: dict[str, float] = {}
        if s.eval_pairs:
            eval_metrics = evaluate_during_training(policy, s, cfg)
            _log(run, state, steps, eval_metrics)
            acc.print(M.format_line(steps, steps, {**state.last, **eval_metrics}))
        run.logger.close()
        # Writing the model serialises a copy of the weights; the optimizer state (2x the trainable
        # weights for AdamW) is no longer needed, so free it first: the save must not set the peak.
        optimizer.state.clear()
        written = _save(acc, policy, s.tokenizer, cfg, out)
    return TrainResult(str(out), steps, state.last, eval_metrics, written)


def _epoch(step: int, cfg: Config, s: Setup, acc: Any) -> float:
    pairs = step * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * acc.num_processes
    return pairs / len(s.train_pairs)


def _clip(acc: Any, model: Any, max_norm: float) -> Tensor:
    if max_norm > 0:
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


# ---- numerical faults and signals ---------------------------------------------------------
def _check_finite(acc: Any, step_metrics: M.MetricAccumulator, grad_norm: Tensor, stop: bool) -> tuple[bool, bool]:
    """(is this step's loss and gradient finite, should the run stop after this step).

    The loop's one host sync per step: whether to call optimizer.step() must be known on the
    host before calling it, and keeping a skipped update entirely on the device would mean
    undoing the optimizer's state. The gradient norm is the one clipping already computed (a
    NaN/inf anywhere in any gradient makes it non-finite); with several processes one
    max-reduce of the two flags makes every rank skip or stop together.
    """
    loss_sum = step_metrics.sums[M.PAIR_KEYS.index("loss")]  # () on the device
    bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm.to(loss_sum.device)))
    flags = torch.stack([bad.float(), torch.tensor(float(stop), device=loss_sum.device)])
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    any_bad, any_stop = flags.tolist()
    return any_bad == 0, any_stop > 0


def _count_bad_step(run: _Run, state: LoopState, finite: bool, step: int) -> None:
    if finite:
        state.bad_streak = 0
        return
    state.skipped_steps += 1
    state.bad_streak += 1
    run.s.accelerator.print(
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


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step, with a checkpoint.

    A second SIGINT or SIGTERM aborts at once (KeyboardInterrupt). Handlers are only installed
    in the main thread (Python allows no other) and the previous ones come back on exit.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                         "(send it again to abort at once)\n")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stopped(run: _Run, state: LoopState, signum: int, saved: Path) -> TrainResult:
    run.bar.close()
    run.logger.close()
    name = signal.Signals(signum).name
    run.s.accelerator.print(
        f"{name}: stopped after step {state.step}/{run.steps}; checkpoint {saved}. "
        "Run the same command with train.resume=auto to continue"
    )
    return TrainResult(str(run.out), state.step, state.last, stopped_by=signum, checkpoint=str(saved))


# ---- logging --------------------------------------------------------------------------
def _log(run: _Run, state: LoopState, step: int, row: dict[str, Any]) -> None:
    run.logger.log(step, row)
    state.rows += 1


def _log_train_row(run: _Run, state: LoopState, grad_norm: Tensor | None, tokens_per_sec: float) -> None:
    """Average the pairs since the last row (skipped steps excluded) and log them."""
    acc, t, step = run.s.accelerator, run.cfg.train, state.step
    row: dict[str, Any] = state.running.compute(acc.reduce)  # {} when every step since the last row was skipped
    state.running.reset()
    if grad_norm is not None:  # a skipped step's norm is NaN/inf: leave it out of the JSON
        row["grad_norm"] = float(grad_norm)
    row.update(lr=run.scheduler.get_last_lr()[0], tokens_per_sec=tokens_per_sec,
               epoch=_epoch(step, run.cfg, run.s, acc), skipped_steps=state.skipped_steps)
    if t.eval_every and step % t.eval_every == 0 and run.s.eval_pairs and step != run.steps:
        row.update(evaluate_during_training(run.policy, run.s, run.cfg))
    state.last = row
    _log(run, state, step, row)
    if "loss" in row:
        run.bar.set_postfix_str(f"loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f}")
    if not t.progress_bar:
        acc.print(M.format_line(step, run.steps, row))
    _check_displacement(run, state, row)


def _check_displacement(run: _Run, state: LoopState, row: dict[str, Any]) -> None:
    """Warn once per run (console + a `warnings` row) about likelihood displacement."""
    if "logps/chosen" not in row:
        return
    state.history = [*state.history, {k: row[k] for k in ("logps/chosen", "rewards/margins")}][-_HISTORY:]
    message = M.likelihood_displacement(state.history)
    if message and not state.warned_displacement:
        state.warned_displacement = True
        run.s.accelerator.print(f"warning: {message}")
        _log(run, state, state.step, {"warnings": [message]})


_HISTORY = 16  # training rows kept for the displacement check (it looks at the last few)


# ---- checkpoints ------------------------------------------------------------------------
def _save_checkpoint(run: _Run, state: LoopState) -> Path:
    """Write a checkpoint of the state after `state.step` (every process takes part)."""
    acc, root = run.s.accelerator, run.out / ckpt.CHECKPOINTS
    tmp = ckpt.staging_dir(root, state.step)
    try:
        if acc.is_main_process:
            ckpt.begin(root, state.step)
        acc.wait_for_everyone()
        ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_and_publish(
                tmp, state.step, acc.unwrap_model(run.policy), run.optimizer, run.scheduler,
                state.to_dict(run.pairs.consumed), run.cfg.to_yaml(commented=False), acc.num_processes,
                run.cfg.train.keep_checkpoints,
            )
    except OSError as exc:
        raise DpokitError(f"could not write the checkpoint of step {state.step} in {root}: {exc}") from None
    acc.wait_for_everyone()
    return root / ckpt.folder_name(state.step)


def _resume(run: _Run) -> LoopState:
    """Load the checkpoint train.resume names into the model, optimizer, scheduler, data stream
    and RNGs; return the loop state to continue from (fresh when there is nothing to resume)."""
    acc, t = run.s.accelerator, run.cfg.train
    mode = ckpt.resume_mode(t.resume)
    if mode == "no":
        return LoopState()
    root = run.out / ckpt.CHECKPOINTS
    if mode == "auto":
        found = ckpt.load_newest(root, acc.process_index, warn=acc.print)
        if found is None:
            acc.print(f"train.resume=auto: no checkpoint in {root}; starting at step 0")
            return LoopState()
    else:
        found = ckpt.load_checkpoint(Path(str(t.resume)), acc.process_index)
    ckpt.apply_weights(acc.unwrap_model(run.policy), found.weights, found.path)
    run.optimizer.load_state_dict(found.optimizer)
    run.scheduler.load_state_dict(found.scheduler)
    _adopt_changed_settings(run, found.config_yaml)
    state = LoopState.from_dict(found.state, acc.device)
    run.pairs.consumed = found.state["consumed"]
    if found.rng is not None:
        ckpt.set_rng_state(found.rng)  # last: nothing between here and the first step draws numbers
    else:
        acc.print("warning: the checkpoint has no RNG state for this process (another number of processes?)")
    if acc.is_main_process:
        _truncate_metrics(run.out / "metrics.jsonl", state.rows)
    acc.print(f"resumed from {found.path} (step {found.step} of {run.steps})")
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
        run.s.accelerator.print(f"warning: resuming with changed settings {', '.join(changed)}: "
                                "the result will differ from an uninterrupted run")
    if "train.lr" in changed:
        sched, lr = run.scheduler, run.cfg.train.lr
        sched.base_lrs = [lr] * len(sched.base_lrs)
        for group, factor in zip(run.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)


def _truncate_metrics(path: Path, rows: int) -> None:
    """Keep the first `rows` rows of metrics.jsonl (those logged up to the checkpoint): the
    steps after it run again and log their rows again, so none is duplicated."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < rows:
        print(f"warning: {path} has {len(lines)} rows, the checkpoint expected {rows}; appending to it")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines[:rows]), encoding="utf-8")
    os.replace(tmp, path)


def evaluate_during_training(policy: Any, s: Setup, cfg: Config) -> dict[str, float]:
    from dpokit.evaluate import evaluate_pairs

    reference = s.eval_reference if s.eval_reference is not None else s.reference
    res = evaluate_pairs(policy, reference, s.eval_pairs, cfg, s.collator, s.accelerator, s.lm_head_chunk)
    policy.train()
    return {f"eval/{k}": v for k, v in res.items()}


def _save(acc: Any, policy: Any, tokenizer: Any, cfg: Config, out: Path) -> dict[str, str]:
    from dpokit.modeling import save_final

    acc.wait_for_everyone()
    written: dict[str, str] = {}
    if acc.is_main_process:
        written = save_final(acc.unwrap_model(policy), tokenizer, cfg, out)
        (out / "summary.json").write_text(json.dumps({"written": written}, indent=2))
    acc.wait_for_everyone()
    return written


def _progress_bar(total: int, enabled: bool, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="dpo")
