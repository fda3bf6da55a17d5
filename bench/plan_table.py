"""The README's per-strategy memory table: dpokit's memory plan for Llama 1B / 8B / 70B on GPUs.

    python bench/plan_table.py [--gpus 8] [--pairs 4] [--length 1024]

No weights and no GPU needed: the shapes are the published configs of Llama-3.2-1B, Llama-3.1-8B
and Llama-3.1-70B, the batch is `--pairs` pairs padded to `--length` tokens ([chosen; rejected]
rows, no prefix sharing: what a GPU run with SDPA does), bf16 weights, AdamW, a reference copy for
full fine-tuning (the adapter for LoRA r 16 on all linears). Every number is one process's
(one GPU's) estimated peak, from `dpokit.training.memory`, the module `dpokit plan` prints.
"""

from __future__ import annotations

import argparse

from dpokit.models.memory import ModelShape
from dpokit.training import memory

MODELS = {
    "Llama-3.2-1B": ModelShape(16, 2048, 8192, 32, 8, 64, 128256, True),
    "Llama-3.1-8B": ModelShape(32, 4096, 14336, 32, 8, 128, 128256, False),
    "Llama-3.1-70B": ModelShape(80, 8192, 28672, 64, 8, 128, 128256, False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def facts(shape: ModelShape, lora: bool) -> memory.RunFacts:
    if lora:
        return memory.RunFacts(shape, "bf16", "dpo", "adapter", "adamw", lora_r=16, lora_targets=7,
                               lora_params=shape.lora_params(16, TARGETS), device="cuda")  # fmt: skip
    return memory.RunFacts(shape, "bf16", "dpo", "copy", "adamw", device="cuda")


def table(gpus: int, pairs: int, length: int) -> str:
    """Markdown: one row per model and fine-tuning kind, one column per strategy, each cell
    "no checkpointing / every layer checkpointed" in GiB per GPU."""
    batch = memory.BatchShape(rows=2 * pairs, length=length, scored=pairs * length)  # responses ~ half the rows
    lines = [f"| model | fine-tuning | {' | '.join(memory.STRATEGIES)} |", "|---|---|" + "---|" * len(memory.STRATEGIES)]
    for name, shape in MODELS.items():
        for lora in (False, True):
            f = facts(shape, lora)
            cells = []
            for strategy in memory.STRATEGIES:
                chunk = 0 if strategy == "zero3" else 256  # dpokit's ZeRO-3 runs the full LM head
                g = 1 if strategy == "single" else gpus
                run = memory.RunFacts(**{**f.__dict__, "lm_head_chunk": chunk})
                totals = [memory.for_strategy(memory.plan(run, batch, every), run, strategy, g).total / memory.GIB
                          for every in (0, 1)]  # fmt: skip
                cells.append(f"{totals[0]:.0f} / {totals[1]:.0f}")
            lines.append(f"| {name} | {'LoRA r16' if lora else 'full'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--length", type=int, default=1024, help="tokens per row (prompt + response)")
    args = ap.parse_args()
    print(table(args.gpus, args.pairs, args.length))


if __name__ == "__main__":
    main()
