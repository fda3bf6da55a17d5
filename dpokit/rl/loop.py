"""`dpokit rl`: RLHF's RL stage, PPO or RLOO against a reward, read top to bottom.

One RL step = one rollout batch and the updates on it:

1. take the step's prompts (a seeded permutation per epoch, so step s always gets the same ones),
   sample ``rl.samples()`` responses each with the one sampler (seed derived from the step);
2. score the responses with the reward (a judge, a reward model, a callable); a row whose reward
   failed is counted and left out of the update;
3. one no-grad forward each for the policy's log-probs, the reference's (LoRA: the adapters off,
   full fine-tuning: a frozen copy) and, for PPO, the value model's values;
4. advantages: PPO = per-token reward (score at the last token, ``-kl_coef * kl_t`` on every token)
   through GAE; RLOO = sequence reward (score - kl_coef * sum_t kl_t) minus the mean of the prompt's
   other samples;
5. ``rl.ppo_epochs`` passes of ``rl.num_minibatches`` minibatches (one optimizer step each), each
   minibatch in micro-batches of ``train.micro_batch_size`` responses whose token-mean losses add up to
   the minibatch's exactly; the clipped policy loss plus, for PPO, ``vf_coef`` x the clipped value loss.

It reuses the training pieces (checkpoint format, metrics.jsonl and loggers, the progress bar, SIGINT
handling, the completion marker), not the training loop, which iterates over a fixed dataset.
Policy and value model are one module (`PolicyAndValue`) with one optimizer, so a checkpoint is one
set of trainable weights (``policy.*`` and ``value.*``) and resuming is bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit import faults
from dpokit.config import Config
from dpokit.data.files import read_prompts
from dpokit.dist import launched_world
from dpokit.errors import DpokitError, WriteError, writing
from dpokit.eval.generate_eval import generation_config
from dpokit.eval.judges import RowJudge, load_judge
from dpokit.eval.sampling import generate_samples, render_prompt
from dpokit.models.loading import apply_checkpointing, fixed_checkpointing, load_policy, resolve_dtype, save_final
from dpokit.models.reward import disable_dropout, load_value_model
from dpokit.rl import losses as L
from dpokit.rl.rollout import (
    RolloutBatch,
    TokenStats,
    build_batch,
    chunks,
    response_logps,
    response_values,
    token_stats,
)
from dpokit.training import card as cards
from dpokit.training import checkpoint as ckpt
from dpokit.training import metrics as M
from dpokit.training import outputs
from dpokit.training.optim import build_optimizer, build_scheduler
from dpokit.training.signals import StopSignals

CONSOLE_KEYS = (("objective/scores", "score", ".4f"), ("objective/kl", "kl", ".3f"),
                ("objective/entropy", "ent", ".3f"), ("policy/clipfrac", "clip", ".3f"),
                ("response_length", "len", ".1f"))  # fmt: skip


@dataclass
class RLResult:
    """How a `dpokit rl` run ended."""

    output_dir: Path
    steps: int
    stopped_by: int | None = None  # the signal that stopped it (a checkpoint was written)
    seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)  # the last logged metrics row
    already_complete: bool = False
    checkpoint: str | None = None  # written when a signal stopped the run


class PolicyAndValue(torch.nn.Module):
    """The trained modules of a run under one optimizer and one checkpoint (value None for RLOO)."""

    def __init__(self, policy: Any, value: Any | None) -> None:
        super().__init__()
        self.policy = policy
        self.value = value


@dataclass
class RLState:
    """What a checkpoint must restore besides weights, optimizer, scheduler and RNGs."""

    step: int = 0
    kl_coef: float = 0.05
    bad_streak: int = 0
    bad_steps: int = 0
    bad_rewards: int = 0  # rows whose reward failed, whole run
    rows: int = 0  # metrics.jsonl rows written
    pending: list[dict[str, float]] = field(default_factory=list)  # step metrics since the last log row


@dataclass
class _Run:
    cfg: Config
    out: Path
    prompts: list[str]
    tokenizer: Any
    model: PolicyAndValue
    reference: Any  # None: the policy's base with adapters off
    reward: RowJudge
    optimizer: Any
    scheduler: Any
    steps: int
    kl: L.AdaptiveKLController
    autocast: Callable[[], Any]
    logger: Any = None
    bar: Any = None


# ---- the run ----------------------------------------------------------------------------------
def train_rl(cfg: Config, log: Callable[[str], Any] = print) -> RLResult:
    """Run `dpokit rl` with ``cfg`` (rl.* for the algorithm, train.* for steps, lr, batches, output)."""
    cfg.validate()
    world = launched_world()  # set by torchrun / accelerate launch
    if world > 1:
        raise DpokitError(f"dpokit rl runs in one process, and this one is 1 of {world} (WORLD_SIZE={world}): "
                          "launch it without torchrun / accelerate launch. Multi-process RL would need the rollouts "
                          "sharded over ranks, the advantage whitening reduced across them and the policy and value "
                          "model wrapped for DDP/FSDP")  # fmt: skip
    out = Path(cfg.train.output_dir)
    done = outputs.read_completion(out)
    if done is not None and ckpt.resume_mode(cfg.train.resume) == "auto":
        log(outputs.finished_message(out, done))
        return RLResult(out, done.steps, already_complete=True)
    prompt_rows = [p for f in cfg.rl.prompt_files for p in read_prompts(f)]  # bad files fail before any model loads
    claim = outputs.prepare(cfg)  # the folder's lock is held from here to the end of the run
    with claim.starting():  # no empty run folder after a failed start
        run, state = _start(cfg, claim.out, prompt_rows, log)
    with claim.running():
        return _steps_and_finish(run, state, log)


def _steps_and_finish(run: _Run, state: RLState, log: Callable[[str], Any]) -> RLResult:
    cfg, out = run.cfg, run.out
    wall = time.perf_counter()
    with StopSignals() as signals:
        for step in range(state.step + 1, run.steps + 1):
            _step(run, state, step)
            run.bar.update(1)
            if state.bad_streak >= cfg.train.max_bad_steps:
                _stop_on_bad_steps(run, state)
            if signals.requested:
                path = _save_checkpoint(run, state)
                run.bar.close()
                run.logger.close()
                log(f"{signal.Signals(signals.signum).name}: stopped after step {step}/{run.steps}; checkpoint {path}. "
                    "Run the same command with train.resume=auto to continue")  # fmt: skip
                return RLResult(out, step, signals.signum, time.perf_counter() - wall, checkpoint=str(path))
            if step == run.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                _save_checkpoint(run, state)  # the last step always: a kill in the final save resumes there
    return _finish(run, state, time.perf_counter() - wall)


def _start(cfg: Config, out: Path, prompt_rows: list[str], log: Callable[[str], Any]) -> tuple[_Run, RLState]:
    """Models, reward, prompts, optimizer; the resume point; the logger and the progress bar."""
    torch.manual_seed(cfg.train.seed)  # LoRA init and a new value head: the same for the same seed
    dtype = resolve_dtype(cfg.model.dtype)
    gen_cfg = generation_config(cfg)  # left-padded prompts need transformers' own masks: SDPA, never varlen
    policy, tokenizer = load_policy(gen_cfg, dtype)
    disable_dropout(policy)  # the rollout's and the update's log-probs must come from the same function
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = _usable_prompts(prompt_rows, tokenizer, cfg, log)
    reward = load_judge(cfg.rl.reward, gen_cfg, cfg.train.eval_batch_size)
    value, value_from = _value_model(gen_cfg, dtype, tokenizer, log) if cfg.rl.algorithm == "ppo" else (None, "")
    reference = None
    if not cfg.lora.enabled:  # full fine-tuning: a frozen copy of the starting policy
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    every = fixed_checkpointing(cfg.train.gradient_checkpointing)  # no memory plan here: auto is off
    for m in (policy, value):
        if m is not None:
            apply_checkpointing(m, every)
    model = PolicyAndValue(policy, value)
    per_step = cfg.rl.ppo_epochs * cfg.rl.num_minibatches
    steps = _total_steps(cfg, len(prompts))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps * per_step)  # the schedule counts optimizer steps
    bf16 = cfg.train.mixed_precision == "bf16"
    autocast = (lambda: torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext  # noqa: E501
    kl = L.AdaptiveKLController(cfg.rl.kl_coef, cfg.rl.kl_target, cfg.rl.kl_horizon)
    run = _Run(cfg, out, prompts, tokenizer, model, reference, reward, optimizer, scheduler, steps, kl, autocast)
    state = _resume(run, log)
    with writing("the run's config", out / "config.yaml"):
        cfg.save(out / "config.yaml")
    run.logger = M.MetricsLogger(out, cfg.train.report_to, append=state.step > 0, config=cfg.to_dict())
    run.bar = M.progress_bar(steps, cfg.train.progress_bar and sys.stderr.isatty(), state.step, f"rl-{cfg.rl.algorithm}")
    log(f"[rl] {cfg.rl.algorithm}: {steps} steps x {cfg.rl.prompts_per_step} prompts x {cfg.rl.samples()} samples, "
        f"reward {reward.name}, reference {'a frozen copy' if reference is not None else 'the base (adapters off)'}, "
        f"KL estimator {cfg.rl.kl_estimator} x coefficient {cfg.rl.kl_coef}"
        f"{f' adapted towards KL {cfg.rl.kl_target}' if cfg.rl.kl_target is not None else ' (fixed)'}"
        f"{', value model from ' + value_from if value is not None else ''}")  # fmt: skip
    return run, state


def _total_steps(cfg: Config, n_prompts: int) -> int:
    if cfg.train.max_steps >= 1:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_prompts / cfg.rl.prompts_per_step))


def _value_source(cfg: Config) -> str | None:
    """The reward model folder PPO's value model starts from, or None for the policy's backbone."""
    spec = cfg.rl.reward.strip()
    is_rm = spec.lower().startswith("rm:")
    if cfg.rl.value_model == "reward" and not is_rm:
        raise DpokitError(f"rl.value_model=reward needs rl.reward=rm:PATH (a reward model), got {spec!r}; "
                          "use rl.value_model=policy")  # fmt: skip
    return spec[3:].strip() if is_rm and cfg.rl.value_model in ("auto", "reward") else None


def _value_model(cfg: Config, dtype: torch.dtype, tokenizer: Any, log: Callable[[str], Any]) -> tuple[Any, str]:
    """PPO's value model and where it started from. It reads the policy's token ids, so a reward model with
    another vocabulary cannot seed it: auto then starts from the policy's backbone, an explicit
    rl.value_model=reward is refused."""
    path = _value_source(cfg)
    model, value_tokenizer = load_value_model(cfg, dtype, path)
    if path is None:
        return model, "the policy"
    if value_tokenizer.get_vocab() == tokenizer.get_vocab():
        return model, path
    if cfg.rl.value_model == "reward":
        raise DpokitError(f"rl.value_model=reward: the reward model {path} has another tokenizer than the policy, and "
                          "the value model reads the policy's tokens; use rl.value_model=policy")  # fmt: skip
    log(f"[rl] the reward model {path} has another tokenizer: the value model starts from the policy instead")
    del model
    return load_value_model(cfg, dtype, None)[0], "the policy"


def _usable_prompts(rows: list[str], tokenizer: Any, cfg: Config, log: Callable[[str], Any]) -> list[str]:
    """The prompts that fit rl.max_prompt_length tokens (as rendered for sampling); the others are
    skipped and counted. None fitting is an error naming the limit."""
    limit = cfg.rl.max_prompt_length
    lengths = [len(tokenizer(text, add_special_tokens=add)["input_ids"]) for text, add in
               (render_prompt(tokenizer, p) for p in rows)]  # fmt: skip
    kept = [p for p, n in zip(rows, lengths) if n <= limit]
    too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if too_long:
        shown = ", ".join(f"#{i + 1} ({n} tokens)" for i, n in too_long[:3])
        log(f"[rl] skipped {len(too_long)} of {len(rows)} prompts longer than rl.max_prompt_length={limit}: {shown}")
    if not kept:
        raise DpokitError(f"every prompt of rl.prompt_files is longer than rl.max_prompt_length={limit} tokens; "
                          "raise it or give shorter prompts")  # fmt: skip
    return kept


# ---- one step ---------------------------------------------------------------------------------
def step_prompts(n_prompts: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices of the prompts of RL step ``step`` (1-based): consecutive slices of an endless sequence of
    per-epoch seeded permutations, so the same step always gets the same prompts (resume included)."""
    start = (step - 1) * per_step
    out = []
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[pos]))
    return out


def _step(run: _Run, state: RLState, step: int) -> None:
    cfg, rl = run.cfg, run.cfg.rl
    t0 = time.perf_counter()
    prompts = [run.prompts[i] for i in step_prompts(len(run.prompts), rl.prompts_per_step, cfg.train.seed, step)]
    # Sampling runs in the weights' dtype, never under the bf16 autocast: autocast would cast every weight
    # at every decoded token. The log-probs below are taken under it, for the rollout and the update alike.
    groups = generate_samples(run.model.policy, run.tokenizer, prompts, n=rl.samples(), max_new_tokens=rl.max_new_tokens,
                              temperature=rl.temperature, top_p=1.0, top_k=0, seed=cfg.train.seed * 7919 + step,
                              batch_size=cfg.train.eval_batch_size)  # fmt: skip
    samples = [s for g in groups for s in g]
    t_gen = time.perf_counter() - t0
    scores, valid = _scores(run, prompts, samples, step)
    batch = build_batch(samples, run.tokenizer.pad_token_id)
    stats = token_stats(run.model.policy, run.reference, run.model.value, batch, rl.temperature,
                        cfg.train.eval_batch_size, run.autocast)  # fmt: skip
    adv = _advantages(run, batch, stats, scores, valid)
    t_roll = time.perf_counter() - t0
    state.bad_rewards += int((~valid).sum())
    t1 = time.perf_counter()
    updated = bool(adv.train_mask.any())  # False: every reward failed, nothing to learn from
    upd = _update(run, batch, stats, adv, step) if updated else {"finite_updates": 0.0}
    train_tokens = float(batch.attention_mask.sum()) * rl.ppo_epochs if updated else 0.0  # rows seen by the update
    t_upd = time.perf_counter() - t1
    run.kl.update(adv.metrics["objective/kl"], len(samples))
    good = upd["finite_updates"] > 0
    state.bad_streak = 0 if good else state.bad_streak + 1
    state.bad_steps += 0 if good else 1
    if not good:
        print(f"warning: step {step}: no update ({int((~valid).sum())} of {len(samples)} rewards failed, or every "
              f"minibatch was non-finite); {state.bad_streak} in a row, the run stops at {cfg.train.max_bad_steps}",
              file=sys.stderr)  # fmt: skip
    gen_tokens = float(batch.mask.sum())
    row = {**adv.metrics, **upd, "objective/kl_coef": run.kl.value, "bad_rewards": float((~valid).sum()),
           "lr": run.scheduler.get_last_lr()[0], "rollout_tokens_per_sec": gen_tokens / max(t_gen, 1e-9),
           "train_tokens_per_sec": train_tokens / max(t_upd, 1e-9), "time/rollout": t_roll,
           "time/update": t_upd, "time/step": time.perf_counter() - t0}  # fmt: skip
    state.step = step
    state.pending.append(row)
    if step % cfg.train.log_every == 0 or step == run.steps:
        _log(run, state)


def _scores(run: _Run, prompts: list[str], samples: list[Any], step: int) -> tuple[Tensor, Tensor]:
    """(scores (N,), valid (N,) bool): the reward of each response, minus rl.missing_eos_penalty for one
    that did not end; a failed row scores 0 and is invalid (reported once per step)."""
    k = run.cfg.rl.samples()
    row_prompts = [p for p in prompts for _ in range(k)]
    judged = run.reward(row_prompts, [s.text for s in samples])
    if judged.errors:
        print(f"warning: step {step}: {judged.error_summary()}; those responses are left out", file=sys.stderr)
    valid = torch.tensor([s is not None for s in judged.scores])
    scores = torch.tensor([s if s is not None else 0.0 for s in judged.scores], dtype=torch.float32)
    penalty = run.cfg.rl.missing_eos_penalty
    if penalty:
        scores -= penalty * torch.tensor([0.0 if s.finished else 1.0 for s in samples])
    return scores, valid


@dataclass
class Advantages:
    """What the update needs beside the rollout: per-token advantages (N, R), returns (PPO), the mask of
    tokens that take part (real tokens of responses with a usable reward), and the rollout's metrics."""

    advantages: Tensor
    returns: Tensor | None
    train_mask: Tensor
    metrics: dict[str, float]


def _advantages(run: _Run, batch: RolloutBatch, stats: TokenStats, scores: Tensor, valid: Tensor) -> Advantages:
    rl, coef = run.cfg.rl, run.kl.value
    mask = batch.mask
    kl = L.KL_ESTIMATORS[rl.kl_estimator](stats.logps, stats.ref_logps) * mask  # (N, R)
    seq_kl = kl.sum(1)  # (N,)
    returns = None
    if rl.algorithm == "ppo":
        rewards, _ = L.token_rewards(scores, kl, mask, coef)
        adv, returns = L.gae(rewards, stats.values, mask, rl.gamma, rl.lam)  # type: ignore[arg-type]
        train_mask = mask & valid[:, None]
        if rl.whiten_advantages:
            adv = L.masked_whiten(adv, train_mask)
    else:
        k = rl.samples()
        seq_reward = scores - coef * seq_kl  # (N,)
        grouped_valid = valid.view(-1, k)
        seq_adv = L.rloo_advantages(seq_reward.view(-1, k), grouped_valid).view(-1)
        usable = valid & (grouped_valid.sum(1, keepdim=True) >= 2).expand(-1, k).reshape(-1)  # needs a sibling
        if rl.whiten_advantages:
            seq_adv = L.masked_whiten(seq_adv, usable)
        train_mask = mask & usable[:, None]
        adv = seq_adv[:, None] * train_mask
    v = valid.float()
    n_valid = max(1.0, float(v.sum()))
    metrics = {
        "objective/scores": float((scores * v).sum() / n_valid),
        "objective/kl": float(seq_kl.mean()),
        "objective/non_score_reward": float(-coef * seq_kl.mean()),
        "objective/rlhf_reward": float(((scores - coef * seq_kl) * v).sum() / n_valid),
        "objective/entropy": float(L.masked_mean(stats.entropy, mask)),
        "response_length": float(mask.sum(1).float().mean()),
    }
    return Advantages(adv, returns, train_mask, metrics)


# ---- the update -------------------------------------------------------------------------------
_UPDATE_KEYS = ("loss/policy", "policy/clipfrac", "policy/approxkl", "policy/ratio", "loss/value", "value/clipfrac")


def _update(run: _Run, batch: RolloutBatch, stats: TokenStats, adv: Advantages, step: int) -> dict[str, float]:
    """rl.ppo_epochs passes over the rollout in rl.num_minibatches shuffled minibatches, one optimizer
    step each; token-weighted sums of the loss pieces for the metrics."""
    rl, t = run.cfg.rl, run.cfg.train
    n = len(batch)
    gen = torch.Generator().manual_seed(t.seed * 104_729 + step)  # minibatch order: a function of the step
    sums = dict.fromkeys(_UPDATE_KEYS, 0.0)
    tokens, finite_updates, grad_norms = 0.0, 0, []
    run.model.train()
    for _ in range(rl.ppo_epochs):
        perm = torch.randperm(n, generator=gen)
        for mb in perm.chunk(rl.num_minibatches):
            n_tok = float(adv.train_mask[mb].sum())
            if n_tok == 0:
                continue
            pieces = [_micro_step(run, batch, stats, adv, mb[i], n_tok) for i in chunks(len(mb), t.micro_batch_size)]
            ok = all(p is not None for p in pieces)
            params = [p for p in run.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            if ok and bool(torch.isfinite(norm)):
                run.optimizer.step()
                faults.reach("step.optimizer")
                finite_updates += 1
                grad_norms.append(float(norm))
                for p in pieces:
                    for key, value in p.items():  # type: ignore[union-attr]
                        sums[key] += value
                tokens += n_tok
            with warnings.catch_warnings():  # torch warns when the very first update was the skipped one
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                run.scheduler.step()  # skipped updates too: the lr stays a function of the step count
            run.optimizer.zero_grad(set_to_none=True)
    out = {k: v / tokens for k, v in sums.items()} if tokens else {}
    if run.model.value is None:
        out = {k: v for k, v in out.items() if not k.startswith(("loss/value", "value/"))}
    else:
        out["value/explained_variance"] = L.explained_variance(stats.values, adv.returns, adv.train_mask)  # type: ignore[arg-type]
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["finite_updates"] = float(finite_updates)
    return out


def _micro_step(
    run: _Run, batch: RolloutBatch, stats: TokenStats, adv: Advantages, idx: Tensor, n_tok: float
) -> dict[str, float] | None:
    """Forward and backward of rows ``idx``; its loss is its share of the minibatch's token mean (sum over
    its tokens / the minibatch's token count), so the micro-batches' gradients add up to the minibatch's.
    None (and no backward) when the loss is not finite."""
    rl = run.cfg.rl
    part = batch.rows(idx)
    w = part.mask.shape[1]
    m = adv.train_mask[idx, :w].float()
    old, a = stats.logps[idx, :w], adv.advantages[idx, :w]
    with run.autocast():
        logps, _ = response_logps(run.model.policy, part, rl.temperature)
        pg, pg_clipped = L.clipped_policy_loss(logps, old, a, rl.cliprange)
        loss = (pg * m).sum() / n_tok
        vf = vf_clipped = None
        if run.model.value is not None:
            values = response_values(run.model.value, part)
            vf, vf_clipped = L.clipped_value_loss(values, stats.values[idx, :w], adv.returns[idx, :w], rl.cliprange_value)  # type: ignore[index]
            loss = loss + rl.vf_coef * (vf * m).sum() / n_tok
    if not bool(torch.isfinite(loss)):
        return None
    loss.backward()
    with torch.no_grad():
        out = {"loss/policy": float((pg * m).sum()), "policy/clipfrac": float((pg_clipped.float() * m).sum()),
               "policy/approxkl": float((L.approx_kl(logps, old) * m).sum()),
               "policy/ratio": float((torch.exp(logps - old) * m).sum())}  # fmt: skip
        if vf is not None:
            out["loss/value"] = float((vf * m).sum())
            out["value/clipfrac"] = float((vf_clipped.float() * m).sum())  # type: ignore[union-attr]
    return out


# ---- logging, checkpoints, the end ------------------------------------------------------------
def _log(run: _Run, state: RLState) -> None:
    """One metrics row: the mean of each metric over the steps since the last row (nan-free where it can)."""
    keys = {k for r in state.pending for k in r}
    row: dict[str, Any] = {}
    for k in sorted(keys):
        vals = [r[k] for r in state.pending if k in r and isinstance(r[k], float) and math.isfinite(r[k])]
        row[k] = sum(vals) / len(vals) if vals else float("nan")
    row["bad_rewards"] = sum(r.get("bad_rewards", 0.0) for r in state.pending)
    row["epoch"] = state.step * run.cfg.rl.prompts_per_step / len(run.prompts)
    run.logger.log(state.step, row)
    state.rows += 1
    state.pending = []
    if not run.bar.disable:
        run.bar.set_postfix_str(M.format_line(state.step, run.steps, row, CONSOLE_KEYS).split(" | ", 1)[-1])
    else:
        print(M.format_line(state.step, run.steps, row, CONSOLE_KEYS), flush=True)


def _state_dict(run: _Run, state: RLState) -> dict[str, Any]:
    return {"step": state.step, "kl_coef": run.kl.value, "bad_streak": state.bad_streak, "bad_steps": state.bad_steps,
            "bad_rewards": state.bad_rewards, "rows": state.rows, "pending": state.pending}  # fmt: skip


def _save_checkpoint(run: _Run, state: RLState) -> Path:
    root = run.out / ckpt.CHECKPOINTS
    tmp = ckpt.staging_dir(root, state.step)
    try:
        ckpt.begin(root, state.step)
        ckpt.write_rng(tmp, 0)
        return ckpt.write_and_publish(tmp, state.step, run.model, run.optimizer, run.scheduler, _state_dict(run, state),
                                      run.cfg.to_yaml(commented=False), 1, run.cfg.train.keep_checkpoints)  # fmt: skip
    except WriteError as exc:
        ckpt.discard(tmp)
        raise exc.elaborate(what=f"the checkpoint of step {state.step}") from None


def _resume(run: _Run, log: Callable[[str], Any]) -> RLState:
    mode = ckpt.resume_mode(run.cfg.train.resume)
    state = RLState(kl_coef=run.kl.value)
    if mode == "no":
        return state
    root = run.out / ckpt.CHECKPOINTS
    found = ckpt.load_newest(root, warn=log) if mode == "auto" else ckpt.load_checkpoint(Path(str(run.cfg.train.resume)))
    if found is None:
        log(f"train.resume=auto: no checkpoint in {root}; starting at step 0")
        return state
    ckpt.apply_weights(run.model, found.weights, found.path)
    run.optimizer.load_state_dict(found.optimizer)
    run.scheduler.load_state_dict(found.scheduler)
    s = found.state
    state = RLState(s["step"], s["kl_coef"], s["bad_streak"], s["bad_steps"], s["bad_rewards"], s["rows"], list(s["pending"]))
    run.kl.value = state.kl_coef
    M.truncate_metrics(run.out / "metrics.jsonl", state.rows)
    if found.rng is not None:
        ckpt.set_rng_state(found.rng)
    if found.step >= run.steps:
        log(f"resumed from {found.path}: training had finished (step {found.step} of {run.steps}) but the final "
            "save had not; finishing it without training again")  # fmt: skip
    else:
        log(f"resumed from {found.path} (step {found.step} of {run.steps})")
    return state


def _stop_on_bad_steps(run: _Run, state: RLState) -> None:
    path = _save_checkpoint(run, state)
    raise DpokitError(
        f"steps {state.step - state.bad_streak + 1}-{state.step}: {state.bad_streak} RL steps in a row made no update "
        f"(every reward failed, or every minibatch had a non-finite loss or gradient; train.max_bad_steps="
        f"{run.cfg.train.max_bad_steps}); stopped, checkpoint {path}. Check rl.reward on a few responses, or lower "
        f"train.lr (now {run.cfg.train.lr}); then continue with train.resume=auto"
    )


def _finish(run: _Run, state: RLState, seconds: float) -> RLResult:
    run.bar.close()
    run.logger.close()
    run.optimizer.state.clear()  # free the optimizer state before the save copies the weights
    last = {}
    rows = (run.out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    if rows:
        last = json.loads(rows[-1])

    def write(stage: Path) -> dict[str, str]:  # into a staging folder, then renamed into place file by file
        staged = save_final(run.model.policy, run.tokenizer, run.cfg, stage)
        cards.write_cards(staged, cards.run_facts(run.cfg, run.steps, last, objective="rl"))
        return staged

    try:
        written = outputs.write_final(run.out, write)
    except WriteError as exc:
        raise exc.elaborate(what="the final model") from None
    outputs.mark_complete(run.out, run.steps, written)  # last: only now does the folder hold a finished run
    if not run.cfg.train.save_every:  # the final step's checkpoint was only a safety net for the save
        ckpt.remove_checkpoint(run.out / ckpt.CHECKPOINTS, run.steps)
    return RLResult(run.out, run.steps, None, seconds, last)


def load_policy_weights(policy: Any, checkpoint_dir: Path) -> None:
    """Put the policy part of an RL checkpoint into ``policy`` (built as the run built it: LoRA-wrapped
    when lora.enabled), e.g. to evaluate a run's intermediate checkpoints."""
    found = ckpt.load_checkpoint(Path(checkpoint_dir))
    weights = {k[len("policy.") :]: v for k, v in found.weights.items() if k.startswith("policy.")}
    ckpt.apply_weights(policy, weights, found.path)
