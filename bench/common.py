"""Shared, dependency-light helpers of the dpokit-vs-TRL benchmark (no torch import at module level).

* the run spec both workers read, and the one-line JSON result protocol;
* the model-FLOP count (docs/benchmarks.md, "FLOP count", states the same formula);
* memory / environment probes;
* aggregation (median, ratio) and the markdown tables.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bench" / "pairs.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the run spec ---------------------------------------------------------------------------------
@dataclass
class Spec:
    """Everything that defines one worker run; identical for both tools except `tool`, `mode`, `extra`."""

    tool: str  # dpokit | trl
    mode: str  # defaults | best
    workload: str  # e.g. smollm2-lora
    model_dir: str
    data: str
    run_dir: str
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights + bf16 autocast) | bf16-mixed (fp32 weights + autocast)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    micro_batch: int = 2
    grad_accum: int = 1
    max_length: int = 1024
    warmup_steps: int = 1
    timed_steps: int = 3
    beta: float = 0.1
    lr: float = 1e-6
    seed: int = 0
    threads: int = 0  # 0 = torch's default
    extra: list[str] = field(default_factory=list)  # dpokit overrides / TRL DPOConfig key=value

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def pairs_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


def emit_result(result: dict[str, Any]) -> None:
    """The worker's one machine-readable line on stdout."""
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The last result line of a worker's stdout, or None."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            found = json.loads(line[len(RESULT_PREFIX):])
    return found


def subset_rows(path: str | Path, n: int) -> list[dict[str, Any]]:
    """The first n rows of the preference file (cycled if it has fewer): the pairs both tools train on."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


# ---- FLOP count -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """The matmul shape of a decoder-only transformer (Llama family)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Arch:
        heads = cfg["num_attention_heads"]
        return cls(
            n_layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
        )

    def layer_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def decoder_params(self) -> int:
        """N: weights of all decoder-layer matmuls (embeddings, norms and the LM head excluded)."""
        return self.n_layers * sum(a * b for a, b in self.layer_linear_shapes().values())

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def lora_params(self, r: int, targets: Sequence[str] = LORA_TARGETS) -> int:
        shapes = self.layer_linear_shapes()
        return self.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def forward_flops(arch: Arch, seq_len: int, scored: int) -> float:
    """Model FLOPs of one forward over one sequence of `seq_len` tokens with `scored` response tokens.

    2*N per token for the decoder matmuls, 2*L^2*d_attn per layer for causal attention scores and
    values (QK^T and AV each cost L^2/2 * d_attn multiply-adds), and 2*V*H per *scored* token for the
    LM head (only response positions need logits).
    """
    d_attn = arch.n_heads * arch.head_dim
    return (2.0 * arch.decoder_params * seq_len + 2.0 * arch.n_layers * d_attn * seq_len**2
            + 2.0 * arch.head_params * scored)


def pair_train_flops(arch: Arch, prompt: int, chosen: int, rejected: int, lora_r: int | None,
                     ref_forward: bool) -> float:
    """Model FLOPs to train on one pair: policy forward + backward on both rows, plus the reference
    forward when it runs inside the step.

    full fine-tuning: 3 F (forward F, backward 2 F: input grads + weight grads);
    LoRA: 2 F + 6 N_lora L (backward only needs input grads through the frozen base; adapters add
    forward, input-grad and weight-grad matmuls); reference: + F. Recomputation by gradient
    checkpointing is not counted (model FLOPs, not hardware FLOPs).
    """
    total = 0.0
    for resp in (chosen, rejected):
        seq = prompt + resp
        f = forward_flops(arch, seq, resp)
        if lora_r:
            total += 2.0 * f + 6.0 * arch.lora_params(lora_r) * seq
        else:
            total += 3.0 * f
        if ref_forward:
            total += f
    return total


def logical_tokens(prompt: int, chosen: int, rejected: int) -> int:
    """Tokens of the work a pair stands for: prompt+chosen and prompt+rejected, without padding."""
    return 2 * prompt + chosen + rejected


# ---- probes ---------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss as fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, for the report header (imports torch & friends)."""
    from importlib import metadata

    import torch

    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "trl": ver("trl"),
        "peft": ver("peft"),
        "accelerate": ver("accelerate"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


# ---- aggregation & tables ---------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of the repeats, as a fraction: how much the A/B repeats disagree."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) < 2:
        return 0.0
    m = statistics.median(vals)
    return (max(vals) - min(vals)) / m if m else float("nan")


def fmt_num(x: float | None, digits: int = 3) -> str:
    """Human-readable number: 3 significant digits with k/M/G/T suffixes; '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def fmt_ratio(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summarize(runs: list[dict[str, Any]], peaks: dict[str, float]) -> dict[str, Any]:
    """Medians over the repeats of one (workload, mode, tool), with MFU against the measured peak."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": (runs[-1].get("error") if runs else "no run")}
    s: dict[str, Any] = {"ok": True, "n": len(ok)}
    for key in ("pairs_per_s", "tokens_per_s", "flops_per_s", "peak_mem_bytes", "plan_bytes", "setup_s", "step_s"):
        s[key] = median([r.get(key, float("nan")) for r in ok])
    s["tokens_spread"] = spread([r["tokens_per_s"] for r in ok])
    peak = peaks.get(ok[0].get("matmul_dtype", "fp32"))
    s["mfu"] = ratio(s["flops_per_s"], peak) if peak else float("nan")
    s["flags"] = ok[0].get("flags", [])
    s["mem_kind"] = ok[0].get("mem_kind", "")
    return s


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per (workload, mode) with both tools and dpokit/TRL ratios.

    Each row dict: workload, mode, dpokit (summary), trl (summary).
    """
    head = ("| workload | mode | dpokit pairs/s | TRL pairs/s | dpokit tok/s | TRL tok/s | **tok/s ratio** "
            "| dpokit MFU | TRL MFU | dpokit peak mem | TRL peak mem | mem ratio | dpokit plan (error) | spread d/T |")
    lines = [head, "|" + "---|" * 14]
    for row in rows:
        d, t = row["dpokit"], row["trl"]

        def get(s: dict[str, Any], k: str) -> float:
            return s.get(k, float("nan")) if s.get("ok") else float("nan")

        mfu = lambda s: "-" if not s.get("ok") or math.isnan(s["mfu"]) else f"{100 * s['mfu']:.1f}%"  # noqa: E731
        spr = "/".join("-" if not s.get("ok") else f"{100 * s['tokens_spread']:.0f}%" for s in (d, t))
        lines.append(
            f"| {row['workload']} | {row['mode']} | {fmt_num(get(d, 'pairs_per_s'))} | {fmt_num(get(t, 'pairs_per_s'))} "
            f"| {fmt_num(get(d, 'tokens_per_s'))} | {fmt_num(get(t, 'tokens_per_s'))} "
            f"| **{fmt_ratio(ratio(get(d, 'tokens_per_s'), get(t, 'tokens_per_s')))}** | {mfu(d)} | {mfu(t)} "
            f"| {fmt_bytes(get(d, 'peak_mem_bytes'))} | {fmt_bytes(get(t, 'peak_mem_bytes'))} "
            f"| {fmt_ratio(ratio(get(d, 'peak_mem_bytes'), get(t, 'peak_mem_bytes')))} "
            f"| {_plan_cell(get(d, 'plan_bytes'), get(d, 'peak_mem_bytes'))} | {spr} |"
        )
    return "\n".join(lines)


def _plan_cell(plan: float, peak: float) -> str:
    """dpokit's memory plan and its error against the measured peak: "2.71 GiB (+4%)"."""
    if plan is None or peak is None or math.isnan(plan) or math.isnan(peak) or not peak:
        return "-"
    return f"{fmt_bytes(plan)} ({100 * (plan / peak - 1):+.0f}%)"


def failures(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        for tool in ("dpokit", "trl"):
            s = row[tool]
            if not s.get("ok"):
                out.append(f"{row['workload']} / {row['mode']} / {tool}: {s.get('error', 'failed')}")
    return out
