"""The benchmark harness (bench/): FLOP count, ratios, table rendering, data generation, and a smoke
run of both workers (dpokit and TRL) on the tiny random Llama."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, make_data

REPO = Path(__file__).resolve().parents[2]

SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152}


def test_arch_counts_smollm2_parameters() -> None:
    arch = common.Arch.from_config(SMOLLM2)
    assert arch.head_dim == 64
    # per layer: q,o 576x576 each, k,v 576x192 each, three 576x1536 MLP matrices
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert arch.decoder_params == 30 * per_layer
    # with the tied 49152x576 embedding, SmolLM2 has ~134.5M parameters (norms are ~35k more)
    assert abs(arch.decoder_params + arch.head_params - 134_515_008) < 100_000
    # LoRA r=16 on all seven projections: r * (in + out) each
    expected = 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
    assert arch.lora_params(16) == expected
    assert arch.lora_params(16, ["q_proj"]) == 30 * 16 * (576 + 576)


def test_flop_formula() -> None:
    arch = common.Arch(n_layers=2, hidden=8, n_heads=2, n_kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    n = arch.decoder_params
    f = common.forward_flops(arch, seq_len=5, scored=2)
    assert f == 2 * n * 5 + 2 * 2 * 8 * 25 + 2 * 10 * 8 * 2
    full = common.pair_train_flops(arch, 3, 2, 1, lora_r=None, ref_forward=False)
    assert full == pytest.approx(3 * common.forward_flops(arch, 5, 2) + 3 * common.forward_flops(arch, 4, 1))
    with_ref = common.pair_train_flops(arch, 3, 2, 1, lora_r=None, ref_forward=True)
    assert with_ref == pytest.approx(full * 4 / 3)
    lora = common.pair_train_flops(arch, 3, 2, 1, lora_r=4, ref_forward=False)
    extra = 6 * arch.lora_params(4) * (5 + 4)
    assert lora == pytest.approx(2 * common.forward_flops(arch, 5, 2) + 2 * common.forward_flops(arch, 4, 1) + extra)
    # the 6 N tokens rule is the leading term
    big = common.Arch.from_config(SMOLLM2)
    approx = 6 * big.decoder_params * 2 * 1000
    assert 1.0 < common.pair_train_flops(big, 999, 1, 1, None, False) / approx < 1.2


def test_logical_tokens_and_ratios() -> None:
    assert common.logical_tokens(10, 3, 5) == 28
    assert common.ratio(3.0, 2.0) == 1.5
    assert math.isnan(common.ratio(1.0, 0.0)) and math.isnan(common.ratio(float("nan"), 1.0))
    assert common.median([3.0, 1.0, float("nan"), 2.0]) == 2.0
    assert common.spread([9.0, 10.0, 11.0]) == pytest.approx(0.2)
    assert common.spread([5.0]) == 0.0
    assert common.fmt_num(1234.0) == "1.23k" and common.fmt_num(2.5e12) == "2.5T" and common.fmt_num(None) == "-"
    assert common.fmt_bytes(3 * 2**30) == "3.00 GiB" and common.fmt_bytes(5 * 2**20) == "5 MiB"


def _run(tool: str, tok_s: float, mem: float, flops: float = 1e9) -> dict:
    return {"ok": True, "tool": tool, "tokens_per_s": tok_s, "pairs_per_s": tok_s / 100, "flops_per_s": flops,
            "peak_mem_bytes": mem, "plan_bytes": 1.1 * mem if tool == "dpokit" else float("nan"),
            "setup_s": 1.0, "step_s": 2.0, "matmul_dtype": "fp32", "flags": []}


def test_summary_and_table() -> None:
    peaks = {"fp32": 4e9, "bf16": 8e9}
    d = common.summarize([_run("dpokit", 300, 2**30), _run("dpokit", 200, 2**30), _run("dpokit", 250, 2**30)], peaks)
    t = common.summarize([_run("trl", 100, 2**31)], peaks)
    assert d["tokens_per_s"] == 250 and d["mfu"] == pytest.approx(0.25) and d["tokens_spread"] == pytest.approx(0.4)
    failed = common.summarize([{"ok": False, "error": "boom"}], peaks)
    rows = [{"workload": "w", "mode": "defaults", "dpokit": d, "trl": t},
            {"workload": "w", "mode": "best", "dpokit": d, "trl": failed}]
    table = common.results_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 15
    assert "**2.50x**" in lines[2] and "0.50x" in lines[2] and "25.0%" in lines[2]
    assert "| 1.10 GiB (+10%) |" in lines[2]  # dpokit's plan against its measured peak
    assert "**-**" in lines[3]
    assert common.failures(rows) == ["w / best / trl: boom"]


def test_result_line_roundtrip(capsys: pytest.CaptureFixture[str]) -> None:
    common.emit_result({"ok": True, "x": 1})
    out = "noise\n" + capsys.readouterr().out + "more noise\n"
    assert common.parse_result(out) == {"ok": True, "x": 1}
    assert common.parse_result("nothing here") is None
    spec = common.Spec(tool="trl", mode="best", workload="w", model_dir="m", data="d", run_dir="r", extra=["a=1"])
    assert common.Spec.from_json(spec.to_json()) == spec and spec.steps == 4 and spec.pairs_per_step == 2


def test_shipped_data_is_what_make_data_writes(tmp_path: Path) -> None:
    path = make_data.write(tmp_path / "pairs.jsonl")
    assert path.read_text(encoding="utf-8") == (REPO / "data" / "bench" / "pairs.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 256
    assert all(r["prompt"][0]["role"] == "system" and r["prompt"][-1]["role"] == "user" for r in rows)
    assert all(r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant" for r in rows)
    assert len({r["prompt"][0]["content"] for r in rows}) <= len(make_data.SYSTEMS)  # shared preambles
    assert common.subset_rows(path, 300)[256] == rows[0]


def test_dpokit_best_flags_exist_in_config() -> None:
    from bench.compare import dpokit_best_flags
    from dpokit.config import Config

    for device in ("cpu", "cuda"):
        flags = dpokit_best_flags(device)
        assert "reference.precompute=true" in flags and "data.prefix_sharing=true" in flags
        Config().override(flags).validate()  # every key the harness switches on is a real, valid key
    assert "model.attn_implementation=varlen" in dpokit_best_flags("cuda")
    assert "model.attn_implementation=varlen" not in dpokit_best_flags("cpu")


@pytest.mark.slow
def test_both_workers_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One tiny run of each worker (defaults and best): each prints a result line with sane numbers."""
    from bench.compare import worker_env

    results = {}
    for tool in ("dpokit", "trl"):
        for mode in ("defaults", "best"):
            run_dir = tmp_path / f"{tool}-{mode}"
            extra = ["data.packing=true", "reference.precompute=true"] if (tool, mode) == ("dpokit", "best") else []
            spec = common.Spec(tool=tool, mode=mode, workload="tiny-full", model_dir=str(tiny_model_dir),
                               data=str(common.DATA), run_dir=str(run_dir), micro_batch=2, grad_accum=2,
                               max_length=2048, warmup_steps=1, timed_steps=1, threads=1, extra=extra)
            proc = subprocess.run([sys.executable, "-m", f"bench.workers.{tool}_worker", spec.to_json()], cwd=REPO,
                                  env=worker_env(run_dir, None), capture_output=True, text=True, timeout=600)
            res = common.parse_result(proc.stdout)
            assert res is not None and res["ok"], (proc.stdout[-2000:], proc.stderr[-3000:])
            results[tool, mode] = res
    for res in results.values():
        assert res["pairs_timed"] == 4 and res["tokens_per_s"] > 0 and res["peak_mem_bytes"] > 50 * 2**20
        assert res["flops_per_s"] > 0 and len(res["step_times"]) == 1
    # identical work: both tools tokenized the same pairs to the same number of tokens
    assert results["dpokit", "defaults"]["run_tokens"] == results["trl", "defaults"]["run_tokens"]
    assert results["trl", "defaults"]["resolved"]["gradient_checkpointing"] is True  # TRL's own default
    assert results["trl", "best"]["resolved"]["precompute_ref_log_probs"] is True
    assert results["dpokit", "defaults"]["ref_forward"] and not results["dpokit", "best"]["ref_forward"]
