"""`dpokit compare`: RLHF vs DPO on movie-review sentiment, the DPO paper's Figure 2 (left) rebuilt small.

On SmolLM2-135M-Instruct (LoRA) with the shipped review data, where the VADER judge labelled the
pairs and plays the paper's ground-truth ("gold") reward:

1. a Bradley-Terry reward model on the pairs (`dpokit reward`, preset reward-reviews): the *proxy*;
2. the runs of `PLAN`: DPO at three betas, Preferred-FT (SFT on the chosen responses), PPO at two
   fixed KL coefficients and RLOO against the reward model, each with a midpoint and a final
   checkpoint; Best-of-N with the reward model, N = 1, 4, 16, from one sampling pass;
3. every checkpoint and the base sample the same held-out prompts with the same settings and seed
   (`dpokit.eval.generate_eval.measure`, as `dpokit demo` and `dpokit evaluate --prompts`): gold
   (VADER), held-out (TextBlob, labelled nothing), proxy (the reward model) and KL to the base;
4. results.json, report.md, two plots and (``--doc``) docs/rlhf-vs-dpo.md with the verdict computed
   from the numbers (`dpokit.apps.compare_report`).

Each training stage (and Best-of-N's sampling) runs in a child process (`run_worker`), so its wall
time and peak RSS (``ru_maxrss`` from ``os.wait4``) are its own; evaluation runs here, with ONE LoRA
model into which each checkpoint's weights are loaded. Every stage has its own folder under
``--out``; a stage whose folder holds a finished run (`training.outputs.read_completion`) and its
``eval.json`` is skipped, and an unfinished one resumes from its newest checkpoint
(``train.resume=auto``), so a rerun after a crash continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dpokit.apps import compare_report as R
from dpokit.config import Config
from dpokit.errors import DpokitError

EVAL = "eval.json"  # a stage's measurements; with run_complete.json it marks the stage finished
STAGE = "stage.json"  # what the stage ran (preset, overrides) and what it cost (wall time, peak RSS)
LOG = "worker.log"  # the child process's output
DEFAULT_OUT = "runs/compare"
DEFAULT_DOC = "docs/rlhf-vs-dpo.md"
GOLD, HELDOUT = "vader", "textblob"  # gold labelled the pairs; held-out labelled nothing


@dataclass(frozen=True)
class Sweep:
    """One method of the comparison: which config key it sweeps, over which values."""

    method: str  # a compare_report.METHODS key
    key: str | None  # the swept key (None: one run)
    values: tuple[Any, ...]
    models_in_memory: int  # models held while training (see compare_report.method_notes)


# The plan: the DPO paper sweeps beta for DPO, the target KL for PPO, seeds only for Preferred-FT.
PLAN: tuple[Sweep, ...] = (
    Sweep("dpo", "loss.beta", (0.05, 0.1, 0.5), 1),  # LoRA: the reference is the same model, adapters off
    Sweep("sft", None, (None,), 1),
    Sweep("ppo", "rl.kl_coef", (0.05, 0.2), 3),  # policy + value + reward model
    Sweep("rloo", "rl.kl_coef", (0.05,), 2),  # policy + reward model
    Sweep("bon", "n", (1, 4, 16), 2),  # one stage: every N from one sampling pass (apps.bon)
)
REWARD_MODELS_IN_MEMORY = 1


@dataclass(frozen=True)
class Profile:
    """Model, presets and sizes of a comparison: the full run or --quick."""

    model: str
    reward_preset: str
    dpo_preset: str
    sft_preset: str
    rl_preset: str
    reward_steps: int
    dpo_steps: int
    sft_steps: int
    rl_steps: int
    rl_prompts: int  # PPO prompts per RL step; RLOO takes half of them x 2 samples (the same responses per step)
    rl_max_new_tokens: int
    n_prompts: int  # held-out prompts per evaluation
    max_new_tokens: int
    gen_batch_size: int
    extra: tuple[str, ...] = ()  # overrides of every training stage
    threads: int | None = None  # torch threads per process (None: torch's default)


# The full run's sizes are meant to fit ~75 min on 2 CPU cores (each stage's time: the Stages table of
# docs/rlhf-vs-dpo.md). RL is the expensive part (measured: ~42 s per PPO step of 16 prompts x 48 tokens,
# a rollout then 2 epochs x 2 minibatches through policy and value model), so PPO and RLOO take 15 steps,
# not the 30 of the rl-reviews preset.
FULL = Profile(
    model="smollm2-135m-instruct", reward_preset="reward-reviews", dpo_preset="demo", sft_preset="sft-reviews",
    rl_preset="rl-reviews", reward_steps=60, dpo_steps=40, sft_steps=40, rl_steps=15, rl_prompts=16,
    rl_max_new_tokens=48, n_prompts=64, max_new_tokens=48, gen_batch_size=64,
)  # fmt: skip
# every stage on the tiny random Llama, a few steps each: a smoke run of the whole pipeline (tests)
QUICK = Profile(
    model="tiny-random-llama", reward_preset="reward-tiny", dpo_preset="tiny", sft_preset="sft-tiny",
    rl_preset="rl-tiny", reward_steps=3, dpo_steps=2, sft_steps=2, rl_steps=2, rl_prompts=4, rl_max_new_tokens=8,
    n_prompts=6, max_new_tokens=8, gen_batch_size=32, extra=("train.eval_batch_size=16", "train.warmup_steps=0"),
    threads=1,
)  # fmt: skip


@dataclass
class CompareSettings:
    out: str = DEFAULT_OUT
    doc: str | None = None  # markdown report path (besides out/report.md); None: none
    quick: bool = False
    seeds: int = 1
    eval_prompts: str = "builtin:reviews/eval_prompts.jsonl"
    n_prompts: int | None = None  # None: the profile's
    seed: int = 0  # the sampling seed of every evaluation
    kl_budget: float | None = None  # None: the smallest budget within which every method has a checkpoint
    temperature: float = 1.0  # 1 with top_p 1: the KL estimate from the samples is unbiased
    top_p: float = 1.0


@dataclass
class Stage:
    """One run: where it lives, what it trains (preset + overrides) and how it is reported."""

    name: str  # folder under --out
    method: str  # "reward" or a METHODS key
    kind: str  # worker kind: reward | dpo | sft | rl | bon
    setting: str
    seed: int  # 1, 2, ...
    preset: str
    overrides: list[str]
    models_in_memory: int
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # Best-of-N's levels and sampling
    checkpoints: int = 2  # evaluated points: every steps // checkpoints steps, the last one the final model

    def eval_steps(self) -> list[int]:
        """The steps whose weights are measured: the saved checkpoints, then the final model."""
        every = max(1, self.steps // self.checkpoints)
        return [s for s in range(every, self.steps, every)][: self.checkpoints - 1] + [self.steps]


# ---- the plan --------------------------------------------------------------------------------
def _value_tag(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def lora_overrides(cfg: Config) -> list[str]:
    """The adapter shape every policy stage trains with: the evaluation's one LoRA model must fit all
    of their checkpoints (and alpha sets the scale, which the weights do not carry)."""
    lo = cfg.lora
    return ["lora.enabled=true", f"lora.r={lo.r}", f"lora.alpha={lo.alpha}",
            f"lora.target_modules=[{','.join(lo.target_modules)}]"]  # fmt: skip


def policy_config(profile: Profile) -> Config:
    """The config the evaluation builds its LoRA model from (and whose adapter shape all runs use)."""
    return Config.from_preset(profile.dpo_preset).override([f"model.name_or_path={profile.model}", "lora.enabled=true"])


def _common(folder: Path, steps: int, seed_value: int, profile: Profile, checkpoints: int) -> list[str]:
    return [f"model.name_or_path={profile.model}", f"train.output_dir={folder}", "train.resume=auto",
            "train.progress_bar=false", f"train.max_steps={steps}", f"train.save_every={max(1, steps // checkpoints)}",
            f"train.keep_checkpoints={checkpoints}", "train.eval_every=0", f"train.seed={seed_value}", *profile.extra]  # fmt: skip


# Points measured per run: DPO's KL grows fastest (the demo's reached ~20 nats in 40 steps), so it gets
# four, to overlap PPO's range; RL three; Preferred-FT two (the cut order: checkpoints first).
CHECKPOINTS = {"dpo": 4, "ppo": 3, "rloo": 3, "sft": 2}


def reward_stage(profile: Profile, out: Path) -> Stage:
    folder = out / "reward"
    overrides = [f"model.name_or_path={profile.model}", f"train.output_dir={folder}", "train.resume=auto",
                 "train.progress_bar=false", "train.eval_every=0", "train.save_every=0",
                 f"train.max_steps={profile.reward_steps}", *profile.extra]  # fmt: skip
    return Stage("reward", "reward", "reward", "Bradley-Terry", 1, profile.reward_preset, overrides,
                 REWARD_MODELS_IN_MEMORY, profile.reward_steps)  # fmt: skip


def build_plan(profile: Profile, settings: CompareSettings, out: Path) -> list[Stage]:
    """The policy stages of `PLAN`, one per swept value and seed, in PLAN order."""
    lora = lora_overrides(policy_config(profile))
    rm = out / "reward"
    stages: list[Stage] = []
    for seed in range(1, settings.seeds + 1):
        suffix = "" if seed == 1 else f"-s{seed}"
        for sw in PLAN:
            if sw.method == "bon":
                stages.append(_bon_stage(sw, profile, settings, rm, seed, suffix))
                continue
            for value in sw.values:
                stages.append(_training_stage(sw, value, profile, out, rm, seed, suffix, lora))
    return stages


def _training_stage(sw: Sweep, value: Any, profile: Profile, out: Path, rm: Path, seed: int, suffix: str,
                    lora: list[str]) -> Stage:  # fmt: skip
    short = {"loss.beta": "beta", "rl.kl_coef": "kl"}.get(sw.key or "", "")
    name = f"{sw.method}{'-' + short + _value_tag(value) if sw.key else ''}{suffix}"
    folder = out / name
    preset = {"dpo": profile.dpo_preset, "sft": profile.sft_preset}.get(sw.method, profile.rl_preset)
    steps = {"dpo": profile.dpo_steps, "sft": profile.sft_steps}.get(sw.method, profile.rl_steps)
    seed_value = Config.from_preset(preset).train.seed + seed - 1  # seed 1 is the preset's own
    checkpoints = CHECKPOINTS[sw.method]
    overrides = _common(folder, steps, seed_value, profile, checkpoints) + lora
    if sw.key:
        overrides.append(f"{sw.key}={value}")
    kind = sw.method if sw.method in ("dpo", "sft") else "rl"
    if kind == "sft":
        overrides.append("data.sft_target=chosen")
    if kind == "rl":
        # RLOO sees as many responses per step as PPO: half the prompts, two samples each
        per_step = profile.rl_prompts if sw.method == "ppo" else max(1, profile.rl_prompts // 2)
        overrides += [f"rl.algorithm={sw.method}", f"rl.reward=rm:{rm}", "rl.kl_target=null",
                      f"rl.prompts_per_step={per_step}", f"rl.samples_per_prompt={1 if sw.method == 'ppo' else 2}",
                      f"rl.max_new_tokens={profile.rl_max_new_tokens}", "train.log_every=1",
                      # fp32, as docs/rlhf-vs-dpo.md was measured: sampling then still ran under the bf16 autocast
                      # (13 instead of 93 tokens/s). It no longer does, and bf16 is now 1.6x faster per PPO step
                      # (30 vs 48 s, 3 steps of rl-reviews); drop this when the doc is next regenerated
                      "train.mixed_precision=no"]  # fmt: skip
    setting = f"{short}={_value_tag(value)}" if sw.key else "chosen"
    return Stage(name, sw.method, kind, setting, seed, preset, overrides, sw.models_in_memory, steps,
                 checkpoints=checkpoints)


def _bon_stage(sw: Sweep, profile: Profile, settings: CompareSettings, rm: Path, seed: int, suffix: str) -> Stage:
    extra = {"ns": list(sw.values), "reward": f"rm:{rm}", "sampling_seed": settings.seed + seed - 1}
    overrides = [f"model.name_or_path={profile.model}", "model.attn_implementation=sdpa"]
    return Stage(f"bon{suffix}", "bon", "bon", "N=" + ",".join(map(str, sw.values)), seed, profile.dpo_preset,
                 overrides, sw.models_in_memory, 0, extra)  # fmt: skip


# ---- the child process -----------------------------------------------------------------------
def run_worker(spec_path: str) -> int:
    """The child process of one stage: train it (or sample Best-of-N) as the spec file says."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "floor":  # the runtime alone: what every stage's peak RSS includes
        import dpokit.training.loop  # noqa: F401

        return 0
    cfg = Config.from_preset(spec["preset"]).override(spec["overrides"]).validate()
    if spec["kind"] == "bon":
        return _bon_worker(spec, cfg)
    if spec["kind"] == "rl":
        from dpokit.rl.loop import train_rl

        return 1 if train_rl(cfg).stopped_by else 0
    from dpokit.training.loop import OBJECTIVES, train

    return 1 if train(cfg, objective=OBJECTIVES[spec["kind"]](cfg)).stopped_by else 0


def _bon_worker(spec: dict[str, Any], cfg: Config) -> int:
    """Best-of-N from the base policy with the reward model: every level from one sampling pass."""
    from dpokit.apps.bon import run_bon
    from dpokit.data.files import read_prompts
    from dpokit.eval.generate_eval import SamplingSettings, load_candidate
    from dpokit.eval.judges import load_judge

    ex = spec["extra"]
    prompts = read_prompts(ex["prompts"])[: ex["n_prompts"]]
    sampling = SamplingSettings(**ex["sampling"])
    reward = load_judge(ex["reward"], cfg, sampling.score_batch_size)
    judges = [load_judge(GOLD), load_judge(HELDOUT)]
    policy = load_candidate("policy", cfg.model.name_or_path, cfg, None)
    t0 = time.perf_counter()
    levels = run_bon(policy.model, policy.tokenizer, prompts, reward, ex["ns"], judges, sampling)
    seconds = time.perf_counter() - t0
    points = [asdict(R.Point("bon", spec["name"], f"N={lv.n}", spec["seed"], f"n={lv.n}", lv.n, lv.kl,
                             lv.scores.get(GOLD), lv.scores.get(HELDOUT), lv.proxy, None, True, lv.mean_length,
                             {"skipped_prompts": lv.skipped_prompts, "reward_errors": lv.reward_errors}))
              for lv in levels]  # fmt: skip
    first = levels[0].mean_length or 0.0  # level 1 keeps every prompt's first sample: an unbiased mean length
    tokens = float(first * max(ex["ns"]) * len(prompts))
    result = {"points": points, "generated_tokens": tokens, "sampling_s": seconds, "eval_key": ex["eval_key"]}
    _write_json(Path(spec["folder"], "bon.json"), result)
    return 0


# The child processes fork from one server that imported these once (multiprocessing's forkserver):
# each stage starts in a fraction of a second instead of importing torch and transformers again
# (~5 s each on a busy 2-core machine), and none inherits the parent's models.
PRELOAD = ["torch", "transformers", "peft", "accelerate", "dpokit.training.loop", "dpokit.objectives.reward",
           "dpokit.objectives.sft", "dpokit.eval.generate_eval", "dpokit.rl.loop", "dpokit.apps.bon",
           "dpokit.apps.compare"]  # fmt: skip


_SERVER: list[bool] = []  # non-empty once the fork server runs


def _noop() -> None:
    pass


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, the high-water mark of its own address space (getrusage's
    ru_maxrss would also count the pages of whatever the process was forked or exec'ed from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _child(spec_path: str, log_path: str, peak_path: str) -> None:
    """A stage's process: its output goes to the log; its peak RSS is written when it ends."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        code = run_worker(spec_path)
    finally:
        Path(peak_path).write_text(json.dumps({"peak_rss_mb": _peak_rss_mb()}), encoding="utf-8")
    sys.exit(code)


def run_process(stage: Stage, folder: Path, threads: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage in a child process; its wall time and peak RSS (MB)."""
    import multiprocessing

    folder.mkdir(parents=True, exist_ok=True)
    spec = {**asdict(stage), "folder": str(folder), "threads": threads, "extra": {**stage.extra, **(extra or {})}}
    spec_path, peak_path = folder / "worker_spec.json", folder / "worker_peak.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    peak_path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    if not _SERVER:  # start the server (and its imports) before the clock runs: no stage pays for it
        ctx.set_forkserver_preload(PRELOAD)
        warm = ctx.Process(target=_noop)
        warm.start()
        warm.join()
        _SERVER.append(True)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(str(spec_path), str(folder / LOG), str(peak_path)), name=stage.name)
    proc.start()
    proc.join()
    wall = time.perf_counter() - t0
    if proc.exitcode != 0:
        tail = (folder / LOG).read_text(encoding="utf-8", errors="replace")[-3000:]
        raise DpokitError(f"stage {stage.name} failed (exit {proc.exitcode}); log {folder / LOG}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": _read_json(peak_path).get("peak_rss_mb")}


def rl_generated_tokens(folder: Path, sequences_per_step: int) -> int | None:
    """Tokens sampled by the run's rollouts: each metrics row's mean response length x the sequences
    of the steps it covers (rows log the mean over the steps since the previous row)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    total, prev = 0.0, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "response_length" in row and "step" in row:
            total += float(row["response_length"]) * sequences_per_step * (int(row["step"]) - prev)
            prev = int(row["step"])
    return round(total)


def reward_accuracy(folder: Path) -> float | None:
    """The reward model's held-out pair accuracy: its metrics.jsonl's last eval row."""
    path = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []
    found = [r["eval/reward/accuracy"] for r in rows if "eval/reward/accuracy" in r]
    return float(found[-1]) if found else None


# ---- evaluation ------------------------------------------------------------------------------
class Evaluator:
    """ONE LoRA model (each checkpoint's weights are put into it), the judges and the held-out
    prompts every model is measured with: the same sampling settings and seed for all."""

    def __init__(self, profile: Profile, settings: CompareSettings, reward_dir: Path) -> None:
        from dpokit.apps.demo import load_lora_model
        from dpokit.data.files import read_prompts
        from dpokit.eval.generate_eval import SamplingSettings
        from dpokit.eval.judges import load_judge

        cfg = policy_config(profile)
        self.model, self.tokenizer = load_lora_model(profile.model, cfg)
        self.prompts = read_prompts(settings.eval_prompts)[: profile.n_prompts]
        self.sampling = SamplingSettings(n=1, max_new_tokens=profile.max_new_tokens, temperature=settings.temperature,
                                         top_p=settings.top_p, seed=settings.seed, batch_size=profile.gen_batch_size,
                                         score_batch_size=16)  # fmt: skip
        self.proxy = load_judge(f"rm:{reward_dir}", cfg, 16)
        self.judges = [load_judge(GOLD), load_judge(HELDOUT), self.proxy]

    def measure(self, stage: Stage | None, label: str, step: int) -> R.Point:
        """Sample and judge the model as it is now (``stage`` None: the base, adapters off, KL 0)."""
        from dpokit.eval.generate_eval import ADAPTER, SELF, Candidate, measure

        base = stage is None
        cand = Candidate(label, self.model, self.tokenizer, SELF if base else ADAPTER, adapters_off=base)
        ev = measure(cand, self.prompts, self.sampling, self.judges)
        m = ev.mean_score
        extra = {"length_corr": ev.length_corr, "judge_errors": {k: len(v) for k, v in ev.errors.items()}}
        if base:
            return R.Point("base", "base", "", 0, "base", 0, ev.kl, m.get(GOLD), m.get(HELDOUT), m.get(self.proxy.name),
                           ev.kl_sem, False, ev.mean_length, extra)  # fmt: skip
        return R.Point(stage.method, stage.name, stage.setting, stage.seed, label, step, ev.kl, m.get(GOLD),
                       m.get(HELDOUT), m.get(self.proxy.name), ev.kl_sem, False, ev.mean_length, extra)  # fmt: skip

    def run(self, stage: Stage, folder: Path) -> list[R.Point]:
        """Every saved checkpoint of a training stage (`Stage.eval_steps`) and its final model."""
        from dpokit.apps.demo import load_stage_weights
        from dpokit.training import checkpoint as ckpt

        points = []
        for step in stage.eval_steps():
            label = "final" if step == stage.steps else f"step {step}"
            if label == "final":  # the saved adapter, as `dpokit train` and `dpokit rl` write it
                load_stage_weights(self.model, folder, step, final=True)
            elif stage.kind == "rl":  # an RL checkpoint also holds the value model: take the policy part
                from dpokit.rl.loop import load_policy_weights

                load_policy_weights(self.model, folder / ckpt.CHECKPOINTS / ckpt.folder_name(step))
            else:
                load_stage_weights(self.model, folder, step, final=False)
            points.append(self.measure(stage, label, step))
        return points


# ---- the pipeline ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    from dpokit.fileio import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # a crash never leaves half a file


class Pipeline:
    """Runs the stages in order, skipping finished ones, and prints one progress line per step."""

    def __init__(self, profile: Profile, settings: CompareSettings, log: Callable[[str], Any]) -> None:
        self.profile, self.settings, self.log = profile, settings, log
        self.out = Path(settings.out)
        self.start = time.perf_counter()
        self.evaluator: Evaluator | None = None
        self.index, self.total = 0, 0

    def progress(self, message: str) -> None:
        minutes = (time.perf_counter() - self.start) / 60
        self.log(f"[compare {self.index}/{self.total}, {minutes:.1f} min] {message}")

    def evaluator_for(self) -> Evaluator:
        if self.evaluator is None:  # loaded on first use: a rerun with everything finished loads no model
            self.evaluator = Evaluator(self.profile, self.settings, self.out / "reward")
        return self.evaluator

    def finished(self, stage: Stage, folder: Path) -> bool:
        from dpokit.training.outputs import read_completion

        if stage.kind == "base":  # nothing to train
            return True
        if stage.kind == "floor":  # the worker's cost is the result
            return (folder / STAGE).is_file()
        if stage.kind == "bon":  # no training: its sampling of the evaluation prompts is the stage
            return _read_json(folder / "bon.json").get("eval_key") == self.eval_key()
        return read_completion(folder) is not None

    def fingerprint(self, stage: Stage) -> list[Any]:
        """What must match for a finished stage to be reused (paths left out: --out may be spelled
        differently). The evaluation settings are not in it: a stage measured with others is measured again."""
        keep = [o for o in stage.overrides if not o.startswith(("train.output_dir=", "rl.reward="))]
        return [stage.kind, stage.preset, keep, stage.extra.get("ns"), stage.extra.get("sampling_seed")]

    def eval_key(self) -> list[Any]:
        """The evaluation's settings: an eval.json measured with others is measured again."""
        p, s = self.profile, self.settings
        return [s.eval_prompts, p.n_prompts, p.max_new_tokens, s.seed, s.temperature, s.top_p]

    def ensure(self, stage: Stage, evaluate: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Train ``stage`` unless its folder holds a finished run, evaluate it unless eval.json exists
        (with the same evaluation settings); returns its record (stage.json + eval.json, ``status``)."""
        self.index += 1
        folder = self.out / stage.name
        saved = _read_json(folder / STAGE)
        if saved and saved.get("fingerprint") != self.fingerprint(stage):
            raise DpokitError(f"{folder} holds a stage run with other settings ({STAGE}); remove the folder or "
                              "choose another --out")  # fmt: skip
        record = {**asdict(stage), **saved, "fingerprint": self.fingerprint(stage)}
        measured = _read_json(folder / EVAL)
        if self.finished(stage, folder) and measured.get("eval_key") == self.eval_key():
            self.progress(f"{stage.name}: finished earlier, skipped ({folder})")
            return {**record, **measured, "status": "reused"}
        if not self.finished(stage, folder):
            self.progress(f"{stage.name}: {_describe(stage)} ...")
            record.update(run_process(stage, folder, self.profile.threads, self.bon_extra(stage)))
            record["generated_tokens"] = self.generated_tokens(stage, folder)
            _write_json(folder / STAGE, record)
            self.progress(f"{stage.name}: ran in {record['wall_s']:.0f} s, peak RSS {record['peak_rss_mb']:,.0f} MB")
        t0 = time.perf_counter()
        result = {**evaluate(folder), "eval_key": self.eval_key()}
        result["eval_s"] = time.perf_counter() - t0
        _write_json(folder / STAGE, record)  # also for stages without a worker: the fingerprint guards reuse
        _write_json(folder / EVAL, result)
        self.progress(f"{stage.name}: evaluated in {result['eval_s']:.0f} s")
        return {**record, **result, "status": "ran"}

    def bon_extra(self, stage: Stage) -> dict[str, Any] | None:
        if stage.kind != "bon":
            return None
        p, s = self.profile, self.settings
        sampling = {"n": 1, "max_new_tokens": p.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "seed": stage.extra["sampling_seed"], "batch_size": p.gen_batch_size, "score_batch_size": 16}  # fmt: skip
        return {"prompts": s.eval_prompts, "n_prompts": p.n_prompts, "sampling": sampling, "eval_key": self.eval_key()}

    def generated_tokens(self, stage: Stage, folder: Path) -> int | float | None:
        if stage.kind == "rl":
            per_step = self.profile.rl_prompts if stage.method == "ppo" else 2 * max(1, self.profile.rl_prompts // 2)
            return rl_generated_tokens(folder, per_step)
        if stage.kind == "bon":
            return _read_json(folder / "bon.json").get("generated_tokens")
        return 0


def _describe(stage: Stage) -> str:
    if stage.kind == "floor":
        return "the runtime alone (torch, transformers, dpokit imported; no model): the floor of every peak RSS"
    what = {
        "reward": "reward model",
        "dpo": "DPO",
        "sft": "Preferred-FT",
        "rl": stage.method.upper(),
        "bon": "Best-of-N",
    }
    steps = f", {stage.steps} steps" if stage.steps else ""
    return f"{what[stage.kind]} {stage.setting} (preset {stage.preset}{steps}, seed {stage.seed})"


def _eval_pairs(preset: str, overrides: Sequence[str]) -> int:
    from dpokit.data.files import expand_files

    files = Config.from_preset(preset).override(list(overrides)).data.eval_files
    return sum(1 for f in expand_files(files) for line in open(f, encoding="utf-8") if line.strip()) if files else 0


def run_compare(settings: CompareSettings, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every stage (finished ones skipped), then results.json, report.md, plots and the doc."""
    import torch

    profile = QUICK if settings.quick else FULL
    if settings.n_prompts:
        profile = replace(profile, n_prompts=settings.n_prompts)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if profile.threads:  # the tiny model gains nothing from a second thread on a busy machine
        torch.set_num_threads(profile.threads)
    try:
        pipe = Pipeline(profile, settings, log)
        plan = build_plan(profile, settings, out)
        pipe.total = len(plan) + 3  # + runtime floor, reward model, base
        floor = pipe.ensure(Stage("floor", "floor", "floor", "", 1, "", [], 0), lambda _f: {})
        rm_stage = reward_stage(profile, out)
        rm = pipe.ensure(rm_stage, lambda f: {"accuracy": reward_accuracy(f),
                                              "eval_pairs": _eval_pairs(rm_stage.preset, rm_stage.overrides)})  # fmt: skip
        base_stage = Stage(
            "base", "base", "base", "", 1, profile.dpo_preset, [f"model.name_or_path={profile.model}"], 1
        )
        base = pipe.ensure(base_stage, lambda _f: {"points": [asdict(pipe.evaluator_for().measure(None, "base", 0))]})
        records = [pipe.ensure(st, _evaluate_stage(pipe, st)) for st in plan]
    finally:
        torch.set_num_threads(threads)
    results = assemble(settings, profile, plan, records, base, rm, floor, time.perf_counter() - pipe.start)
    written = write_outputs(results, out, Path(settings.doc) if settings.doc else None)
    log(f"[compare] done in {results['total_s'] / 60:.1f} min; " + ", ".join(written.values()))
    return results


def _evaluate_stage(pipe: Pipeline, stage: Stage) -> Callable[[Path], dict[str, Any]]:
    if stage.kind == "bon":  # measured in its worker (run_bon judges the kept responses)
        return lambda f: {"points": _read_json(f / "bon.json")["points"]}
    return lambda f: {"points": [asdict(p) for p in pipe.evaluator_for().run(stage, f)]}


# ---- results and outputs ---------------------------------------------------------------------
def _runs_text(profile: Profile, plan: Sequence[Stage], rm_steps: int, seeds: int) -> str:
    """What was trained, for the report: presets, steps and swept values."""
    parts = [f"reward model: preset {profile.reward_preset}, {rm_steps} steps"]
    for sw in PLAN:
        label = R.METHODS[sw.method][0]
        stage = next((s for s in plan if s.method == sw.method), None)
        if stage is None:
            continue
        if sw.method == "bon":
            parts.append(
                f"{label}: N = {', '.join(map(str, sw.values))} from one pass of {max(sw.values)} samples per prompt"
            )
            continue
        text = f"{label}: preset {stage.preset}, {stage.steps} steps"
        if stage.kind == "rl":
            per = profile.rl_prompts if sw.method == "ppo" else max(1, profile.rl_prompts // 2)
            text += (
                f" of {per} prompts x {1 if sw.method == 'ppo' else 2} samples, {profile.rl_max_new_tokens} new tokens"
            )
        if sw.key:
            text += f", {sw.key} = {', '.join(_value_tag(v) for v in sw.values)}"
        parts.append(text)
    parts.append(f"checkpoints measured per run: {', '.join(f'{k} {v}' for k, v in CHECKPOINTS.items())} (the last is "
                 f"the final model); {seeds} seed(s)")
    return "; ".join(parts)


def _machine() -> str:
    import platform

    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")  # fmt: skip


def assemble(
    settings: CompareSettings, profile: Profile, plan: Sequence[Stage], records: Sequence[dict[str, Any]],
    base: dict[str, Any], rm: dict[str, Any], floor: dict[str, Any], seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """results.json: settings, every stage's record and every measured point, and the analysis."""
    points = [R.Point.from_json(p) for r in records for p in r.get("points", [])]
    base_point = R.Point.from_json(base["points"][0])
    stages = [{k: v for k, v in r.items() if k not in ("points", "fingerprint")} for r in [rm, base, *records]]
    cfg = policy_config(profile)
    return {
        "command": command_line(settings), "finished": time.strftime("%Y-%m-%d %H:%M"), "total_s": seconds,
        # training + evaluation of every stage, whichever invocation ran it (a resumed run's total_s is only its own)
        "stages_total_s": sum((r.get("wall_s") or 0.0) + (r.get("eval_s") or 0.0) for r in [rm, base, *records]),
        "machine": _machine(),
        "settings": {**asdict(settings), "model": profile.model, "pairs": ", ".join(cfg.data.train_files),
                     "n_prompts": profile.n_prompts, "max_new_tokens": profile.max_new_tokens,
                     "runs": _runs_text(profile, plan, rm.get("steps", 0), settings.seeds)},
        "profile": asdict(profile),
        "reward_model": {"accuracy": rm.get("accuracy"), "eval_pairs": rm.get("eval_pairs"), "folder": str(Path(settings.out) / "reward")},
        "runtime_floor_mb": floor.get("peak_rss_mb"),
        "base": asdict(base_point), "points": [asdict(p) for p in points], "stages": stages,
        "analysis": R.analyse(points, base_point, settings.kl_budget),
    }  # fmt: skip


def write_outputs(results: dict[str, Any], out: Path, doc: Path | None) -> dict[str, str]:
    """results.json, report.md + plots in ``out``; with ``doc``, the same report there, its plots beside
    it (``<doc stem>-frontier.png``, ``<doc stem>-proxy.png``)."""
    points = [R.Point.from_json(p) for p in results["points"]]
    base = R.Point.from_json(results["base"])
    written = {"results": str(out / "results.json")}
    _write_json(out / "results.json", results)
    targets = [(out / "report.md", "")] + ([(doc, doc.stem + "-")] if doc else [])
    for md, prefix in targets:
        md.parent.mkdir(parents=True, exist_ok=True)
        plots = {"frontier": f"{prefix}frontier.png"}
        R.plot_frontier(points, base, md.parent / plots["frontier"])
        methods = [m for m in ("ppo", "bon") if R.method_points(points, m)]
        if methods:
            plots["proxy"] = f"{prefix}proxy.png"
            R.plot_proxy(points, base, md.parent / plots["proxy"], methods)
        md.write_text(R.render_doc(results, plots), encoding="utf-8")
        written[str(md)] = str(md)
    return written


# ---- CLI -------------------------------------------------------------------------------------
def command_line(settings: CompareSettings) -> str:
    """The `dpokit compare` command that regenerates these results (the options that differ from the defaults)."""
    d = CompareSettings()
    args = ["dpokit", "compare"] + (["--quick"] if settings.quick else [])
    for name in ("out", "seeds", "eval_prompts", "n_prompts", "seed", "kl_budget"):
        value = getattr(settings, name)
        if value != getattr(d, name):
            args += [f"--{name.replace('_', '-')}", str(value)]
    if settings.doc != (None if settings.quick else DEFAULT_DOC):
        args += ["--doc", settings.doc] if settings.doc else ["--no-doc"]
    return shlex.join(args)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit compare` options to ``parser`` (nothing heavy is imported)."""
    d = CompareSettings()
    add = parser.add_argument
    add("--out", default=d.out, help=f"folder of the stages, results.json, report.md and plots (default: {d.out})")
    add("--doc", default=None, metavar="PATH",
        help=f"also write the report here, plots beside it (default: {DEFAULT_DOC}; none with --quick)")  # fmt: skip
    add("--no-doc", action="store_true", help="write no report outside --out")
    add("--quick", action="store_true", help="every stage on the tiny random model, a few steps each (~20-40 s)")
    add("--seeds", type=int, default=d.seeds, choices=[1, 2], help="training seeds per run (2: the seed spread)")
    add("--eval-prompts", default=d.eval_prompts, help="held-out prompts (.jsonl)")
    add("--n-prompts", type=int, default=None, help="held-out prompts per evaluation (default 64; --quick 6)")
    add("--seed", type=int, default=d.seed, help="the sampling seed of every evaluation")
    add("--kl-budget", type=float, default=None, metavar="NATS",
        help="best gold within this KL in the verdict (default: the smallest within which every method has a checkpoint)")  # fmt: skip


def compare_command(args: argparse.Namespace) -> int:
    """Run `dpokit compare` from parsed arguments; returns the exit status."""
    if args.n_prompts is not None and args.n_prompts < 1:
        raise DpokitError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    doc = None if args.no_doc else args.doc or (None if args.quick else DEFAULT_DOC)
    settings = CompareSettings(out=args.out, doc=doc, quick=args.quick, seeds=args.seeds, eval_prompts=args.eval_prompts,
                               n_prompts=args.n_prompts, seed=args.seed, kl_budget=args.kl_budget)  # fmt: skip
    run_compare(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dpokit.apps.compare [options]`: the command without the `dpokit` CLI."""
    parser = argparse.ArgumentParser(prog="dpokit compare", description=__doc__.split("\n", 1)[0])
    add_compare_arguments(parser)
    return compare_command(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":  # pragma: no cover
    # run from the module by its package name: the child processes find `_child` there, not in __main__
    from dpokit.apps.compare import main as _main

    sys.exit(_main())
