"""The loop is objective-agnostic: a test-only objective whose rows are NOT preference pairs (plain
text rows, next-token NLL) trains through the real `train()`: its own rows, collator, metric names,
console fields and evaluation, and a checkpoint/resume that continues it exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.config import Config
from dpokit.data.files import read_rows
from dpokit.errors import DataError
from dpokit.objectives.base import Batch, Objective
from dpokit.training.loop import train
from tests.conftest import PRESETS

WORDS = "the a cat dog sat ran on under mat rug red blue big small".split()


class TextLM(Objective):
    """Rows {"text": str}; loss = mean next-token NLL over each row's tokens."""

    name: ClassVar[str] = "text-lm"
    metric_keys: ClassVar[tuple[str, ...]] = ("loss", "tokens")
    console_keys: ClassVar[tuple[tuple[str, str, str], ...]] = (("loss", "loss", ".4f"), ("tokens", "tok", ".1f"))
    unit: ClassVar[str] = "rows"

    def load_examples(self, files: list[str], tokenizer: Any, skipped_path: Path | None) -> tuple[list[list[int]], Any]:
        rows: list[list[int]] = []
        for path in files:
            for n, row in read_rows(path):
                if not isinstance(row.get("text"), str):
                    raise DataError(str(path), "expected text", row=n, field="text")
                rows.append(tokenizer(row["text"])["input_ids"][: self.cfg.data.max_length])
        return rows, _Summary(len(rows))

    def example_length(self, example: list[int]) -> int:
        return len(example)

    def build_collator(self, pad_token_id: int, model: Any, device: torch.device) -> Any:
        return _PadRows(pad_token_id)

    def batch_values(self, model: Any, batch: Batch, split: str) -> tuple[Tensor, Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (N, T)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (N, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (N, T-1)
        scored = mask[:, 1:].float()
        per_row = (nll * scored).sum(1) / scored.sum(1).clamp(min=1)  # (N,)
        return per_row.mean(), torch.stack([per_row.detach(), scored.sum(1)])


class _Summary:
    def __init__(self, n: int) -> None:
        self.n = n

    def render(self) -> str:
        return f"data: {self.n} text rows"


class _PadRows:
    def __init__(self, pad: int) -> None:
        self.pad = pad

    def describe(self) -> str:
        return "padded text rows"

    def __call__(self, rows: list[list[int]]) -> Batch:
        width = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),  # (N, T)
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),  # (N, T)
        }


def _write_rows(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        lines.append(json.dumps({"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model_dir: Path, tmp: Path, out: str, *extra: str) -> Config:
    return Config.from_yaml(PRESETS / "tiny.yaml").override([
        f"model.name_or_path={model_dir}", f"train.output_dir={tmp / out}",
        f"data.train_files=[{_write_rows(tmp / 'train.jsonl', 64, 0)}]",
        f"data.eval_files=[{_write_rows(tmp / 'eval.jsonl', 12, 1)}]",
        "train.max_steps=8", "train.log_every=1", "train.lr=3e-3", "train.progress_bar=false", *extra])


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_non_pair_objective_trains_through_the_real_loop(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg(tiny_model_dir, tmp_path, "run", "train.eval_every=4", "train.save_every=4")
    result = train(cfg, objective=TextLM(cfg))
    rows = _rows(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 8 and all("rewards/margins" not in r for r in rows)  # its metrics, not DPO's
    assert all(r["tokens"] > 3 for r in train_rows)  # its own per-example values, averaged by the loop
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5  # it learns the 14-word vocabulary
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert result.eval_metrics["eval/tokens"] > 3
    out = capsys.readouterr().out
    assert "data: 64 text rows" in out and "batches: padded text rows" in out and "| tok " in out
    assert (tmp_path / "run" / "model.safetensors").is_file()  # the loop's final save

    # A checkpoint of this objective resumes exactly: steps 5-8 again from the step-4 checkpoint.
    first = {r["step"]: r for r in train_rows}
    again = _cfg(tiny_model_dir, tmp_path, "run", "train.eval_every=4", "train.save_every=4",
                 f"train.resume={tmp_path / 'run' / 'checkpoints' / 'step-00000004'}")
    train(again, objective=TextLM(again))
    resumed = {r["step"]: r for r in _rows(tmp_path / "run") if "loss" in r}
    for step in range(5, 9):
        assert resumed[step]["loss"] == first[step]["loss"], step
