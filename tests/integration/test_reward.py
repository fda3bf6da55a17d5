"""`dpokit reward` end to end on the tiny Llama: TRL RewardTrainer parity, the padding-free layouts
against the padded one, the outputs (full, LoRA adapter + merged) loading back, an exact resume,
refusals, and scoring texts (`reward_scores`) as pairs are tokenized.

TRL parity (`trl.RewardTrainer.evaluate()` vs dpokit's evaluation, the one the loop runs): both
load the same saved sequence-classification model (the tiny Llama with noise added and a score
head, so rewards spread), the same pairs with a per-pair margin column, the same centring
coefficient. TRL averages accuracy and margin per batch and then over batches, so its batch size
divides the number of pairs (a plain mean over pairs then); dpokit runs with another batch size and
in both its padded and its prefix-shared layout (the CPU default). CPU fp32, single-threaded
enough for the 2e-6 differences seen (tolerance 1e-4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import Config
from dpokit.data import pairs as pair_data
from dpokit.data.collate import TokenizedPair
from dpokit.dist import Dist
from dpokit.errors import ModelError
from dpokit.models.reward import load_reward_model, reward_scores, tokenize_for_scoring
from dpokit.objectives.base import evaluate_examples
from dpokit.objectives.reward import RewardObjective, _WithMargins
from dpokit.training.checkpoint import CHECKPOINTS, WEIGHTS
from dpokit.training.outputs import COMPLETE
from tests.conftest import TOY

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

TOL = 1e-4
CENTER = 0.05
CPU = Dist.local("cpu")


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a one-output classifier, weights perturbed so rewards differ pair by pair
    (a fresh head on a near-uniform model scores everything ~0): the shared initial weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=gen) * (0.15 if name.startswith("score") else 0.3))
    out = tmp_path_factory.mktemp("reward_model") / "rm0"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _rows(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n] if line.strip()]


def _with_margins(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "margin": 0.5 * (i % 3)} for i, r in enumerate(rows)]


def _cfg(model: Path, *extra: str) -> Config:
    return Config().override([f"model.name_or_path={model}", "model.dtype=float32", "model.attn_implementation=sdpa",
                              f"reward.center_rewards_coefficient={CENTER}", "data.max_length=4096",
                              "data.max_prompt_length=4095", *extra])  # fmt: skip


# ---- TRL parity -----------------------------------------------------------------------------------
def _trl_metrics(model_dir: Path, rows: list[dict[str, Any]], out: Path, batch: int) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    assert len(rows) % batch == 0, "equal-sized TRL batches make its mean of batch means a mean over pairs"
    args = RewardConfig(output_dir=str(out), per_device_eval_batch_size=batch, use_cpu=True, bf16=False,
                        report_to=[], disable_tqdm=True, center_rewards_coefficient=CENTER, max_length=None, seed=0)  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    dataset = Dataset.from_list(rows)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(str(model_dir)))  # fmt: skip
    raw = trainer.evaluate()
    return {"loss": raw["eval_loss"], "reward/accuracy": raw["eval_accuracy"], "reward/margin": raw["eval_margin"]}


def _dpokit_metrics(model_dir: Path, data: Path, prefix_sharing: bool) -> dict[str, float]:
    objective = RewardObjective(_cfg(model_dir, f"data.prefix_sharing={str(prefix_sharing).lower()}"))
    model, tokenizer = objective.load_model(torch.float32)  # the training load path, on the saved classifier
    pairs, summary = objective.load_examples([str(data)], tokenizer, None)
    assert summary.n_dropped == 0
    collator = objective.build_collator(tokenizer.pad_token_id, model, torch.device("cpu"))
    assert ("prefix sharing" in collator.describe()) == prefix_sharing
    return evaluate_examples(objective, model, pairs, collator, 6, CPU) | {"pairs": len(pairs)}


@pytest.mark.parametrize(("kind", "trl_batch"), [("standard", 16), ("chat", 10)])
def test_eval_loss_and_accuracy_match_trl_reward_trainer(
    kind: str, trl_batch: int, reward_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """standard: 48 toy pairs with margins 0 / 0.5 / 1; chat: the 20 toy chat pairs (no margins)."""
    rows = _with_margins(_rows(TOY / "eval.jsonl", 48)) if kind == "standard" else _rows(TOY / "chat.jsonl")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = _trl_metrics(reward_model_dir, rows, tmp_path / "trl", trl_batch)
    assert 0.1 < theirs["reward/accuracy"] < 0.9 and theirs["loss"] > 0.3, theirs  # not a trivial comparison
    for prefix_sharing in (False, True):
        ours = _dpokit_metrics(reward_model_dir, data, prefix_sharing)
        assert ours["pairs"] == len(rows)
        diffs = {k: abs(ours[k] - theirs[k]) for k in theirs}
        report = "  ".join(f"{k} dpokit {ours[k]:.7f} trl {theirs[k]:.7f} |diff| {diffs[k]:.1e}" for k in theirs)
        assert max(diffs.values()) <= TOL, report
        with capsys.disabled():
            print(f"\nTRL parity {kind} (prefix sharing {prefix_sharing}): {report}")


# ---- layouts ----------------------------------------------------------------------------------------
def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_and_prefix_shared_batches_equal_the_padded_one(reward_model_dir: Path) -> None:
    """Same loss, per-pair values and gradients in every layout; pairs of mixed lengths, 1-token
    responses (a rejected branch then starts and ends right after the prompt) and margins."""
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(str(reward_model_dir))) - 4

    def ids(n: int) -> list[int]:
        return (torch.randint(4, vocab, (n,), generator=g) + 0).tolist()

    shapes = [(5, 3, 1), (2, 1, 6), (7, 4, 4), (3, 6, 2), (1, 2, 1)]
    pairs = [TokenizedPair(ids(p), ids(c), ids(r), index=i, margin=0.3 * i) for i, (p, c, r) in enumerate(shapes)]
    results = {}
    for name, extra in {"padded": ["data.prefix_sharing=false"], "packing": ["data.packing=true", "data.prefix_sharing=false"],
                        "prefix sharing": ["data.prefix_sharing=true"],
                        "both": ["data.packing=true", "data.prefix_sharing=true"]}.items():  # fmt: skip
        objective = RewardObjective(_cfg(reward_model_dir, *extra))
        model, tokenizer = objective.load_model(torch.float32)
        batch = objective.build_collator(tokenizer.pad_token_id, model, torch.device("cpu"))(pairs)
        loss, values = objective.batch_values(model, batch, "train")
        loss.backward()
        results[name] = (loss.detach(), values, _grads(model))
    loss0, values0, grads0 = results.pop("padded")
    assert grads0 and values0[1].min() < 1 < values0[1].sum()  # gradients exist; some pairs right, some wrong
    for name, (loss, values, grads) in results.items():
        torch.testing.assert_close(loss, loss0, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(values, values0, atol=1e-5, rtol=1e-5, msg=name)
        assert grads.keys() == grads0.keys()
        for key in grads0:
            torch.testing.assert_close(grads[key], grads0[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


# ---- training, outputs, resume --------------------------------------------------------------------------
def _train_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    evals = out.parent / "eval32.jsonl"  # a third of the toy eval pairs: evaluation stays a small part of the test
    evals.write_text("".join(json.dumps(r) + "\n" for r in _rows(TOY / "eval.jsonl", 32)))
    return ["reward", "--preset", "reward-tiny", f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{TOY / 'train.jsonl'}]", f"data.eval_files=[{evals}]", "train.progress_bar=false",
            *extra]  # fmt: skip


def _metric_rows(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


def test_full_reward_model_learns_the_toy_preference_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    assert main(_train_args(tiny_model_dir, out, "train.max_steps=12", "train.eval_every=0")) == 0
    *_, last_train, last = _metric_rows(out)
    assert last["eval/reward/accuracy"] > 0.9 and last["eval/loss"] < 0.3, last
    assert {"loss", "reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected"} <= set(last_train)

    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(out))  # the output is an ordinary HF folder
    assert plain.config.num_labels == 1 and plain.config.architectures == ["LlamaForSequenceClassification"]
    model, tokenizer = load_reward_model(str(out), _cfg(out), torch.float32)
    rows = _rows(TOY / "eval.jsonl", 16)
    prompts = [r["prompt"] for r in rows] * 2
    scores = reward_scores(
        model, tokenizer, prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], 5, CPU
    )
    assert sum(c > r for c, r in zip(scores[:16], scores[16:])) >= 14  # it prefers the chosen responses
    assert "A reward model trained by dpokit" in (out / "README.md").read_text()


def test_lora_reward_model_outputs_load_and_resume_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoRA: the adapter (score head trained whole, in checkpoints too) + merged/, both loadable and
    scoring alike; killed after the step-3 checkpoint and resumed, the run ends bit for bit the same."""
    out = tmp_path / "lora"
    args = _train_args(tiny_model_dir, out, "lora.enabled=true", "lora.r=4", "lora.merge=false", "train.max_steps=6",
                       "train.save_every=3", "train.log_every=2", "train.eval_every=3", "train.lr=5e-3")  # fmt: skip
    assert main(args) == 0
    saved = load_file(str(out / CHECKPOINTS / "step-00000003" / WEIGHTS))
    assert all("lora_" in k or ".score.modules_to_save." in k for k in saved) and any("score" in k for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (out / "merged" / "config.json").is_file()  # written although lora.merge=false

    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    shutil.rmtree(out / CHECKPOINTS / "step-00000006")  # as if killed between steps 3 and 6
    (out / COMPLETE).unlink()
    assert main([*args, "train.resume=auto"]) == 0
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _metric_rows(out) == _metric_rows(reference)

    from transformers import AutoModelForSequenceClassification

    adapter, tokenizer = load_reward_model(str(out), _cfg(out), torch.float32)
    merged, _ = load_reward_model(str(out / "merged"), _cfg(out), torch.float32)
    prompts = ["Describe the weather in Rome.", [{"role": "user", "content": "Tell me about your day in Oslo."}]]
    responses = ["lovely happy warm.", "gloomy grey muddy."]
    via_adapter = reward_scores(adapter, tokenizer, prompts, responses, 2, CPU)
    via_merged = reward_scores(merged, tokenizer, prompts, responses, 1, CPU)
    plain = AutoModelForSequenceClassification.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():  # transformers' own pooling: the same last token (the tiny pad token is not EOS)
        via_hf = [
            plain(input_ids=torch.tensor([r])).logits.item()
            for r in tokenize_for_scoring(tokenizer, prompts, responses)
        ]
    assert via_adapter == pytest.approx(via_merged, abs=1e-5) and via_merged == pytest.approx(via_hf, abs=1e-5)


# ---- refusals and scoring ---------------------------------------------------------------------------------
def test_a_causal_lm_is_refused_as_a_reward_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelError, match=r"is not a reward model: its config.json names LlamaForCausalLM"):
        load_reward_model(str(tiny_model_dir), Config(), torch.float32)
    causal = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    causal.save_pretrained(str(tmp_path / "dpo-adapter"))
    with pytest.raises(ModelError, match=r"LoRA adapter for task 'CAUSAL_LM', not a reward model"):
        load_reward_model(str(tmp_path / "dpo-adapter"), Config(), torch.float32)


def test_texts_are_scored_as_pairs_are_tokenized(reward_model_dir: Path) -> None:
    """`tokenize_for_scoring` gives a pair's prompt + chosen ids (chat pairs; a text prompt is one user
    turn under a chat template; plain text without one), and `reward_scores` the objective's rewards."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reward_model_dir))
    data = Config().data
    chat, _ = pair_data.load_pairs([str(TOY / "chat.jsonl")], tokenizer, data)
    rows = _rows(TOY / "chat.jsonl")
    prompts, responses = [r["chosen"][:-1] for r in rows], [r["chosen"][-1]["content"] for r in rows]
    assert tokenize_for_scoring(tokenizer, prompts, responses) == [p.prompt_ids + p.chosen_ids for p in chat]
    single = [r for r in rows if len(r["chosen"]) == 2 and r["chosen"][0]["role"] == "user"]
    assert single, "toy chat data has single-turn rows"
    as_text = tokenize_for_scoring(tokenizer, [r["chosen"][0]["content"] for r in single],
                                   [r["chosen"][1]["content"] for r in single])  # fmt: skip
    assert as_text == tokenize_for_scoring(
        tokenizer, [r["chosen"][:1] for r in single], [r["chosen"][1]["content"] for r in single]
    )

    tokenizer.chat_template = None  # plain text: the standard-row rules (special tokens on the prompt, EOS)
    plain, _ = pair_data.load_pairs([str(TOY / "eval.jsonl")], tokenizer, data)
    toy = _rows(TOY / "eval.jsonl")
    assert tokenize_for_scoring(tokenizer, [r["prompt"] for r in toy], [r["chosen"] for r in toy]) == [
        p.prompt_ids + p.chosen_ids for p in plain
    ]

    objective = RewardObjective(_cfg(reward_model_dir))
    model, tok = objective.load_model(torch.float32)
    pairs, _ = objective.load_examples([str(TOY / "chat.jsonl")], tok, None)
    batch = _WithMargins(objective.build_collator(tok.pad_token_id, model, torch.device("cpu")).inner)(pairs)
    with torch.no_grad():
        _, values = objective.batch_values(model, batch, "eval")
    scores = reward_scores(model, tok, prompts, responses, 3, CPU)
    assert scores == pytest.approx(values[3].tolist(), abs=1e-5)  # reward/chosen, pair by pair
