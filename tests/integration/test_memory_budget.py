"""The memory plan in a run: train.memory_budget chooses train.gradient_checkpointing=auto, a run that
cannot fit stops before its first step, `dpokit plan` prints the plan, and the plan is within 15% of
the measured peak resident set of a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpokit import allocator
from dpokit.apps.plan import build_inputs
from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.models.tiny import build_tiny_llama
from dpokit.training import memory
from dpokit.training.hooks import Hook
from dpokit.training.loop import train

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 8 layers: enough for checkpointing some of them to matter."""
    return build_tiny_llama(tmp_path_factory.mktemp("deep_tiny"), num_layers=8)


def _cfg(tmp_path: Path, model: Path, *extra: str) -> Config:
    return Config.from_preset("tiny").override([f"model.name_or_path={model}", f"train.output_dir={tmp_path / 'run'}",
                                                 "train.max_steps=2", "data.eval_files=[]", "train.progress_bar=false",
                                                 *extra])  # fmt: skip


def _totals(cfg: Config) -> dict[int, int]:
    """The plan's total without checkpointing (0) and with every k-th layer checkpointed."""
    inputs = build_inputs(cfg, "train", torch.device("cpu"))
    inputs.allocator = allocator.active()  # train() below runs in this process, on its allocator
    totals = {}
    for every in (0, 4, 3, 2, 1):
        changed = cfg.override([f"train.gradient_checkpointing={every or 'false'}"])
        totals[every] = memory.plan_run(memory.RunInputs(**{**vars(inputs), "cfg": changed}), None).total
    return totals


class _Layout(Hook):
    def __init__(self) -> None:
        self.info: dict[str, str] = {}

    def on_setup(self, info: dict[str, str]) -> None:
        self.info = info


def test_auto_checkpointing_follows_the_budget(tmp_path: Path, deep_tiny: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A budget between the plans without checkpointing and with every 2nd layer: auto takes every
    2nd layer (every 4th and 3rd are not enough); a generous budget keeps every activation."""
    cfg = _cfg(tmp_path, deep_tiny)
    totals = _totals(cfg)
    assert totals[0] > totals[4] > totals[3] > totals[2] > totals[1]
    budget_gib = (totals[3] + totals[2]) / 2 / memory.GIB
    hook = _Layout()
    train(cfg.override([f"train.memory_budget={budget_gib}"]), hooks=[hook])
    assert hook.info["gradient_checkpointing"] == "every 2nd layer"
    assert f"memory: plan {totals[2] / memory.GIB:.2f} GiB of {budget_gib:.1f} budget; checkpointing every 2nd layer; " \
        "CPU allocator glibc" in capsys.readouterr().out  # fmt: skip (pytest's process: no preload)
    hook = _Layout()
    train(cfg.override(["train.overwrite=true"]), hooks=[hook])  # auto budget: this machine's free RAM
    assert hook.info["gradient_checkpointing"] == "off"


def test_a_run_that_cannot_fit_stops_before_training(tmp_path: Path, deep_tiny: Path) -> None:
    cfg = _cfg(tmp_path, deep_tiny)
    below = (_totals(cfg)[1] - 1) / memory.GIB
    with pytest.raises(DpokitError, match="does not fit its memory budget even with every layer checkpointed") as err:
        train(cfg.override([f"train.memory_budget={below}"]))
    assert "To use less memory: train.micro_batch_size=4 train.grad_accum_steps=2" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was trained, no run folder left behind


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "tiny", "--num-processes", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: single, 1 process(es), cpu, checkpointing off" in out and "budget" in out
    assert "the same run with checkpointing every layer: " in out and "length percentiles: p50 " in out
    assert "per process at 4 processes" in out
    for strategy in memory.STRATEGIES:
        assert f"| {strategy} |" in out
    assert main(["plan", "--preset", "tiny", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans["run"]["fits"] and set(plans["strategies"]) == set(memory.STRATEGIES)
    assert plans["strategies"]["zero3"]["items"]["weights"] < plans["strategies"]["single"]["items"]["weights"]
    assert main(["plan", "--preset", "tiny", "train.memory_budget=0.0001"]) == 1
    assert "does not fit its memory budget" in capsys.readouterr().out


_PEAK = """
import json, sys
import torch
from dpokit import allocator
from dpokit.apps.plan import build_inputs
from dpokit.config import Config
from dpokit.training import memory
from dpokit.training.hooks import Hook
from dpokit.training.loop import train

class Seen(Hook):
    def __init__(self):
        self.batches, self.every = [], 0
    def on_setup(self, info):
        self.every = int(info["checkpoint_every"])
    def on_micro_batch(self, step, examples):
        self.batches.append(list(examples))

hook = Seen()
cfg = Config.from_preset(sys.argv[1]).override(sys.argv[2:])
train(cfg, hooks=[hook])
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
inputs = build_inputs(cfg, "train", torch.device("cpu"))
inputs.allocator = allocator.active()  # the one this run trained on
plan = memory.plan_of_batches(inputs, hook.batches, hook.every)
print(json.dumps({"plan": plan.total, "peak": hwm, "allocator": inputs.allocator}))
"""


def _plan_and_peak(tmp_path: Path, preset: str, *args: str) -> dict[str, int]:
    """A run in a fresh process: its whole-run peak resident set, and the plan of the micro-batches it took."""
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    args = (f"train.output_dir={tmp_path / 'run'}", "data.eval_files=[]", "train.progress_bar=false", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env = allocator.preload_env(env) or env  # the allocator `dpokit train` runs on (dpokit.allocator)
    proc = subprocess.run([sys.executable, str(script), preset, *args], capture_output=True, text=True, timeout=900,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM: Linux")
def test_plan_is_within_15_percent_of_the_measured_peak(tmp_path: Path) -> None:
    result = _plan_and_peak(tmp_path, "tiny", "train.max_steps=3")
    assert result["plan"] == pytest.approx(result["peak"], rel=0.15)
    assert result["allocator"] == ("mimalloc" if allocator.preload_env(os.environ) else allocator.active())


def test_the_command_line_trains_on_mimalloc_on_cpu(tmp_path: Path) -> None:
    """`dpokit train` re-runs itself once with mimalloc preloaded (dpokit.allocator); DPOKIT_MALLOC=default
    keeps glibc's allocator, and a process that has it preloaded already is not re-run."""
    if allocator.preload_env(os.environ) is None:
        pytest.skip("no mimalloc to preload here (not Linux, a GPU machine, or cmeel-mimalloc missing)")
    args = [sys.executable, "-m", "dpokit", "train", "--preset", "tiny", "train.max_steps=1", "data.eval_files=[]",
            f"train.output_dir={tmp_path / 'run'}", "train.progress_bar=false"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=300).stdout
    assert "; CPU allocator mimalloc" in out, out[-2000:]
    assert allocator.preload_env({**os.environ, "DPOKIT_MALLOC": "default"}) is None  # the opt-out
    assert allocator.preload_env({**os.environ, "LD_PRELOAD": str(allocator.library())}) is None  # once only


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM: Linux")
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("max_length", [256, 1024])
def test_smollm2_plan_is_within_15_percent_of_the_measured_peak(tmp_path: Path, lora: bool, max_length: int) -> None:
    """SmolLM2-135M, fp32, LoRA and full, two lengths: the 4 longest pairs of the benchmark data, 4 times
    over, 2 pairs per micro-batch (the figures are in docs/benchmarks.md's plan column too)."""
    rows = sorted(Path(REPO / "data" / "bench" / "pairs.jsonl").read_text().splitlines(), key=len)[-4:]
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(rows * 4) + "\n")
    result = _plan_and_peak(tmp_path, "tiny", "model.name_or_path=smollm2-135m-instruct", f"data.train_files=[{data}]",
                            f"data.max_length={max_length}", f"data.max_prompt_length={max_length - 1}",
                            f"lora.enabled={str(lora).lower()}", "train.micro_batch_size=2", "train.max_steps=4",
                            "train.lr=1e-6")  # fmt: skip
    print(f"lora={lora} max_length={max_length}: plan {result['plan'] / 2**30:.2f} GiB, measured "
          f"{result['peak'] / 2**30:.2f} GiB ({100 * (result['plan'] / result['peak'] - 1):+.0f}%)")
    assert result["plan"] == pytest.approx(result["peak"], rel=0.15), result
