"""Benchmark workers: each runs one tool in its own process and prints one `BENCH_RESULT {json}` line.

`finish` turns what a worker observed (step-end timestamps and the token counts of each step's pairs)
into the numbers both tools report the same way.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def prepare(spec: Any) -> tuple[bool, Path, list[dict[str, Any]]]:
    """What every worker does first: torch threads, the run folder and this run's pairs.

    Returns (on CUDA?, run folder, the first steps x pairs_per_step rows of the data file).
    """
    import torch

    from bench import common

    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return spec.device == "cuda", run_dir, common.subset_rows(spec.data, spec.steps * spec.pairs_per_step)


def main(tool: str, run: Callable[[Any], dict[str, Any]], argv: list[str], t_start: float) -> int:
    """A worker's entry point: run the tool on the spec in argv[0] and print one result line.
    A failure is reported as a result line too, so the comparison never hangs on a worker."""
    from bench import common

    spec = common.Spec.from_json(argv[0])
    try:
        raw = run(spec)
    except Exception as exc:
        traceback.print_exc()
        common.emit_result({"ok": False, "tool": tool, "mode": spec.mode, "workload": spec.workload,
                            "error": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    common.emit_result(finish(spec, raw, t_start))
    return 0


def finish(spec: Any, raw: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Throughput over steps warmup+1 .. warmup+timed: wall time from the end of the last warm-up
    step to the end of the last step; pairs and logical tokens of exactly those steps."""
    from bench import common

    stamps = raw["stamps"]
    w = spec.warmup_steps
    if w < 1:
        raise ValueError("warmup_steps must be >= 1 (the timed window starts at the end of a step)")
    elapsed = stamps[-1] - stamps[w - 1]
    timed = raw["steps_pairs"][w:]
    pairs = [p for step in timed for mb in step for p in mb]
    if len(pairs) != spec.timed_steps * spec.pairs_per_step:
        raise RuntimeError(f"timed steps hold {len(pairs)} pairs, expected {spec.timed_steps * spec.pairs_per_step}")
    tokens = sum(common.logical_tokens(*p) for p in pairs)
    arch = common.Arch.from_config(json.loads((Path(spec.model_dir) / "config.json").read_text()))
    lora_r = spec.lora_r if spec.lora else None
    flops = sum(common.pair_train_flops(arch, *p, lora_r=lora_r, ref_forward=raw["ref_forward"]) for p in pairs)
    all_pairs = [p for step in raw["steps_pairs"] for mb in step for p in mb]
    step_times = [b - a for a, b in zip(stamps[w - 1:], stamps[w:])]
    if spec.device == "cuda":
        import torch

        peak, mem_kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, mem_kind = common.peak_rss_bytes(), "peak RSS (VmHWM)"
    return {
        "ok": True,
        "tool": spec.tool,
        "mode": spec.mode,
        "workload": spec.workload,
        "precision": spec.precision,
        "matmul_dtype": "fp32" if spec.precision == "fp32" else "bf16",
        "steps_timed": spec.timed_steps,
        "pairs_timed": len(pairs),
        "tokens_timed": tokens,
        "time_s": elapsed,
        "pairs_per_s": len(pairs) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "flops_timed": flops,
        "flops_per_s": flops / elapsed,
        "step_s": elapsed / spec.timed_steps,
        "step_times": [round(s, 4) for s in step_times],
        "setup_s": stamps[0] - raw["t_train"] - (elapsed / spec.timed_steps),  # load, tokenize, precompute
        "wall_s": time.perf_counter() - t_start,
        "peak_mem_bytes": peak,
        "plan_bytes": raw.get("plan_bytes", float("nan")),  # dpokit's memory plan of the batches it ran
        "mem_kind": mem_kind,
        "ref_forward": raw["ref_forward"],
        "flags": raw["flags"],
        "resolved": raw.get("resolved", {}),
        "run_tokens": sum(common.logical_tokens(*p) for p in all_pairs),
        "run_pairs": len(all_pairs),
    }
