"""QLoRA end to end on the tiny preset: an nf4 base, LoRA adapters and 8-bit AdamW train, save the
adapter only, and resume from a checkpoint (8-bit optimizer state included) bit for bit.

Skipped without torchao (`pip install 'dpokit[quant]'`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import Config
from dpokit.training.checkpoint import CHECKPOINTS
from dpokit.training.loop import train
from dpokit.training.outputs import COMPLETE
from tests.conftest import TOY

pytest.importorskip("torchao")

# r=64 on q_proj / o_proj (64 x 64 in the tiny Llama): every adapter has 4096 values, the least torchao
# stores in 8 bits, so the checkpoints hold quantised optimizer state, not only full-precision fallbacks
SETTINGS = ["lora.enabled=true", "lora.quantize=nf4", "lora.r=64", "lora.alpha=64", "lora.target_modules=[q_proj,o_proj]",
            "train.optimizer=adamw8bit", "train.max_steps=2", "train.save_every=1", "train.lr=5e-3",
            "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1", "train.progress_bar=false",
            f"data.train_files=[{TOY / 'train.jsonl'}]", "data.eval_files=[]"]


def _cfg(model_dir: Path, out: Path, *extra: str) -> Config:
    return Config.from_preset("tiny").override([f"model.name_or_path={model_dir}", f"train.output_dir={out}",
                                                *SETTINGS, *extra])


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_qlora_nf4_with_adamw8bit_trains_saves_and_resumes_exactly(tiny_model_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "qlora"
    train(_cfg(tiny_model_dir, out))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # the adapter only; the nf4 base is not saved
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    optimizer = torch.load(out / CHECKPOINTS / "step-00000001" / "optimizer.pt", weights_only=True)
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in optimizer["state"].values())

    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    shutil.rmtree(out / CHECKPOINTS / "step-00000002")  # as if killed after step 1's checkpoint ...
    (out / COMPLETE).unlink()  # ... so before the run finished (a finished run is not resumed)
    (out / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    train(_cfg(tiny_model_dir, out, "train.resume=auto"))
    assert f"resumed from {out / CHECKPOINTS / 'step-00000001'} (step 1 of 2)" in capsys.readouterr().out
    again = load_file(str(out / "adapter_model.safetensors"))
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    assert _rows(out) == _rows(reference)
