"""`dpokit kto` on the tiny model: it trains through the CLI and the real loop (metrics, eval, card,
checkpoints), resumes bit for bit, trains LoRA adapters against the adapters-off base, refuses a bad
row naming file and line before a model loads, computes the same values with a precomputed reference
as with a live one, matches TRL's KTOTrainer eval (loss, KL reference point, rewards; plain and chat
rows), and trains the same in two DDP processes as in one at the same global batch (the KL reference
point z0 is averaged over both processes' examples).

CPU, fp32 (~20 s on 2 cores, TRL's import and the two-process launch included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import Config
from dpokit.dist import Dist
from dpokit.models.reference import build_reference
from dpokit.objectives.base import ObjectiveSetup, evaluate_examples
from dpokit.objectives.kto import KTO_KEYS, KTOObjective, kl_order
from dpokit.training.loop import train
from tests.conftest import TOY

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
REPO = Path(__file__).resolve().parents[2]
# Weights, DDP vs one process: AdamW's first steps divide by sqrt(v), so a parameter whose gradient is ~0 moves
# by up to ~lr times a noise-level ratio that float32 summation order changes (as tests/integration/test_distributed.py).
# At this test's lr 1e-2 (needed for a z0 > 0 by step 3): 4.1e-5 here, more in a CI run; 2e-4 is 2% of one step,
# while a wrong z0 or a batch split differently changes the loss and moves weights by O(lr).
WEIGHT_TOL = 2e-4
TOL = 1e-4  # TRL parity (measured: loss <= 4e-8, z0 <= 2e-6, summed log-probs of ~-60 <= 6e-6: float32 order)
STEPS = 8


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _kto(model_dir: Path | str, out: Path, *overrides: str) -> int:
    return main(["kto", "--preset", "kto-tiny", f"model.name_or_path={model_dir}", f"train.output_dir={out}",
                 f"train.max_steps={STEPS}", "train.log_every=2", "train.eval_every=4", "train.save_every=4",
                 "train.progress_bar=false", *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted full fine-tuning run of the kto-tiny preset (its final weights and rows kept aside)."""
    out = tmp_path_factory.mktemp("kto") / "run"
    assert _kto(tiny_model_dir, out) == 0
    return {"out": out, "weights": load_file(str(out / "model.safetensors")), "rows": _rows(out)}


def test_kto_trains_through_the_cli(run: dict[str, Any]) -> None:
    rows, out = run["rows"], run["out"]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8] and set(KTO_KEYS) <= set(train_rows[0])
    assert train_rows[-1]["loss"] < 0.49 and train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[1]["eval/kl"] > 0 and 0 < evals[1]["eval/desirable"] < 1
    readme = (out / "README.md").read_text()
    assert "trained with KTO" in readme and "dpokit kto config.yaml" in readme and (out / "model.safetensors").is_file()


def test_resume_from_a_checkpoint_is_bitwise(run: dict[str, Any], tiny_model_dir: Path) -> None:
    """Steps 5-8 again from the step-4 checkpoint: the same weights, bit for bit, and the same rows."""
    out = run["out"]
    assert _kto(tiny_model_dir, out, f"train.resume={out / 'checkpoints' / 'step-00000004'}") == 0
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == run["weights"].keys() and all(torch.equal(again[k], run["weights"][k]) for k in again)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in run["rows"]]
    assert [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _rows(out)] == strip


def test_lora_against_the_adapters_off_base(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lora"
    assert _kto(tiny_model_dir, out, "train.max_steps=2", "lora.enabled=true", "lora.r=4", "train.lr=1e-2") == 0
    assert "twice: completions and KL sequences" in capsys.readouterr().out
    rows = [r for r in _rows(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=0.02)  # step 1 starts at the reference: r = 0, z0 = 0
    assert (out / "adapter_model.safetensors").is_file() and "trained with KTO" in (out / "README.md").read_text()


def test_a_bad_row_is_named_before_a_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "thumbs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "completion": "good.", "label": True}) + "\n"
                    + json.dumps({"prompt": "Hi.", "completion": "bad.", "label": "down"}) + "\n")  # fmt: skip
    out = tmp_path / "refused"
    code = main(["kto", "--preset", "kto-tiny", f"data.train_files=[{data}]", f"train.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "thumbs.jsonl, line 2, field 'label': expected true (desirable) or false" in err
    assert not out.exists()


def _setup(cfg: Config, model: Any, tok: Any, examples: list[Any], objective: KTOObjective) -> ObjectiveSetup:
    collator = objective.build_collator(tok.pad_token_id, model, torch.device("cpu"))
    return ObjectiveSetup(model, tok, torch.float32, Dist.local("cpu"), collator, 256, {"train": [], "eval": examples})


def test_a_precomputed_reference_gives_the_live_ones_values(run: dict[str, Any], tiny_model_dir: Path) -> None:
    """The trained model against the starting one: reference.precompute's tables == a live frozen copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run["out"]), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(run["out"]))
    results = []
    for precompute in (False, True):
        cfg = Config.from_preset("kto-tiny").override([f"model.name_or_path={run['out']}", "data.eval_fraction=0",
                                                       f"reference.name_or_path={tiny_model_dir}",
                                                       f"reference.precompute={str(precompute).lower()}"])  # fmt: skip
        objective = KTOObjective(cfg)
        examples, _ = objective.load_examples([str(TOY.parent / "feedback" / "thumbs.jsonl")], tok, None)
        setup = _setup(cfg, model, tok, examples, objective)
        objective.prepare(setup)
        assert bool(objective.tables) == precompute
        results.append(evaluate_examples(objective, model, examples, setup.collator, 16, setup.dist))
    assert results[0]["kl"] > 0 and results[0]["rewards/margins"] > 0
    assert results[1] == pytest.approx(results[0], abs=1e-6)


# ---- parity with TRL ------------------------------------------------------------------------------
def _parity_rows(kind: str) -> list[dict[str, Any]]:
    """Unpaired rows: each pair's chosen response labelled true, its rejected one false."""
    if kind == "plain":
        pairs = [json.loads(x) for x in (TOY / "eval.jsonl").read_text().splitlines()[:12]]
        return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]  # fmt: skip
    chats = [json.loads(x) for x in (TOY / "chat.jsonl").read_text().splitlines()[:10]]
    return [{"prompt": c[side][:-1], "completion": c[side][-1:], "label": side == "chosen"}
            for c in chats for side in ("chosen", "rejected")]  # fmt: skip


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_eval_matches_trl_kto_trainer(kind: str, run: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL's KTOTrainer.evaluate() and dpokit's eval, the trained model against the starting one as
    reference, unequal weights, the eval set in one batch (both estimate z0 per eval batch).

    The one definitional difference is which completion a KL sequence borrows: TRL takes the row before
    it in dataset order, within chunks of per_device_train_batch_size (here the whole set); dpokit the
    one before it in a seeded shuffle of the split (`kl_order`), so that batching and processes do not
    change it. TRL gets its rows in dpokit's `kl_order`: then both build the same KL sequences (checked
    token by token, with the prompts and completions) and agree (measured: loss 4e-8, z0 2e-6)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, model_dir = _parity_rows(kind), str(run["out"])
    cfg = Config.from_preset("kto-tiny").override([
        f"model.name_or_path={model_dir}", f"reference.name_or_path={tiny_model_dir}", "data.max_length=4096",
        "data.max_prompt_length=4095", "kto.desirable_weight=1.2", "kto.undesirable_weight=0.8"])  # fmt: skip
    ordered = [rows[i] for i in kl_order(len(rows), cfg.train.seed)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows),
                         per_device_eval_batch_size=len(rows), use_cpu=True, bf16=False, report_to=[],
                         disable_tqdm=True, max_length=4096, beta=cfg.loss.beta, desirable_weight=1.2,
                         undesirable_weight=0.8, seed=0)  # fmt: skip
    data = Dataset.from_list(ordered)
    trainer = trl.KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, eval_dataset=data,
                             processing_class=tok)  # fmt: skip
    theirs = trainer.evaluate()

    objective = KTOObjective(cfg)
    examples, _ = objective.load_examples([str(path)], tok, None)
    order = kl_order(len(rows), cfg.train.seed)
    for t, k in zip(trainer.eval_dataset, order, strict=True):
        ours = examples[k]
        start = ours.completion.spans[0][0]
        assert ours.completion.input_ids[:start] == t["prompt_ids"]
        assert ours.completion.input_ids[start:] == t["completion_ids"]
        assert ours.kl.input_ids == t["prompt_ids"] + t["KL_completion_ids"]
    objective.set_reference(build_reference(cfg, model, torch.float32, "copy"))
    objective.set_eval_examples(examples)
    collator = objective.build_collator(tok.pad_token_id, model, torch.device("cpu"))
    ours = evaluate_examples(objective, model, examples, collator, len(examples), Dist.local("cpu"))
    pairs = {"loss": "eval_loss", "kl": "eval_kl", "rewards/desirable": "eval_rewards/chosen",
             "rewards/undesirable": "eval_rewards/rejected", "logps/desirable": "eval_logps/chosen",
             "logps/undesirable": "eval_logps/rejected"}  # fmt: skip
    diffs = {k: abs(ours[k] - theirs[t]) for k, t in pairs.items()}
    print(f"\n{kind}: dpokit loss {ours['loss']:.7f} kl {ours['kl']:.5f}, TRL {theirs['eval_loss']:.7f} "
          f"{theirs['eval_kl']:.5f}; |diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip
    assert max(diffs.values()) <= TOL, diffs
    assert ours["kl"] > 0.05 and ours["rewards/margins"] > 0  # a trained model: z0 is not the clamp's 0


# ---- two processes --------------------------------------------------------------------------------
def test_two_ddp_processes_equal_one(tmp_path: Path) -> None:
    """`dpokit kto --num-processes 2` (micro_batch 4 each) == one process with micro_batch 8: the KL
    sequences are fixed per example, and z0 is the mean over both processes' examples (one all-reduce
    per micro-batch), so losses, metrics (z0 included) and weights agree; the precomputed reference
    tables are summed over the two processes. Eval: the 8 eval rows are one batch, run by rank 0 while
    rank 1 runs none (so nothing in an eval forward may be collective)."""
    common = ["model.name_or_path=tiny-random-llama", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
              "train.lr=1e-2", "train.warmup_steps=0", "train.progress_bar=false",
              "reference.precompute=true"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "ACCELERATE_USE_FSDP")}  # fmt: skip
    cmd = [sys.executable, "-m", "dpokit", "kto", "--preset", "kto-tiny", "--num-processes", "2",
           f"train.output_dir={tmp_path / 'ddp'}", "train.micro_batch_size=4", *common]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0 and "2 processes, ddp" in proc.stdout, proc.stderr[-4000:]
    cfg = Config.from_preset("kto-tiny").override([f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=8",
                                                   *common])  # fmt: skip
    train(cfg, objective=KTOObjective(cfg))
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 3]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float) and k != "tokens_per_sec":
                # float32 summation order differs between 1 and 2 processes; after two steps at lr 1e-2 it shows
                # in the 6th digit (measured: z0 0.296041 vs 0.296031); a z0 not pooled over both processes
                # differs in the 1st (tests/unit/test_kto.py)
                assert abs(v - b[k]) <= 1e-4 * max(1.0, abs(v)), (a["step"], k, v, b[k])
    assert one[2]["kl"] > 0  # z0 itself is compared, not only the clamp's 0
    wa, wb = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "ddp"))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert wa.keys() == wb.keys() and worst <= WEIGHT_TOL, worst
