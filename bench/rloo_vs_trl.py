"""dpokit RLOO (`dpokit rl`, rl.algorithm=rloo) vs TRL's `RLOOTrainer` on the same tiny task: the tiny random
Llama (alias tiny-random-llama, one model folder for both), the prompts of builtin:toy/train.jsonl, the toy
reward `dpokit.rl.toy:letter_e`, full fine-tuning in fp32, settings matched as closely as the two designs
allow. Each run is its own subprocess; the tools alternate (dpokit, TRL, dpokit, TRL, ...) seed by seed.
Prints a markdown table and writes docs/benchmarks-rloo.md.

    .venv/bin/python bench/rloo_vs_trl.py                        # 30 steps, seeds 0-2 (~2 min on 2 CPU cores)
    .venv/bin/python bench/rloo_vs_trl.py --steps 3 --seeds 0 --out /tmp/r.md --json /tmp/r.json   # smoke run

Per run: the mean toy reward over steps 1-5 and over the last 5 steps (dpokit: metrics.jsonl
`objective/scores` with train.log_every=1; TRL: the log history's `reward`, logging_steps=1; both the mean
raw reward of the step's rollout, KL penalty not included), the wall time per step (interval between two
consecutive step ends; median, first step excluded), the peak RSS of the worker process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/rloo_vs_trl.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

REPO = common.REPO
PROMPTS = "builtin:toy/train.jsonl"
REWARD = "dpokit.rl.toy:letter_e"
TOOLS = ("dpokit", "trl")
COMMAND = ".venv/bin/python bench/rloo_vs_trl.py"


@dataclass
class Spec:
    """One worker run; the shared workload settings are the same for both tools."""

    tool: str  # dpokit | trl
    seed: int
    steps: int
    model_dir: str
    run_dir: str
    threads: int = 0  # torch threads, 0 = torch's default
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_new_tokens: int = 12
    temperature: float = 1.0
    lr: float = 3e-3
    kl_coef: float = 0.01
    cliprange: float = 0.2
    max_grad_norm: float = 1.0
    whiten: bool = True

    @property
    def rollout(self) -> int:
        """Completions per RL step (= per optimizer step on both sides)."""
        return self.prompts_per_step * self.samples_per_prompt


# ---- the two sides' settings ----------------------------------------------------------------------
def dpokit_overrides(spec: Spec) -> list[str]:
    """Preset rl-tiny with these overrides: RLOO, one optimizer step per rollout, log every step."""
    return [
        f"model.name_or_path={spec.model_dir}", "model.dtype=float32", "lora.enabled=false",
        "rl.algorithm=rloo", f"rl.prompt_files=[{PROMPTS}]", f"rl.reward={REWARD}",
        f"rl.samples_per_prompt={spec.samples_per_prompt}", f"rl.prompts_per_step={spec.prompts_per_step}",
        f"rl.max_new_tokens={spec.max_new_tokens}", f"rl.temperature={spec.temperature}",
        f"rl.kl_coef={spec.kl_coef}", "rl.kl_target=null", "rl.kl_estimator=k1", "rl.missing_eos_penalty=null",
        "rl.ppo_epochs=1", "rl.num_minibatches=1", f"rl.cliprange={spec.cliprange}",
        f"rl.whiten_advantages={str(spec.whiten).lower()}",
        f"train.output_dir={Path(spec.run_dir) / 'out'}", "train.overwrite=true", f"train.max_steps={spec.steps}",
        f"train.lr={spec.lr}", "train.scheduler=constant", "train.warmup_steps=0", "train.optimizer=adamw",
        "train.weight_decay=0.0", f"train.max_grad_norm={spec.max_grad_norm}", f"train.seed={spec.seed}",
        f"train.micro_batch_size={spec.rollout}", f"train.eval_batch_size={spec.rollout}", "train.log_every=1",
        "train.save_every=0", "train.progress_bar=false", 'train.mixed_precision="no"',  # quoted: YAML reads no as false
    ]  # fmt: skip


def trl_kwargs(spec: Spec) -> dict[str, Any]:
    """RLOOConfig keyword arguments: 16 completions (8 prompts x 2) per generation batch and per optimizer step."""
    return dict(
        output_dir=str(Path(spec.run_dir) / "out"), max_steps=spec.steps, seed=spec.seed,
        per_device_train_batch_size=spec.rollout, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=spec.samples_per_prompt, max_completion_length=spec.max_new_tokens,
        temperature=spec.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec.max_grad_norm, beta=spec.kl_coef, epsilon=spec.cliprange,
        normalize_advantages=spec.whiten, mask_truncated_completions=False, disable_dropout=True,
        bf16=False, activation_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def trl_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """`letter_e` in TRL's reward-function signature; conversational completions are [{role, content}]."""
    from dpokit.rl.toy import letter_e

    texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
    return letter_e(texts)


# ---- workers (one subprocess each) ----------------------------------------------------------------
def _clock() -> tuple[float, float]:
    """(wall, this process's CPU time): the CPU time is less sensitive to other load on a shared machine."""
    return time.perf_counter(), time.process_time()


def _intervals(stamps: list[tuple[float, float]], t0: float) -> dict[str, Any]:
    """Per-step wall and CPU seconds from the clock readings at the start and after each step."""
    return {"setup_s": stamps[0][0] - t0,
            "step_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
            "cpu_s": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]}  # fmt: skip


def run_dpokit(spec: Spec) -> dict[str, Any]:
    """`train_rl` with `loop._step` timed from the outside (dpokit itself is not changed)."""
    from dpokit.config import Config
    from dpokit.rl import loop

    cfg = Config.from_preset("rl-tiny").override(dpokit_overrides(spec))
    stamps: list[tuple[float, float]] = []
    inner = loop._step

    def timed_step(run: Any, state: Any, step: int) -> None:
        if not stamps:
            stamps.append(_clock())  # the start of step 1
        inner(run, state, step)
        stamps.append(_clock())

    loop._step = timed_step  # type: ignore[assignment]
    t0 = time.perf_counter()
    result = loop.train_rl(cfg, log=lambda msg: print(msg, flush=True))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        **_intervals(stamps, t0),
        "reward": [r["objective/scores"] for r in rows],
        # objective/kl is the mean sequence KL: / the mean length = TRL's per-token kl (sum over tokens / count)
        "kl_token": [r["objective/kl"] / max(r["response_length"], 1e-9) for r in rows],
        "length": [r["response_length"] for r in rows],
        "grad_norm": [r.get("grad_norm", math.nan) for r in rows],
        "rollout_s": [r.get("time/rollout", math.nan) for r in rows],
        "resolved": {"samples": cfg.rl.samples(), "prompts_per_step": cfg.rl.prompts_per_step,
                     "micro_batch_size": cfg.train.micro_batch_size, "optimizer": cfg.train.optimizer},
    }  # fmt: skip


def run_trl(spec: Spec) -> dict[str, Any]:
    """TRL's RLOOTrainer through its public API; a callback time-stamps each optimizer step's end."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from dpokit.data.files import read_prompts

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # conversational prompts: TRL applies the chat template, as dpokit's sampler does (render_prompt)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in read_prompts(PROMPTS)]
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(_clock())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(_clock())

    args = RLOOConfig(**trl_kwargs(spec))
    trainer = RLOOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[StepClock()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        **_intervals(stamps, t0),
        "reward": [h["reward"] for h in logs],
        "kl_token": [h.get("kl", math.nan) for h in logs],
        "length": [h.get("completions/mean_length", math.nan) for h in logs],
        "grad_norm": [h.get("grad_norm", math.nan) for h in logs],
        "rollout_s": [],
        "resolved": {"generation_batch_size": args.generation_batch_size, "steps_per_generation":
                     args.steps_per_generation, "optim": str(args.optim), "bf16": args.bf16,
                     "activation_checkpointing": args.activation_checkpointing, "top_k": args.top_k},
    }  # fmt: skip


def worker_main(payload: str) -> int:
    """Run one spec in this process and print its result line."""
    spec = Spec(**json.loads(payload))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    out = run_dpokit(spec) if spec.tool == "dpokit" else run_trl(spec)
    out.update(ok=True, peak_rss=common.peak_rss_bytes())
    common.emit_result(out)
    return 0


def launch(spec: Spec, timeout: int) -> dict[str, Any]:
    """One worker subprocess; its result line, or ok=False with the reason (the log is kept)."""
    from bench.compare import worker_env

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(run_dir, None), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    (run_dir / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    result = common.parse_result(proc.stdout)
    if result is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail}"[:600]}
    result["process_s"] = time.perf_counter() - t0
    result["log"] = str(run_dir / "log.txt")
    return result


# ---- summary and report ---------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def summarize(r: dict[str, Any], window: int = 5) -> dict[str, float]:
    """The numbers of one run: rewards over the first / last ``window`` steps, step time, memory."""
    rw = r["reward"]
    return {
        "reward_first": _mean(rw[:window]), "reward_last": _mean(rw[-window:]),
        "kl_last": _mean(r["kl_token"][-window:]), "len_last": _mean(r["length"][-window:]),
        "grad_norm": _mean(r["grad_norm"]),
        "step_s": _median(r["step_s"][1:]), "cpu_s": _median(r["cpu_s"][1:]),
        "setup_s": r["setup_s"], "train_s": sum(r["step_s"]), "peak_rss": float(r["peak_rss"]),
        "steps": float(len(rw)),
    }  # fmt: skip


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def tables(runs: list[dict[str, Any]]) -> str:
    """The summary table (mean over seeds per tool) and the table of every run."""
    head = (
        "| tool | seeds | reward steps 1-5 | reward last 5 | gain | KL/token last 5 | length last 5 "
        "| grad norm (pre-clip) | step s (median) | CPU s / step | peak RSS |"
    )
    lines = [head, "|" + "---|" * 11]
    for tool in TOOLS:
        ok = [r["summary"] for r in runs if r["tool"] == tool and r["result"].get("ok")]
        if not ok:
            lines.append(f"| {tool} | 0 | failed |" + " - |" * 8)
            continue
        m = {k: _mean([s[k] for s in ok]) for k in ok[0]}
        lines.append(f"| {tool} | {len(ok)} | {_fmt(m['reward_first'])} | {_fmt(m['reward_last'])} "
                     f"| {_fmt(m['reward_last'] - m['reward_first'], 4)} | {_fmt(m['kl_last'])} | {_fmt(m['len_last'], 1)} "
                     f"| {_fmt(m['grad_norm'], 3)} | {_fmt(m['step_s'], 3)} | {_fmt(m['cpu_s'], 3)} "
                     f"| {common.fmt_bytes(m['peak_rss'])} |")  # fmt: skip
    lines += ["", "| tool | seed | steps | reward 1-5 | reward last 5 | KL/token last 5 | step s | CPU s / step "
              "| train s | process s | peak RSS |", "|" + "---|" * 11]  # fmt: skip
    for r in runs:
        if not r["result"].get("ok"):
            error = str(r["result"].get("error", "?")).replace("|", "/")
            lines.append(f"| {r['tool']} | {r['seed']} | failed: {error} |" + " |" * 8)
            continue
        s = r["summary"]
        lines.append(f"| {r['tool']} | {r['seed']} | {int(s['steps'])} | {_fmt(s['reward_first'])} "
                     f"| {_fmt(s['reward_last'])} | {_fmt(s['kl_last'])} | {_fmt(s['step_s'], 3)} | {_fmt(s['cpu_s'], 3)} "
                     f"| {_fmt(s['train_s'], 1)} | {_fmt(r['result']['process_s'], 1)} "
                     f"| {common.fmt_bytes(s['peak_rss'])} |")  # fmt: skip
    return "\n".join(lines)


def verdict(runs: list[dict[str, Any]]) -> str:
    """One paragraph of ratios (TRL / dpokit) and the reward gains against their spread over seeds."""
    by = {t: [r["summary"] for r in runs if r["tool"] == t and r["result"].get("ok")] for t in TOOLS}
    if not all(by.values()):
        return "(a tool failed: no ratios)"

    def avg(tool: str, key: str) -> float:
        return _mean([s[key] for s in by[tool]])

    def gains(tool: str) -> str:
        g = [s["reward_last"] - s["reward_first"] for s in by[tool]]
        return f"{_fmt(_mean(g))} (seeds {', '.join(_fmt(x) for x in g)})"

    ratio = {k: common.ratio(avg("trl", k), avg("dpokit", k)) for k in ("step_s", "cpu_s", "peak_rss")}
    return (f"TRL / dpokit: wall time per step {common.fmt_ratio(ratio['step_s'])}, CPU time per step "
            f"{common.fmt_ratio(ratio['cpu_s'])}, peak RSS {common.fmt_ratio(ratio['peak_rss'])}. Reward gain over "
            f"the run: dpokit {gains('dpokit')}, TRL {gains('trl')}.")  # fmt: skip


def curve(runs: list[dict[str, Any]], window: int = 5) -> str:
    """Mean reward per window of steps, each tool averaged over its seeds: how the learning goes."""
    ok = [r for r in runs if r["result"].get("ok")]
    n = max((len(r["result"]["reward"]) for r in ok), default=0)
    spans = [(a, min(a + window, n)) for a in range(0, n, window)]
    lines = ["| tool | " + " | ".join(f"steps {a + 1}-{b}" for a, b in spans) + " |", "|" + "---|" * (len(spans) + 1)]
    for tool in TOOLS:
        mine = [r["result"]["reward"] for r in ok if r["tool"] == tool]
        if mine:
            cells = [_fmt(_mean([_mean(rw[a:b]) for rw in mine])) for a, b in spans]
            lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


UNMATCHED = """\
* **Policy-gradient loss.** TRL 1.16's RLOO uses one importance ratio per *sequence*,
  exp(sum_t log pi - sum_t log pi_old), clipped at 1 +- epsilon, and averages the loss over sequences; dpokit
  uses per-*token* ratios, clipped per token, and the token mean over the minibatch. With one update per rollout
  (`num_iterations=1` / `rl.ppo_epochs=1`, one minibatch) every ratio is 1 at the update, nothing is clipped, and
  both gradients are sum_i A_i sum_t grad log pi(y_it) up to a constant: 1/N (TRL, N = 16 sequences) vs 1/T
  (dpokit, T = the rollout's response tokens, ~12 x N here). The direction is the same; the norm is ~12x
  smaller on dpokit's side, so `max_grad_norm=1.0` clips TRL's gradient more often than dpokit's (the *grad
  norm* column: pre-clip norms). AdamW divides out a constant scale, not the clipping nor the step-to-step
  change of T.
* **KL penalty: matched.** Both subtract coef x sum_t (log pi_old(y_t) - log pi_ref(y_t)) (the k1 estimator,
  summed over the response, from a no-grad forward of the rollout-time policy and of the frozen reference) from
  the sequence reward *before* the leave-one-out baseline: dpokit `rl.kl_coef=0.01` with `rl.kl_estimator=k1`,
  TRL `beta=0.01` (TRL 1.16's RLOO always uses k1 here; its GRPO puts a k3 term into the loss instead). Logged
  differently: TRL's `kl` is the per-token mean, dpokit's `objective/kl` the mean sequence sum; the table shows
  both per token (dpokit's divided by its mean response length, which is the same ratio of sums).
* **Advantage normalisation: matched up to epsilon.** Both whiten the RLOO advantages over the 16-completion
  batch (dpokit `rl.whiten_advantages=true`: (A - mean) / sqrt(var + 1e-8); TRL `normalize_advantages=true`,
  not its default: (A - mean) / (std + 1e-4); both with Bessel's correction).
* **Which prompts, which random numbers.** Same 400 prompts, 8 per step, but dpokit takes consecutive slices
  of a seeded per-epoch permutation (`dpokit.rl.loop.step_prompts`) and seeds its sampler per step
  (seed x 7919 + step, in a forked RNG), while TRL's `RepeatSampler` shuffles with the seed and generation draws
  from the global RNG. The same seed therefore gives different rollouts on the two sides: compare the seeds'
  spread, not seed by seed.
* **Generation.** Both call transformers `generate` (temperature 1, top-p 1, top-k off, no repetition penalty,
  EOS from the model's generation config + the tokenizer, 12 new tokens at most) on left-padded chat-templated
  prompts; dpokit prefills each prompt once for its 2 samples and copies the KV cache (`share_prompt_cache`),
  TRL prefills each of the 16 rows; the sampled distribution is the same, the cost is not.
* **Log-probs and entropy.** TRL computes log-probs through its fused, chunked LM head and the entropy in the
  training forward; dpokit gathers the response positions' logits and computes the entropy in the no-grad
  rollout forward. Same values up to float noise; different cost.
* **Trainer machinery.** TRL runs inside transformers' `Trainer` (accelerate, a dataloader, `RepeatSampler`,
  callbacks); dpokit's loop is its own. The step time includes everything between two step ends on each side
  (generation, reward, the no-grad forwards, the update, logging one metrics row).
"""


def render(args: argparse.Namespace, spec: Spec, runs: list[dict[str, Any]], env: dict[str, Any], total_s: float,
           command: str) -> str:  # fmt: skip
    """docs/benchmarks-rloo.md."""
    trl_res = next((r["result"]["resolved"] for r in runs if r["tool"] == "trl" and r["result"].get("ok")), {})
    kw = {k: ("SEED" if k == "seed" else repr(v)) for k, v in trl_kwargs(spec).items() if k != "output_dir"}
    ovr = [o if not o.startswith("train.seed=") else "train.seed=SEED" for o in dpokit_overrides(spec)
           if not o.startswith(("model.name_or_path", "train.output_dir"))]  # fmt: skip
    return f"""# Benchmark: dpokit RLOO vs TRL RLOOTrainer

Generated by (do not edit by hand; rerun the command):

    {command}

{dt.datetime.now():%Y-%m-%d %H:%M}, {total_s / 60:.1f} min. Device: **cpu** ({env["cpu"]}; {env["cpu_count"]} CPU cores,
torch threads per worker {args.threads or env["torch_threads"]}), shared with other processes. torch {env["torch"]}, transformers
{env["transformers"]}, TRL {env["trl"]}, Python {env["python"]}. Seeds {", ".join(map(str, args.seeds))}; {args.steps}
RL steps each; the tools alternate, one subprocess per run. One torch thread per worker by default: with 2 threads
on this shared 2-core machine the step times swung 3x with the other load (the rewards do not depend on it).

## Results (mean over seeds)

Reward: the toy reward `letter_e` (share of the letter e among a response's letters), mean over the step's 16
completions, KL penalty not included (dpokit `objective/scores`, TRL `reward`); gain = last 5 - steps 1-5.
KL/token: sum of k1 over the response tokens / their count. Step s: the median wall interval between two
consecutive step ends (generation, reward, the no-grad forwards, the update, one log row), step 1 excluded; CPU
s / step: the same for the worker's CPU time, less sensitive to the other load on this shared machine. Train s:
all step intervals; process s: the whole worker (imports, model loading, dpokit's final save). Peak RSS: the
worker's high-water mark (policy, reference copy, optimizer, Python + imports). With 16 completions a step the
reward of one step is noisy (+-0.01): read the gains against the spread between seeds.

{tables(runs)}

{verdict(runs)}

Mean reward by steps (mean over seeds):

{curve(runs)}

## Task and settings

* model: `tiny-random-llama` (dpokit's builtin random Llama: hidden 64, 2 layers, the shipped 1000-token
  tokenizer with a chat template), one folder loaded by both tools, fp32, full fine-tuning, a frozen reference copy.
* prompts: `{PROMPTS}` (the `prompt` field, 400 prompts), as one user turn of the chat template; both tools
  tokenize them to the same ids (at most 19 tokens: dpokit's `rl.max_prompt_length=64` skips none, TRL has no limit).
* reward: `{REWARD}`; TRL gets it wrapped as `reward_funcs(prompts, completions, **kw) -> list[float]`
  (`bench.rloo_vs_trl.trl_reward`, which reads the assistant message's text).
* per RL step = per optimizer step: 8 prompts x 2 samples = 16 completions, one update on them.

dpokit: `Config.from_preset("rl-tiny")` with overrides

    {chr(10).join("    " + o if i else o for i, o in enumerate(ovr))}

TRL: `RLOOConfig(...)`

    {chr(10).join(("    " if i else "") + f"{k}={v}" for i, (k, v) in enumerate(kw.items()))}

TRL resolved: {", ".join(f"{k}={v}" for k, v in trl_res.items())}.

## What could not be matched

{UNMATCHED}
## Reproduce

    {COMMAND}

(`--steps`, `--seeds`, `--threads`, `--out`, `--json`: see `--help`.)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="RL steps (= optimizer steps) per run")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[0, 1, 2],
                    help="comma list of seeds; each seed runs both tools")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each worker (0 = torch's default); 1: "
                    "on a shared 2-core machine 2 threads made step times swing 3x with other load")  # fmt: skip
    ap.add_argument("--out", default="docs/benchmarks-rloo.md", help="markdown report ('' = none)")
    ap.add_argument("--json", default="", help="also write every run's raw result here")
    ap.add_argument("--run-root", default="runs/bench/rloo", help="scratch folder for the workers")
    ap.add_argument("--timeout", type=int, default=900, help="seconds before a worker is killed")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    from dpokit.models.sources import resolve_source

    t_begin = time.perf_counter()
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([COMMAND, *(shlex.quote(a) for a in given)])
    model_dir = str(resolve_source("tiny-random-llama").path)  # materialised once, loaded by both tools
    root = (REPO / args.run_root / dt.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    print(f"# {command}\n# model {model_dir}\n# runs in {root}", flush=True)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for tool in TOOLS:
            spec = Spec(tool, seed, args.steps, model_dir, str(root / f"{tool}-seed{seed}"), args.threads)
            result = launch(spec, args.timeout)
            run = {"tool": tool, "seed": seed, "result": result}
            if result.get("ok"):
                run["summary"] = summarize(result)
                s = run["summary"]
                print(f"{tool} seed {seed}: reward {s['reward_first']:.4f} -> {s['reward_last']:.4f}, "
                      f"step {s['step_s']:.3f} s, peak RSS {common.fmt_bytes(s['peak_rss'])}", flush=True)  # fmt: skip
            else:
                print(f"{tool} seed {seed}: FAILED: {result.get('error')} (log {result.get('log')})", flush=True)
            runs.append(run)
    total_s = time.perf_counter() - t_begin
    print("\n" + tables(runs) + "\n\n" + curve(runs))
    spec0 = Spec("", 0, args.steps, model_dir, "", args.threads)
    if args.out:
        out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(args, spec0, runs, common.environment("cpu"), total_s, command), encoding="utf-8")
        print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "runs": runs}, indent=1), encoding="utf-8")
    return 0 if all(r["result"].get("ok") for r in runs) else 3


if __name__ == "__main__":
    sys.exit(main())
