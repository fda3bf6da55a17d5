"""Matmul peak of this machine, measured: best of N square GEMMs in fp32 and bf16, plus the environment.

    python -m bench.workers.peak '{"device": "cpu", "size": 2048, "repeats": 5, "threads": 0}'

The MFU columns of the report divide each run's achieved model FLOP/s by this peak (fp32 runs by the
fp32 peak, bf16 / bf16-mixed runs by the bf16 peak). On a GPU, fp32 means true fp32 (TF32 off, which
is torch's default for matmuls), so it matches what an fp32 training run gets.
"""

from __future__ import annotations

import json
import sys
import time


def gemm_flops(device: str, dtype_name: str, size: int, repeats: int, budget_s: float = 20.0) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = 10 if device == "cuda" else 1  # GPU GEMMs are short: time several per sample
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    sync()
    best, t_begin = float("inf"), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
        if time.perf_counter() - t_begin > budget_s:
            break
    return 2.0 * size**3 / best


def main(argv: list[str]) -> int:
    import torch

    from bench import common

    opts = json.loads(argv[0]) if argv else {}
    device, size, repeats = opts.get("device", "cpu"), opts.get("size", 2048), opts.get("repeats", 5)
    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False
    peaks = {name: gemm_flops(device, name, size, repeats) for name in ("fp32", "bf16")}
    common.emit_result({"ok": True, "peaks": peaks, "size": size, "repeats": repeats,
                        "env": common.environment(device)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
