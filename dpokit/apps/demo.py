"""`dpokit demo`: align SmolLM2-135M-Instruct towards positive movie reviews on a CPU, and show what changed.

The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1), rebuilt offline:

1. train LoRA DPO on ``builtin:reviews/pairs.jsonl`` (pairs the model sampled itself, labelled by the
   VADER judge) with the ``demo`` preset (``dpokit/assets/presets/demo.yaml``); a LoRA checkpoint is kept at the midpoint;
2. sample one response per held-out prompt from the base model, the midpoint and the final model
   (same sampling settings and seed for all three) and measure, for each: the mean score of the
   labelling judge (vader, the ground-truth reward) and of a judge that labelled nothing
   (textblob: did the model learn sentiment or vader's quirks?), the win rate against the base
   model's response to the same prompt, the sequence-level KL(policy || reference) estimated from
   the samples, the mean response length, and the implicit reward's accuracy on held-out pairs;
3. print a before/after table with example responses and write ``report.md`` and plots
   (`dpokit.apps.report`) into the run folder.

The judges never enter the loss: DPO only sees which response of a pair was preferred.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dpokit import resources
from dpokit.apps.report import DemoResult, StageResult
from dpokit.config import Config
from dpokit.errors import ConfigError, DpokitError

DEFAULT_CONFIG = str(resources.preset_path("demo"))  # the shipped preset, wherever dpokit is installed
DEFAULT_OUT = "runs/demo"


@dataclass
class DemoSettings:
    """What the demo samples and measures besides training (training itself is the YAML config).

    The sampling defaults match the ones the shipped pairs were built with (dpokit/assets/data/reviews/README.md),
    so the evaluation sees the same kind of text the preferences were expressed over.
    """

    config: str = DEFAULT_CONFIG
    out: str = DEFAULT_OUT
    eval_prompts: str = "builtin:reviews/eval_prompts.jsonl"
    n_prompts: int = 64  # held-out prompts sampled per model (64: win rate +- ~6 points, ~1 min each)
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 1234  # the same seed for every model, so differences are not sampling luck
    gen_batch_size: int = 64  # sequences per generate() call: larger batches give more tokens/s on a CPU
    judge: str = "vader"  # labelled the training pairs: the ground-truth reward
    second_judge: str = "textblob"  # labelled nothing: a check for over-fitting the labeller
    examples: int = 3
    quick: bool = False
    overrides: list[str] = field(default_factory=list)


# --quick: a smoke version that runs every stage, in about a minute with the real model.
QUICK_OVERRIDES = ["train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.log_every=1",
                   "train.warmup_steps=0"]  # fmt: skip
QUICK_SETTINGS = {"n_prompts": 6, "max_new_tokens": 12, "examples": 2}
QUICK_EVAL_PAIRS = 8


# ---- configuration --------------------------------------------------------------------------
def build_config(settings: DemoSettings, out: Path) -> Config:
    """The training config: the YAML, --quick overrides, the user's overrides, and the demo's own
    fixed points (output folder, a midpoint checkpoint and held-out evaluation)."""
    cfg = Config.from_yaml(settings.config)
    if settings.quick:
        cfg = cfg.override(QUICK_OVERRIDES)
    if settings.overrides:
        cfg = cfg.override(settings.overrides)
    t = cfg.train
    if t.max_steps < 2:
        raise ConfigError("the demo needs train.max_steps >= 2 (it keeps a checkpoint at the midpoint)")
    mid = t.max_steps // 2
    cfg = cfg.override([
        f"train.output_dir={out / 'model'}",
        "train.overwrite=true",  # the demo folder is re-made on every run
        "train.resume=no",
        f"train.save_every={mid}",  # the LoRA weights at the midpoint, for the score-vs-KL curve
        f"train.eval_every={mid}",  # held-out accuracy at the midpoint, logged to metrics.jsonl
        f"train.keep_checkpoints={max(2, t.keep_checkpoints)}",  # the final step's checkpoint must not prune it
    ])  # fmt: skip
    if not cfg.lora.enabled:
        raise ConfigError("the demo trains LoRA adapters (lora.enabled=true): its reference is the base model")
    return cfg.validate()


# ---- the pipeline -------------------------------------------------------------------------
def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _eval_row(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The metrics.jsonl row with held-out metrics logged at ``step`` ({} if none)."""
    found = [r for r in rows if r.get("step") == step and "eval/rewards/accuracies" in r]
    return found[-1] if found else {}


def _subset_file(src: str, dst: Path, n: int) -> str:
    path = resources.resolve_builtin(src) if resources.is_builtin(src) else Path(src)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(dst)


def load_lora_model(base: str, cfg: Config) -> tuple[Any, Any]:
    """The base model wrapped with freshly initialised LoRA layers (weights are loaded per stage)."""
    from dpokit.models.loading import apply_lora, load_model_and_tokenizer, resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype)
    # it generates (left-padded prompts): plain SDPA with transformers' own masks, never varlen
    cfg = cfg.override(["model.attn_implementation=sdpa"])
    model, tokenizer = load_model_and_tokenizer(base, cfg, dtype)
    return apply_lora(model, cfg), tokenizer


def load_stage_weights(model: Any, model_dir: Path, step: int, final: bool) -> None:
    """Put the LoRA weights of the midpoint checkpoint or of the final adapter into ``model``."""
    from dpokit.training import checkpoint as ckpt

    if final:
        import peft
        from safetensors.torch import load_file

        state = load_file(str(model_dir / "adapter_model.safetensors"))
        result = peft.set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise DpokitError(f"{model_dir}: adapter does not fit the model: {result.unexpected_keys[:3]}")
        return
    path = model_dir / ckpt.CHECKPOINTS / ckpt.folder_name(step)
    ckpt.apply_weights(model, ckpt.load_checkpoint(path).weights, path)


def sampling_settings(settings: DemoSettings) -> Any:
    """The demo's sampling, the same for every model: `dpokit evaluate --prompts`'s settings."""
    from dpokit.eval.generate_eval import SamplingSettings  # torch: loaded when the demo runs, not for `--help`

    return SamplingSettings(
        n=1, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        seed=settings.seed, batch_size=settings.gen_batch_size,
    )  # fmt: skip


def measure_stage(
    name: str,
    step: int,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: DemoSettings,
    base: Any,
    heldout: dict[str, Any],
    judges: Sequence[Any],
) -> tuple[StageResult, Any]:
    """Sample, judge and score one model with `dpokit evaluate --prompts`'s code
    (`dpokit.eval.generate_eval.measure`); returns its StageResult and the `ModelEval` (the base
    stage's is the baseline of the others). ``model`` is the PEFT model; for the base stage
    (``base is None``) its adapters are disabled while sampling and it is its own reference (KL 0);
    the others' reference is the base, i.e. the same model with the adapters off."""
    from dpokit.eval.generate_eval import ADAPTER, SELF, Candidate, measure

    cand = Candidate(name, model, tokenizer, SELF if base is None else ADAPTER, adapters_off=base is None)
    ev = measure(cand, prompts, sampling_settings(settings), judges, baseline=base)
    acc = heldout.get("eval/rewards/accuracies")
    margin = heldout.get("eval/rewards/margins")
    stage = StageResult(
        name=name, step=step, scores=dict(ev.mean_score), win_rate=dict(ev.win_rate), kl=ev.kl, kl_sem=ev.kl_sem,
        mean_length=ev.mean_length, heldout_accuracy=None if acc is None else float(acc),
        heldout_margin=None if margin is None else float(margin), responses=[g[0].text for g in ev.samples],
        response_scores=dict(ev.scores), win_interval=dict(ev.win_interval), length_corr=dict(ev.length_corr),
    )  # fmt: skip
    return stage, ev


def run_demo(settings: DemoSettings, log: Any = print) -> DemoResult:
    """Train, evaluate base / midpoint / final, write the report; returns the results."""
    import platform

    import torch

    from dpokit.apps import report
    from dpokit.data.files import read_prompts
    from dpokit.eval.judges import load_judge
    from dpokit.models import sources
    from dpokit.training.loop import train

    wall = time.perf_counter()
    out = Path(settings.out)
    if settings.quick:
        settings = replace(settings, **QUICK_SETTINGS)
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(settings, out)
    if settings.quick and cfg.data.eval_files:  # a handful of held-out pairs is enough for a smoke run
        cfg = cfg.override([f"data.eval_files=[{_subset_file(cfg.data.eval_files[0], out / 'eval_pairs_quick.jsonl', QUICK_EVAL_PAIRS)}]"])
    prompts = read_prompts(settings.eval_prompts)[: settings.n_prompts]
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    # a GGUF base is dequantized once into a cached folder, which every later load reuses; timed apart
    sources.materialize_gguf(cfg.model.name_or_path, log=log)
    timings["prepare model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # trained under the name the user gave (the model card names it), loaded from the same folder
    log(f"[demo] training {cfg.model.name_or_path} with LoRA DPO: {cfg.train.max_steps} steps -> {out / 'model'}")
    result = train(cfg)
    if result.stopped_by:
        raise DpokitError(f"training was stopped at step {result.steps}; the demo is incomplete")
    timings["train"] = time.perf_counter() - t0
    rows = _read_metrics(out / "model" / "metrics.jsonl")
    steps, mid = cfg.train.max_steps, cfg.train.max_steps // 2

    t0 = time.perf_counter()
    model, tokenizer = load_lora_model(cfg.model.name_or_path, cfg)
    judges = [load_judge(settings.judge), load_judge(settings.second_judge)]
    log(f"[demo] sampling {len(prompts)} held-out prompts from the base model")
    stage, base = measure_stage("base", 0, model, tokenizer, prompts, settings, None, {}, judges)
    stages: list[StageResult] = [stage]
    for name, step, final in (("mid", mid, False), ("final", steps, True)):
        load_stage_weights(model, out / "model", step, final)
        log(f"[demo] sampling {len(prompts)} held-out prompts from the {name} model (step {step})")
        heldout = _eval_row(rows, step)
        stages.append(measure_stage(name, step, model, tokenizer, prompts, settings, base, heldout, judges)[0])
    timings["evaluate"] = time.perf_counter() - t0

    n_train = _count_lines(cfg.data.train_files)
    n_eval = _count_lines(cfg.data.eval_files)
    timings["total"] = time.perf_counter() - wall
    demo = DemoResult(
        stages=stages, prompts=list(prompts), settings={k: v for k, v in vars(settings).items()},
        config=cfg.to_dict(), train_pairs=n_train, eval_pairs=n_eval, steps=steps, timings=timings,
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    )  # fmt: skip
    (out / "results.json").write_text(json.dumps(demo.to_json(), indent=2), encoding="utf-8")
    written = report.write_report(demo, rows, out)
    print(report.render_console(demo))
    log(f"[demo] done in {timings['total'] / 60:.1f} min; report: {written['report']}")
    return demo


def _count_lines(files: Sequence[str]) -> int:
    from dpokit.data.files import expand_files

    total = 0
    for path in expand_files(list(files)) if files else []:
        with open(path, encoding="utf-8") as f:
            total += sum(1 for line in f if line.strip())
    return total


# ---- CLI --------------------------------------------------------------------------------
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit demo` options to ``parser``."""
    d = DemoSettings()
    parser.add_argument("--config", default=d.config, help=f"training config (default: {d.config})")
    parser.add_argument("--out", default=d.out, help=f"run folder for the model, report.md and plots (default: {d.out})")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version of every stage (~1 min)")
    parser.add_argument("--eval-prompts", default=d.eval_prompts, help="held-out prompts (.jsonl)")
    parser.add_argument("--n-prompts", type=int, default=d.n_prompts, help=f"held-out prompts sampled (default: {d.n_prompts})")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed, the same for every model")
    parser.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the training config")


def demo_command(args: argparse.Namespace) -> int:
    """Run `dpokit demo` from parsed arguments; returns the exit status."""
    if args.n_prompts < 1:
        raise DpokitError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    settings = DemoSettings(
        config=args.config, out=args.out, eval_prompts=args.eval_prompts, n_prompts=args.n_prompts,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        gen_batch_size=args.gen_batch_size, quick=args.quick, overrides=list(args.overrides),
    )  # fmt: skip
    run_demo(settings, log=lambda m: print(m, file=sys.stderr))
    return 0
