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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
    epoch's permutation and keeps this rank's slice, so every rank sees distinct pairs and the
    position is one integer (`consumed`), which makes resuming exact.
    """

    def __init__(self, pairs: list[TokenizedPair], micro_batch_size: int, seed: int, world: int = 1, rank: int = 0):
        if len(pairs) < micro_batch_size * world:
            raise DpokitError(
                f"only {len(pairs)} training pairs, fewer than one global micro-batch "
                f"({micro_batch_size} x {world} processes); lower train.micro_batch_size"
            )
        self.pairs, self.mbs, self.seed, self.world, self.rank = pairs, micro_batch_size, seed, world, rank
        self.consumed = 0  # global micro-batches taken so far

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

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
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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
    if (out / "config.yaml").exists() and not cfg.train.overwrite:
        raise DpokitError(
            f"train.output_dir {out} already holds a run (config.yaml); "
            "choose another folder or pass train.overwrite=true"
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


def setup(cfg: Config, out: Path) -> Setup:
    """Accelerator, models, data and reference, in the order that keeps memory lowest."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from dpokit import data, modeling

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    dtype = modeling.resolve_dtype(cfg.model.dtype, accelerator.device)
    policy, tokenizer = modeling.load_policy(cfg, dtype)
    log = accelerator.print
    train_pairs, summary = data.load_pairs(cfg.data.train_files, tokenizer, cfg.data)
    log(summary.render())
    eval_pairs: list[TokenizedPair] = []
    if cfg.data.eval_files:
        eval_pairs, eval_summary = data.load_pairs(cfg.data.eval_files, tokenizer, cfg.data)
        log(eval_summary.render())
    if not train_pairs:
        raise DpokitError("no training pairs left after validation and truncation (see the summary above)")
    # The decoder-direct chunked head bypasses the wrapper's forward, which DDP/FSDP need.
    lm_head_chunk = 1024 if accelerator.num_processes == 1 else 0
    reference = modeling.build_reference(cfg, policy, dtype, lm_head_chunk)
    if reference.model is not None:
        reference.model.to(accelerator.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = PreferenceCollator(pad_token_id=pad_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of or None)
    return Setup(accelerator, policy, tokenizer, reference, train_pairs, eval_pairs, collator, lm_head_chunk)


# ---- the loop ---------------------------------------------------------------------------
def train(cfg: Config) -> TrainResult:
    """Train `cfg.model` with DPO on `cfg.data.train_files`; write everything to train.output_dir."""
    cfg.validate()
    out = prepare_output_dir(cfg)
    s = setup(cfg, out)
    acc, t = s.accelerator, cfg.train
    steps = total_steps(cfg, len(s.train_pairs), acc.num_processes)
    optimizer = build_optimizer(cfg, s.policy)
    scheduler = build_scheduler(cfg, optimizer, steps)
    policy, optimizer = acc.prepare(s.policy, optimizer)
    if s.reference.mode == "adapter":  # adapters are toggled on the unwrapped module
        s.reference.policy = acc.unwrap_model(policy)
    if acc.is_main_process:
        cfg.save(out / "config.yaml")
    logger = M.MetricsLogger(out, t.report_to, enabled=acc.is_main_process)
    stream = iter(PairStream(s.train_pairs, t.micro_batch_size, t.seed, acc.num_processes, acc.process_index))
    bar = _progress_bar(steps, enabled=t.progress_bar and acc.is_main_process)
    running, tokens, t0 = M.MetricAccumulator(), 0, time.perf_counter()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    policy.train()
    for step in range(1, steps + 1):
        micro_batches = [s.collator(next(stream)) for _ in range(t.grad_accum_steps)]
        tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches)  # host tensors: no sync
        accumulate_gradients(acc, policy, s.reference, micro_batches, cfg, s.lm_head_chunk, running)
        grad_norm = _clip(acc, policy, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % t.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            last = running.compute(acc.reduce)
            last.update(grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0],
                        tokens_per_sec=tokens * acc.num_processes / elapsed, epoch=_epoch(step, cfg, s, acc))
            _check_finite(last, step, cfg)
            running.reset()
            tokens, t0 = 0, time.perf_counter()
            if t.eval_every and step % t.eval_every == 0 and s.eval_pairs and step != steps:
                last.update(evaluate_during_training(policy, s, cfg))
            logger.log(step, last)
            bar.set_postfix_str(f"loss {last['loss']:.4f} acc {last['rewards/accuracies']:.2f}")
            if not t.progress_bar:
                acc.print(M.format_line(step, steps, last))
        elif t.eval_every and step % t.eval_every == 0 and s.eval_pairs:
            logger.log(step, evaluate_during_training(policy, s, cfg))
        bar.update(1)
    bar.close()
    if s.eval_pairs:
        eval_metrics = evaluate_during_training(policy, s, cfg)
        logger.log(steps, eval_metrics)
        acc.print(M.format_line(steps, steps, {**last, **eval_metrics}))
    logger.close()
    written = _save(acc, policy, s.tokenizer, cfg, out)
    return TrainResult(str(out), steps, last, eval_metrics, written)


def _epoch(step: int, cfg: Config, s: Setup, acc: Any) -> float:
    pairs = step * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * acc.num_processes
    return pairs / len(s.train_pairs)


def _clip(acc: Any, model: Any, max_norm: float) -> Tensor:
    if max_norm > 0:
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def _check_finite(metrics: dict[str, float], step: int, cfg: Config) -> None:
    if not M.is_finite_metrics(metrics):
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        raise DpokitError(
            f"non-finite {', '.join(bad)} at step {step}; lower train.lr (now {cfg.train.lr}) "
            f"or use model.dtype=float32 / train.mixed_precision=no"
        )


def evaluate_during_training(policy: Any, s: Setup, cfg: Config) -> dict[str, float]:
    from dpokit.evaluate import evaluate_pairs

    res = evaluate_pairs(policy, s.reference, s.eval_pairs, cfg, s.collator, s.accelerator, s.lm_head_chunk)
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


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, desc="dpo")
