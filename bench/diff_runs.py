"""The largest differences between two finished runs: metrics row by row, and final weights.

    python bench/diff_runs.py runs/one runs/two

Used to measure how far an N-process run is from a one-process run at the same global batch
(docs/design.md, "Several processes"): prints the largest relative difference of any logged number
(throughput excluded, with the step and key), and the largest absolute difference of any weight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(run / name))


def main(a: Path, b: Path) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    if [r["step"] for r in rows_a] != [r["step"] for r in rows_b]:
        sys.exit("the runs logged different steps")
    worst = (0.0, 0, "")
    for ra, rb in zip(rows_a, rows_b):
        for key, value in ra.items():
            if isinstance(value, float) and key != "tokens_per_sec" and key in rb:
                rel = abs(value - rb[key]) / max(1.0, abs(value))
                worst = max(worst, (rel, ra["step"], key))
    wa, wb = _weights(a), _weights(b)
    wmax = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"{len(rows_a)} rows: largest metric difference {worst[0]:.1e} (relative; step {worst[1]}, {worst[2]}); "
          f"largest weight difference {wmax:.1e} (absolute, {len(wa)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
