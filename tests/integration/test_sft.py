"""`dpokit sft` on the tiny model: it trains through the CLI and the real loop (metrics, eval, card,
LoRA, packing), resumes bit for bit from a checkpoint, matches TRL's SFTTrainer eval loss and token
accuracy (plain and chat prompt-completion data), computes the same values and gradients packed and
padded (and without the chunked LM head), normalises accumulated micro-batches as documented in
`dpokit.objectives.sft`, and refuses pair files without data.sft_target before a model loads.

CPU, fp32, the in-process CLI (~15 s on 2 cores, TRL's import included).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import Config
from dpokit.data.completions import PackedCompletionCollator, load_completions
from dpokit.dist import Dist, make_accelerator
from dpokit.objectives.base import MetricAccumulator, evaluate_examples
from dpokit.objectives.sft import SFT_KEYS, SFTObjective, completion_scores, sft_loss
from dpokit.training.loop import accumulate_gradients
from tests.conftest import TOY

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
TOL = 1e-4
STEPS = 8


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sft(model_dir: Path, out: Path, *overrides: str) -> int:
    return main(["sft", "--preset", "sft-tiny", f"model.name_or_path={model_dir}", f"train.output_dir={out}",
                 f"train.max_steps={STEPS}", "train.log_every=2", "train.eval_every=4", "train.save_every=4",
                 "train.lr=3e-3", "train.progress_bar=false", "data.eval_files=[]", "data.eval_fraction=0.05",
                 *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted SFT run of the sft-tiny preset (its final weights and rows kept aside)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    assert _sft(tiny_model_dir, out) == 0
    return {"out": out, "weights": load_file(str(out / "model.safetensors")), "rows": _rows(out)}


def test_sft_trains_through_the_cli(run: dict[str, Any]) -> None:
    rows, out = run["rows"], run["out"]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8] and set(SFT_KEYS) <= set(train_rows[0])
    assert "rewards/margins" not in train_rows[0] and train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    for r in evals:  # eval/loss is the per-token NLL of the whole eval set: -sum(logps) / sum(tokens)
        assert r["eval/loss"] == pytest.approx(-r["eval/logps"] / r["eval/tokens"], rel=1e-5)
        assert 0 < r["eval/mean_token_accuracy"] < 1
    readme = (out / "README.md").read_text()
    assert "trained with SFT" in readme and "dpokit sft config.yaml" in readme and "loss.beta" not in readme
    assert "380 examples read" in readme and (out / "model.safetensors").is_file()


def test_resume_from_a_checkpoint_is_bitwise(run: dict[str, Any], tiny_model_dir: Path) -> None:
    """Steps 5-8 again from the step-4 checkpoint: the same weights, bit for bit, and the same rows."""
    out = run["out"]
    checkpoint = out / "checkpoints" / "step-00000004"
    assert _sft(tiny_model_dir, out, f"train.resume={checkpoint}") == 0
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == run["weights"].keys()
    assert all(torch.equal(again[k], run["weights"][k]) for k in again)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in run["rows"]]
    assert [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _rows(out)] == strip


def test_lora_and_packing(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora"
    assert (
        _sft(tiny_model_dir, out, "train.max_steps=2", "lora.enabled=true", "data.packing=true", "data.eval_fraction=0")
        == 0
    )
    assert "batches: packed completion rows" in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file() and "trained with SFT" in (out / "README.md").read_text()


def test_pair_files_need_sft_target_before_a_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "refused"
    code = main(["sft", "--preset", "sft-tiny", "data.sft_target=null", f"train.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "this file holds preference pairs; set data.sft_target=chosen" in err
    assert "train.jsonl, line 1" in err and not out.exists()


# ---- parity with TRL ------------------------------------------------------------------------------
def _parity_rows(kind: str) -> list[dict[str, Any]]:
    if kind == "plain":  # 48 toy pairs as prompt + chosen completions
        pairs = [json.loads(x) for x in (TOY / "eval.jsonl").read_text().splitlines()[:48]]
        return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    chats = [json.loads(x)["chosen"] for x in (TOY / "chat.jsonl").read_text().splitlines()]
    return [{"prompt": c[:-1], "completion": c[-1:]} for c in chats]  # TRL's conversational prompt-completion


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_eval_matches_trl_sft_trainer(kind: str, run: dict[str, Any], tmp_path: Path) -> None:
    """TRL's SFTTrainer.evaluate() (completion-only loss, one eval batch: its eval_loss averages per-batch
    per-token losses, dpokit's is per token over the whole set, so one batch makes them the same
    quantity) against dpokit's eval on the trained model, with dpokit batching 7 at a time on purpose.
    The tokens and the loss masks are compared too, example by example."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, model_dir = _parity_rows(kind), str(run["out"])
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=len(rows), use_cpu=True,
                         bf16=False, report_to=[], disable_tqdm=True, max_length=4096, seed=0)  # fmt: skip
    data = Dataset.from_list(rows)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    theirs = trainer.evaluate()

    cfg = Config().override([f"model.name_or_path={model_dir}", "data.max_length=4096", "data.max_prompt_length=4095"])
    objective = SFTObjective(cfg)
    examples, _ = objective.load_examples([str(path)], tok, None)
    for ours, t in zip(examples, trainer.eval_dataset, strict=True):
        assert ours.input_ids == t["input_ids"]
        assert [j for a, b in ours.spans for j in range(a, b)] == [i for i, x in enumerate(t["labels"]) if x != -100]
    objective.set_eval_examples(examples)
    collator = objective.build_collator(tok.pad_token_id, model, torch.device("cpu"))
    ours = evaluate_examples(objective, model, examples, collator, 7, Dist.local())
    diffs = {"loss": abs(ours["loss"] - theirs["eval_loss"]),
             "mean_token_accuracy": abs(ours["mean_token_accuracy"] - theirs["eval_mean_token_accuracy"])}  # fmt: skip
    print(f"\n{kind}: dpokit {ours['loss']:.7f} / {ours['mean_token_accuracy']:.4f}, TRL {theirs['eval_loss']:.7f} / "
          f"{theirs['eval_mean_token_accuracy']:.4f}, max |diff| {max(diffs.values()):.1e}")  # fmt: skip
    assert max(diffs.values()) <= TOL, diffs
    # a trained model, so the comparison means something: well below uniform (log V), and some argmax hits
    assert ours["loss"] < math.log(len(tok)) - 0.5 and (kind == "chat" or ours["mean_token_accuracy"] > 0.05)


# ---- layouts and normalisation on the model -------------------------------------------------------
def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Any]]:
    """The tiny model and a mix of multi-turn messages (two scored turns) and plain completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    chats = [json.loads(x)["chosen"] for x in (TOY / "chat.jsonl").read_text().splitlines()[:4]]
    rows = [{"messages": c} for c in chats] + _parity_rows("plain")[:4]
    path = tmp_path_factory.mktemp("sft_rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_completions([str(path)], tok, Config().data)
    assert sum(len(e.spans) > 1 for e in examples) >= 1  # a multi-turn example with several scored turns
    return model, examples


def test_packed_equals_padded_values_and_gradients(model_and_examples: tuple[Any, list[Any]]) -> None:
    model, examples = model_and_examples
    objective = SFTObjective(Config())
    padded = objective.build_collator(0, model, torch.device("cpu"))
    results = []
    for collator, chunk in ((padded, 256), (padded, 0), (PackedCompletionCollator(0, max_tokens=64), 256),
                            (PackedCompletionCollator(0, attention_tokens=float("inf")), 3)):  # fmt: skip
        model.zero_grad(set_to_none=True)
        objective.lm_head_chunk = chunk  # 0: plain logits; 3: many head chunks
        loss, values = objective.batch_values(model, collator(examples), "train")
        loss.backward()
        results.append((loss.detach(), values, _grads(model)))
    assert results[2][1].shape == (len(SFT_KEYS), len(examples))
    for loss, values, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, results[0][1], atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, results[0][2][name], atol=1e-6, rtol=1e-4, msg=name)


def test_accumulated_micro_batches_weigh_every_token_equally(model_and_examples: tuple[Any, list[Any]]) -> None:
    """The loop's step (begin_step, then accumulate) over micro-batches A and B (unequal completion
    tokens) has the gradient of sum(NLL) / all the step's tokens (TRL's normalisation), which is the
    gradient of one micro-batch holding both: how the step is split does not matter."""
    model, examples = model_and_examples
    objective = SFTObjective(Config())
    collate = objective.build_collator(0, model, torch.device("cpu"))
    a, b = collate(examples[:4]), collate(examples[4:])
    model.zero_grad(set_to_none=True)
    objective.begin_step([a, b], Dist.local("cpu"))
    accumulate_gradients(make_accelerator("no"), model, objective, [a, b], MetricAccumulator())
    loop = _grads(model)
    model.zero_grad(set_to_none=True)
    scores = [completion_scores(model, x, objective.lm_head_chunk) for x in (a, b)]
    assert scores[0].n_tokens.sum() != scores[1].n_tokens.sum()
    sft_loss(torch.cat([s.logps for s in scores]), torch.cat([s.n_tokens for s in scores])).loss.backward()
    token_global = _grads(model)
    for name, g in loop.items():
        torch.testing.assert_close(g, token_global[name], atol=1e-6, rtol=1e-5, msg=name)
    model.zero_grad(set_to_none=True)
    objective.begin_step([collate(examples)], Dist.local("cpu"))
    accumulate_gradients(make_accelerator("no"), model, objective, [collate(examples)], MetricAccumulator())
    for name, g in _grads(model).items():  # one micro-batch with all the examples
        torch.testing.assert_close(g, loop[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_output_is_an_ordinary_hf_folder(run: dict[str, Any], tmp_path: Path) -> None:
    """The run folder is an ordinary HF folder: transformers loads it alone."""
    from transformers import AutoModelForCausalLM

    copy = shutil.copytree(run["out"], tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints"))
    model = AutoModelForCausalLM.from_pretrained(str(copy))
    assert model.config.model_type == "llama"
