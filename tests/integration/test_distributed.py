"""Two processes on CPU (gloo) train the same model as one: DDP and FSDP2, checkpoints, failures.

Each two-process run goes through the real entry point, `dpokit train --num-processes 2
--accelerate-config NAME` (which re-runs itself under `accelerate launch` with the shipped config),
and is compared with a one-process run in this process at the same global batch: micro_batch 8 x 1
process == micro_batch 4 x 2 processes (`data.stream.ExampleStream` gives the one process exactly
the union of what the two see). Measured differences (float32): metrics <= 2e-6 relative, weights
<= 1.2e-5 absolute (see WEIGHT_TOL). A two-process run of the tiny model takes ~8 s here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpokit import resources
from dpokit.config import Config
from dpokit.launch import free_port
from dpokit.objectives.sft import SFTObjective
from dpokit.training import checkpoint as ckpt
from dpokit.training.loop import train

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # metrics, relative: fp32 summation order differs between one and two processes
# Weights, absolute: AdamW's first steps divide by sqrt(v), so a parameter whose gradient is ~0 moves
# by up to ~lr times a noise-level ratio that the summation order changes (measured: <= 1.2e-5).
WEIGHT_TOL = 5e-5
EVAL = "data.eval_files=[builtin:toy/eval.jsonl]"
COMMON = [
    "model.name_or_path=tiny-random-llama", "train.mixed_precision=no", "train.log_every=1", "train.lr=1e-3",
    "train.warmup_steps=2", "train.progress_bar=false", "data.eval_files=[]", "train.eval_batch_size=16",
]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("FSDP_")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _command(out: Path, overrides: list[str], strategy: str) -> list[str]:
    return [sys.executable, "-m", "dpokit", "train", "--preset", "tiny", "--num-processes", "2",
            "--accelerate-config", strategy, f"train.output_dir={out}", "train.micro_batch_size=4",
            *COMMON, *overrides]  # fmt: skip


def _launch(out: Path, overrides: list[str], strategy: str = "ddp", **env: str) -> subprocess.CompletedProcess[str]:
    """A two-process run through `dpokit train --num-processes 2`; fails the test if it fails."""
    proc = subprocess.run(_command(out, overrides, strategy), cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _one(out: Path, overrides: list[str], cache: Path | None = None) -> None:
    """The same run in this process, one process, micro_batch 8."""
    if cache is not None:
        os.environ["DPOKIT_CACHE"] = str(cache)
    try:
        cfg = Config.from_preset("tiny").override([f"train.output_dir={out}", "train.micro_batch_size=8", *COMMON,
                                                   *overrides])  # fmt: skip
        train(cfg)
    finally:
        if cache is not None:
            os.environ.pop("DPOKIT_CACHE")


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(out / name))


def _assert_same_run(a: Path, b: Path, tol: float = TOL) -> None:
    """Same metrics rows (every number but throughput) and the same final weights, within tolerance."""
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            if isinstance(v, float) and k != "tokens_per_sec":
                assert abs(v - rb[k]) <= tol * max(1.0, abs(v)), (ra["step"], k, v, rb[k])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=WEIGHT_TOL), (k, (wa[k] - wb[k]).abs().max())


FSDP_RUN = ["train.max_steps=24", "train.eval_every=12", EVAL]


@pytest.fixture(scope="module")
def fsdp_whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-process FSDP2 run of 24 steps (full fine-tuning: the reference copy is
    sharded like the policy; evaluation at steps 12 and 24 runs in lockstep)."""
    out = tmp_path_factory.mktemp("fsdp") / "whole"
    proc = _launch(out, FSDP_RUN, "fsdp")
    assert "launching 2 processes" in proc.stdout and "2 processes, fsdp" in proc.stdout
    return out


def test_fsdp_equals_one_process(fsdp_whole: Path, tmp_path: Path) -> None:
    """Same loss, metrics (training and eval) and final weights as one process; the final model is
    gathered into one ordinary Hugging Face folder."""
    _one(tmp_path / "one", FSDP_RUN)
    _assert_same_run(tmp_path / "one", fsdp_whole)
    assert (fsdp_whole / "config.json").is_file() and (fsdp_whole / "model.safetensors").is_file()


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path}: fewer than {n} rows before the run ended or {timeout}s passed")


def test_fsdp_sigterm_to_the_launcher_checkpoints_and_resume_is_bitwise(fsdp_whole: Path, tmp_path: Path) -> None:
    """SIGTERM to `dpokit train --num-processes 2` reaches both workers: they finish the step, write
    one sharded checkpoint (each its own shards) and stop; `train.resume=auto` then ends with the
    same weights, bit for bit, as the uninterrupted run, and the same metrics rows."""
    cut = tmp_path / "cut"
    run = subprocess.Popen(_command(cut, FSDP_RUN, "fsdp"), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_for_rows(cut / "metrics.jsonl", 3, run)
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    saved = ckpt.list_checkpoints(cut / ckpt.CHECKPOINTS)
    assert run.returncode == 128 + signal.SIGTERM and len(saved) == 1, output[-3000:]
    step, folder = saved[0]
    assert 3 <= step < 24 and (folder / ckpt.SHARDED / ".metadata").is_file()
    assert json.loads((folder / "meta.json").read_text())["world_size"] == 2
    _launch(cut, [*FSDP_RUN, "train.resume=auto"], "fsdp")
    a, b = _weights(fsdp_whole), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(cut) == [{**r, "tokens_per_sec": _rows(cut)[i]["tokens_per_sec"]} if "tokens_per_sec" in r else r
                          for i, r in enumerate(_rows(fsdp_whole))]  # fmt: skip
    # a checkpoint resumes only at the world size that wrote it
    with pytest.raises(ckpt.CheckpointError, match="written by 2 process.*this run has 1.*--num-processes 2"):
        train(Config.from_preset("tiny").override([f"train.output_dir={cut}", f"train.resume={folder}", *COMMON]))


def test_fsdp_lora_with_a_reference_cache_written_by_one_process(tmp_path: Path) -> None:
    """FSDP2 with LoRA (trainable adapters on sharded frozen weights), reading the reference log-probs
    a one-process run precomputed: the cache written by one process serves two."""
    lora = ["lora.enabled=true", "lora.r=4", "train.lr=1e-2", "train.max_steps=4", "reference.precompute=true"]
    cache = tmp_path / "cache"
    _one(tmp_path / "one", lora, cache)
    proc = _launch(tmp_path / "fsdp", lora, "fsdp", DPOKIT_CACHE=str(cache))
    assert "reference log-probs [train]: cache hit" in proc.stdout, proc.stdout[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "fsdp")


def test_ddp_precompute_sharded_then_reused_by_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two processes each compute half of the reference log-probs and gather them into one cache;
    a later one-process run finds it, and trains the same steps (DDP == one process). The eval set is
    one batch, so rank 1 has none to run: its evaluation must not wait on rank 0's (DDP's first forward
    after a training step is a collective; evaluation runs the module unwrapped)."""
    few = tmp_path / "eval5.jsonl"
    few.write_text("".join(resources.resolve_builtin("builtin:toy/eval.jsonl").read_text().splitlines(True)[:5]))
    pre = ["train.max_steps=3", "reference.precompute=true", f"data.eval_files=[{few}]"]
    cache = tmp_path / "cache"
    proc = _launch(tmp_path / "ddp", pre, DPOKIT_CACHE=str(cache))
    assert "reference log-probs [train]: cache miss, computed" in proc.stdout
    capsys.readouterr()
    _one(tmp_path / "one", pre, cache)
    assert "reference log-probs [train]: cache hit" in capsys.readouterr().out
    _assert_same_run(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow  # the step-wide normaliser is tested in-process (test_sft.py); bench/equal_work.sh measures it
def test_sft_ddp_with_accumulation_equals_one_process(tmp_path: Path) -> None:
    """SFT's per-token loss is normalised by the whole step's tokens (all micro-batches, both
    processes), so 2 processes x micro_batch 2 x 2 accumulation steps == micro_batch 8 in one."""
    sft = ["train.max_steps=4", "train.eval_every=2", EVAL]
    cmd = [sys.executable, "-m", "dpokit", "sft", "--preset", "sft-tiny", "--num-processes", "2",
           f"train.output_dir={tmp_path / 'ddp'}", "train.micro_batch_size=2", "train.grad_accum_steps=2",
           *COMMON, *sft]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = Config.from_preset("sft-tiny").override([f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=8",
                                                   *COMMON, *sft])  # fmt: skip
    train(cfg, objective=SFTObjective(cfg))
    _assert_same_run(tmp_path / "one", tmp_path / "ddp")


_FAIL_ON_RANK_1 = """
import sys
from dpokit.config import Config
from dpokit.launch import free_port
from dpokit.errors import DataError
from dpokit.training.hooks import Hook
from dpokit.training.loop import train

class BadBatchOnRank1(Hook):
    def __init__(self, rank): self.rank = rank
    def on_micro_batch(self, step, examples):
        if self.rank == 1 and step == 2:
            raise DataError("rank 1: a bad batch at step 2")

import os
cfg = Config.from_preset("tiny").override(sys.argv[2:] + ["train.output_dir=" + sys.argv[1]])
train(cfg, hooks=[BadBatchOnRank1(int(os.environ["RANK"]))])
"""


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path: Path) -> None:
    """Rank 1 raises at step 2 while rank 0 waits in the gradient all-reduce: the run ends (no hang),
    non-zero, and the output carries rank 1's message."""
    script = tmp_path / "fail.py"
    script.write_text(_FAIL_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), str(tmp_path / "out"), "train.micro_batch_size=4", "train.max_steps=50", *COMMON]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "rank 1: a bad batch at step 2" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 120


def test_fsdp_io_error_on_rank_1_ends_both_then_a_kill_then_resume_is_bitwise(fsdp_whole: Path, tmp_path: Path) -> None:
    """Faults in a two-process run. (1) The disk fails under rank 1's part of the step-16 checkpoint
    (its RNG file; rank 0 has written its own): both processes stop with rank 1's message, nothing
    hangs, `dpokit train` exits 74 (the launcher's own status would be 1) with the message as its
    last line; the staging folder is removed and step 8 is intact. (2) The resume is SIGKILLed on rank 1 after its shards of the step-16 checkpoint are written, before
    it is published (the matrix's 2-process point).
    (3) The next resume ends with the uninterrupted run's weights, bit for bit, and its metrics rows."""
    out = tmp_path / "faults"
    run = [*FSDP_RUN, "train.save_every=8"]
    start = time.monotonic()
    proc = subprocess.run(_command(out, run, "fsdp"), cwd=REPO, env=_env(DPOKIT_FAULT="checkpoint.file:rng-1.pt#2:enospc@1"),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 74 and time.monotonic() - start < 120, text[-3000:]
    message = "error: could not write the checkpoint of step 16 ("
    assert proc.stderr.strip().splitlines()[-1].startswith(message), text[-3000:]  # repeated below the launcher's report
    assert text.count(message) == 2, text[-3000:]  # once by the main worker, once by the supervising process
    assert "rng-1.pt): No space left on device (on process 1). The partial files were removed. The last complete " \
           "checkpoint, " in text and "step-00000008 (step 8), is intact" in text, text[-3000:]
    assert "--num-processes 2 --accelerate-config fsdp" in text.split(message)[1].splitlines()[0]  # the resume command
    assert [s for s, _ in ckpt.list_checkpoints(out / ckpt.CHECKPOINTS)] == [8]
    assert not list((out / ckpt.CHECKPOINTS).glob(".tmp-*"))

    killed = subprocess.run(_command(out, [*run, "train.resume=auto"], "fsdp"), cwd=REPO,
                            env=_env(DPOKIT_FAULT="checkpoint.file:sharded#1@1"), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert killed.returncode != 0 and "resumed from" in killed.stdout, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (out / "run_complete.json").exists()
    assert [p.name for p in (out / ckpt.CHECKPOINTS).glob(".tmp-*")] == [".tmp-step-00000016"]  # the kill's leftover

    _launch(out, [*run, "train.resume=auto"], "fsdp")
    assert not list((out / ckpt.CHECKPOINTS).glob(".tmp-*"))
    a, b = _weights(fsdp_whole), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]  # noqa: E731
    assert drop(_rows(out)) == drop(_rows(fsdp_whole))


def test_a_metrics_write_error_on_rank_0_ends_both_processes_with_exit_74(tmp_path: Path) -> None:
    """Only rank 0 writes metrics.jsonl: its failed write ends the run (rank 1 is torn down by the
    launcher, not left waiting in the next all-reduce) with exit 74 and the message as the last line."""
    out = tmp_path / "metrics_fault"
    start = time.monotonic()
    proc = subprocess.run(_command(out, ["train.max_steps=8", "train.save_every=2"], "ddp"), cwd=REPO,
                          env=_env(DPOKIT_FAULT="metrics.write#3:enospc@0"), capture_output=True, text=True, timeout=240)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 74 and time.monotonic() - start < 120, text[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write metrics.jsonl (the row of step 3)"), text[-3000:]
    assert "step-00000002 (step 2), is intact" in last and last.endswith("train.resume=auto"), last
    assert [s for s, _ in ckpt.list_checkpoints(out / ckpt.CHECKPOINTS)] == [2]
    assert not (out / "run_complete.json").exists() and not list((out / ckpt.CHECKPOINTS).glob(".tmp-*"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (optional: make deepspeed)")
def test_deepspeed_zero3_equals_one_process_and_resumes_bitwise(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 on CPU (its CPU accelerator, gloo), with gradient accumulation: the engine
    accumulates, clips and steps itself from the settings dpokit filled in; its partitioned
    checkpoint resumes bit for bit. (Not in a fresh clone's run: DeepSpeed is an optional extra.)"""
    steps = ["train.max_steps=4", "train.grad_accum_steps=2", "train.save_every=2"]
    _one(tmp_path / "one", [*steps, "train.micro_batch_size=8"])
    _launch(tmp_path / "zero3", steps, "zero3")
    _assert_same_run(tmp_path / "one", tmp_path / "zero3")
    saved = tmp_path / "zero3" / ckpt.CHECKPOINTS / ckpt.folder_name(2)
    _launch(tmp_path / "resumed", [*steps, f"train.resume={saved}"], "zero3")
    a, b = _weights(tmp_path / "zero3"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
