"""End to end on a tiny random Llama: the real CLI trains, learns the toy signal and saves a
folder that transformers loads; LoRA and full fine-tuning; gradient accumulation invariance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from tests.conftest import PRESETS, TOY

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {
    "step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_sec",
}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(model_dir: Path, out: Path, *overrides: str) -> int:
    return main(["train", str(PRESETS / "tiny.yaml"), f"model.name_or_path={model_dir}",
                 f"train.output_dir={out}", f"data.train_files=[{TOY / 'train.jsonl'}]",
                 f"data.eval_files=[{TOY / 'eval.jsonl'}]", "train.progress_bar=false", *overrides])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_full_finetune_learns_toy_signal_and_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert _train(tiny_model_dir, out) == 0
    rows = _rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert METRIC_KEYS <= set(train_rows[0]), set(train_rows[0]) ^ METRIC_KEYS
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    assert len(evals) >= 2  # mid-run (eval_every=30) and final
    final = evals[-1]
    assert final["eval/rewards/accuracies"] >= 0.8, final  # held-out pairs, chance is 0.5
    assert final["eval/rewards/margins"] > 0 and final["eval/loss"] < 0.69
    # every parameter moved
    before, after = _weights(tiny_model_dir), _weights(out)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # the folder is an ordinary transformers model, with tokenizer and resolved config
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2
    assert (out / "tokenizer.json").is_file() and (out / "config.yaml").is_file()


def test_lora_trains_adapter_only_and_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    code = _train(tiny_model_dir, out, "lora.enabled=true", "lora.merge=true", "lora.r=8", "train.max_steps=30",
                  "train.lr=5e-3", "train.eval_every=0")
    assert code == 0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: all of them trained
    final = [r for r in _rows(out) if "eval/rewards/accuracies" in r][-1]
    assert final["eval/rewards/accuracies"] > 0.6, final
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)


def test_evaluate_cli_json(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["evaluate", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir),
                 "--data", str(TOY / "eval.jsonl"), "--json", "--beta", "0.2"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    # policy == reference: every reward is 0, so the DPO loss is exactly ln 2 and accuracy 0
    assert res["pairs"] == 100 and res["beta"] == 0.2
    assert type(res["pairs"]) is int and type(res["dropped"]) is int  # counts are integers, not 100.0
    assert res["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert res["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and res["rewards/accuracies"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in res


def test_evaluate_skip_mode_writes_skipped_rows(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """`dpokit evaluate ... data.on_bad_row=skip --skipped FILE` evaluates the good rows and lists the bad."""
    rows = (TOY / "eval.jsonl").read_text().splitlines()[:5]
    data_file = tmp_path / "mixed.jsonl"
    data_file.write_text("\n".join([rows[0], '{"prompt": "p", "chosen": 3, "rejected": "r"}', *rows[1:]]) + "\n")
    skipped = tmp_path / "skipped.jsonl"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--ref", str(tiny_model_dir), "--data", str(data_file),
                 "--json", "--skipped", str(skipped), "data.on_bad_row=skip"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 5
    (record,) = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert record["field"] == "chosen" and "line 2" in record["location"]


def test_config_command_prints_commented_yaml(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "  lr: 5.0e-06  # peak learning rate" in text


def test_user_errors_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(PRESETS / "tiny.yaml"), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.lrr" in err and "Traceback" not in err


def test_second_run_in_process_may_change_precision() -> None:
    """A notebook that trains in fp32 and then with bf16 autocast must not hit Accelerate's
    'AcceleratorState has already been initialized' error."""
    from dpokit.dist import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
