"""Parity with Hugging Face TRL: `dpokit evaluate` reproduces `trl.DPOTrainer.evaluate()`.

Same tiny policy, same (different) frozen reference, same pairs: the DPO loss and every reward /
log-prob metric agree to 1e-4 for the sigmoid, IPO, hinge and robust losses (non-default betas,
label smoothing for robust), for plain-text and chat data, and with response truncation. The
token-level inputs (input_ids / attention_mask / completion_mask of each batch) are compared too,
so a metric match cannot hide a tokenization difference that happens to average out.

How the two sides are made comparable (docs/trl-parity.md has the details):
* TRL averages the reward / log-prob metrics per batch and then over batches (unweighted), while
  its eval_loss and all of dpokit's metrics are averages over pairs. With equal-sized batches
  (the TRL batch size divides the number of pairs) both are the plain mean over pairs, so dpokit
  runs with a different batch size on purpose: its result does not depend on it.
* TRL truncates prompt+response to `max_length` (keep_start); dpokit cuts the prompt to
  `data.max_prompt_length` first, then each response to fit `data.max_length`. With
  `data.max_prompt_length = max_length - 1` and prompts shorter than that they coincide.
* TRL 1.16's sigmoid loss ignores `label_smoothing`; dpokit's sigmoid with label smoothing is cDPO,
  so sigmoid parity is checked with label smoothing 0 (the default of both).

Runs on CPU in fp32 (~30 s on 2 cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TOY

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOL = 1e-4
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
N_STANDARD = 48  # pairs of builtin:toy/eval.jsonl used; TRL_BATCH must divide it (see module docstring)
TRL_BATCH = {"standard": 16, "chat": 10}  # builtin:toy/chat.jsonl has 20 pairs
DPOKIT_BATCH = 8  # deliberately different: dpokit averages over pairs, so batching must not matter
TRUNC_MAX_LENGTH = 14  # toy prompts are 6-10 tokens and responses 5-12, so most responses get cut


# ---- fixtures -----------------------------------------------------------------------------------
def _perturbed_copy(src: Path, out: Path, seed: int, std: float) -> Path:
    """Save `src` with N(0, std) noise added to every weight matrix (norm weights untouched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference with peaked (non-uniform) next-token distributions, and a policy that differs from it.

    The freshly initialised tiny Llama (std 0.02) predicts an almost uniform distribution, which would
    make every reward ~0; the noise makes log-probs, rewards and margins large enough for a 1e-4
    comparison to mean something.
    """
    root = tmp_path_factory.mktemp("trl_parity_models")
    ref = _perturbed_copy(tiny_model_dir, root / "ref", seed=1, std=0.3)
    policy = _perturbed_copy(ref, root / "policy", seed=2, std=0.2)
    return {"ref": ref, "policy": policy}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trl_parity_data")
    lines = (TOY / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:N_STANDARD]
    standard = root / "eval48.jsonl"
    standard.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"standard": standard, "chat": TOY / "chat.jsonl"}


# ---- the two sides ------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trl_trainer(
    models: dict[str, Path],
    rows: list[dict[str, Any]],
    out_dir: Path,
    loss: str,
    beta: float,
    label_smoothing: float,
    batch_size: int,
    max_length: int,
) -> Any:
    """A DPOTrainer on CPU fp32 with an explicit frozen reference (a separate load of its folder)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    def load(path: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")

    assert len(rows) % batch_size == 0, "equal-sized TRL batches make its mean of batch means a mean over pairs"
    args = DPOConfig(
        output_dir=str(out_dir),
        per_device_eval_batch_size=batch_size,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        loss_type=[loss],
        beta=beta,
        label_smoothing=label_smoothing,
        max_length=max_length,
        truncation_mode="keep_start",
        pad_to_multiple_of=None,
        precompute_ref_log_probs=False,
        seed=0,
    )
    dataset = Dataset.from_list(rows)
    return DPOTrainer(
        model=load(models["policy"]),
        ref_model=load(models["ref"]),
        args=args,
        train_dataset=dataset,  # required by the constructor; never trained on
        eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(str(models["policy"])),
    )


def _trl_metrics(trainer: Any) -> dict[str, float]:
    raw = trainer.evaluate()
    return {key: float(raw[f"eval_{key}"]) for key in METRICS}


def _dpokit_metrics(
    capsys: pytest.CaptureFixture[str],
    models: dict[str, Path],
    data_file: Path,
    loss: str,
    beta: float,
    label_smoothing: float,
    max_length: int,
) -> dict[str, float]:
    from dpokit.cli import main

    capsys.readouterr()  # drop anything printed before (TRL's metric line, progress output)
    argv = [
        "evaluate",
        "--model", str(models["policy"]),
        "--ref", str(models["ref"]),
        "--data", str(data_file),
        "--loss", loss,
        "--beta", str(beta),
        "--batch-size", str(DPOKIT_BATCH),
        "--json",
        f"loss.label_smoothing={label_smoothing}",
        "loss.ipo_length_normalize=true",  # TRL's IPO averages each log-ratio over its response tokens
        "loss.nll_weight=0",
        "model.dtype=float32",  # TRL runs fp32 on CPU; dpokit's auto would pick bf16 on a GPU
        "model.attn_implementation=sdpa",
        f"data.max_length={max_length}",
        f"data.max_prompt_length={max_length - 1}",  # prompt never cut: TRL has no prompt-only limit
        "data.truncation_mode=keep_end",  # irrelevant here (no prompt reaches max_prompt_length)
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dropped"] == 0
    return {key: float(result[key]) for key in METRICS} | {"pairs": result["pairs"]}


def _assert_close(ours: dict[str, float], theirs: dict[str, float], label: str) -> dict[str, float]:
    diffs = {key: abs(ours[key] - theirs[key]) for key in METRICS}
    report = "\n".join(f"  {k:<20} dpokit {ours[k]: .7f}  trl {theirs[k]: .7f}  |diff| {diffs[k]:.2e}" for k in METRICS)
    assert max(diffs.values()) <= TOL, f"{label}: dpokit differs from TRL by more than {TOL}\n{report}"
    print(f"\n{label}: max |dpokit - trl| = {max(diffs.values()):.2e}\n{report}")
    return diffs


def _assert_meaningful(m: dict[str, float], loss: str, beta: float) -> None:
    """The comparison is not trivial: the policy differs from the reference, pair by pair.

    The mean margin can be small (chosen and rejected log-ratios move together on random models), so
    the check is on the loss: with policy == reference every pair has margin 0 and the loss would be
    ln 2 (sigmoid, robust), 1 (hinge) or (1 / (2 beta))^2 (IPO).
    """
    at_zero = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2}[loss]
    assert abs(m["loss"] - at_zero) > 0.05, m
    assert 0.1 < m["rewards/accuracies"] < 0.9, m
    assert abs(m["rewards/chosen"]) > 0.05 and abs(m["rewards/rejected"]) > 0.05, m
    if loss == "hinge":  # some pairs are past the margin (relu clips them to 0), others are not
        assert 0.0 < m["loss"] and m["loss"] > 1.0 - m["rewards/margins"] + 1e-3, m


# ---- tests --------------------------------------------------------------------------------------
LOSS_CASES = [
    pytest.param("sigmoid", 0.1, 0.0, id="sigmoid-beta0.1"),
    pytest.param("ipo", 0.5, 0.0, id="ipo-beta0.5"),
    pytest.param("hinge", 0.1, 0.0, id="hinge-beta0.1"),
    pytest.param("robust", 0.2, 0.1, id="robust-beta0.2-ls0.1"),
]


@pytest.mark.parametrize(("loss", "beta", "label_smoothing"), LOSS_CASES)
def test_evaluate_matches_trl(
    loss: str,
    beta: float,
    label_smoothing: float,
    models: dict[str, Path],
    data_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = _read_rows(data_files["standard"])
    trainer = _trl_trainer(models, rows, tmp_path / "trl", loss, beta, label_smoothing, TRL_BATCH["standard"], 4096)
    theirs = _trl_metrics(trainer)
    ours = _dpokit_metrics(capsys, models, data_files["standard"], loss, beta, label_smoothing, 4096)
    assert ours["pairs"] == len(rows) == N_STANDARD
    _assert_meaningful(theirs, loss, beta)
    _assert_close(ours, theirs, f"{loss} beta={beta} label_smoothing={label_smoothing}")


@pytest.mark.parametrize(
    ("kind", "max_length"),
    [pytest.param("chat", 4096, id="chat"), pytest.param("standard", TRUNC_MAX_LENGTH, id="truncated")],
)
def test_evaluate_matches_trl_chat_and_truncation(
    kind: str,
    max_length: int,
    models: dict[str, Path],
    data_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Chat-template data (prompt = all turns before the last assistant turn) and cut responses; sigmoid, beta 0.3."""
    rows = _read_rows(data_files[kind])
    trainer = _trl_trainer(models, rows, tmp_path / "trl", "sigmoid", 0.3, 0.0, TRL_BATCH[kind], max_length)
    theirs = _trl_metrics(trainer)
    ours = _dpokit_metrics(capsys, models, data_files[kind], "sigmoid", 0.3, 0.0, max_length)
    assert ours["pairs"] == len(rows)
    _assert_meaningful(theirs, "sigmoid", 0.3)
    _assert_close(ours, theirs, f"{kind} max_length={max_length}")


@pytest.mark.parametrize(
    ("kind", "max_length"),
    [
        pytest.param("standard", 4096, id="standard"),
        pytest.param("chat", 4096, id="chat"),
        pytest.param("standard", TRUNC_MAX_LENGTH, id="truncated"),
    ],
)
def test_batches_match_trl_token_for_token(
    kind: str, max_length: int, models: dict[str, Path], data_files: dict[str, Path], tmp_path: Path
) -> None:
    """dpokit's tokenization + truncation + collation gives TRL's model inputs exactly, pair by pair.

    TRL tokenizes prompt+response jointly and splits at the common prefix with the tokenized
    prompt, and truncates in its collator; dpokit tokenizes them separately and truncates while
    tokenizing. On these data (prompts end on a pre-token boundary, EOS appended to plain text,
    chat template prefix-consistent) the resulting batches are identical.
    """
    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import pairs as data
    from dpokit.data.collate import PreferenceCollator

    rows = _read_rows(data_files[kind])
    trainer = _trl_trainer(models, rows, tmp_path / "trl", "sigmoid", 0.1, 0.0, TRL_BATCH[kind], max_length)
    trl_rows = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.eval_dataset]
    tokenizer = AutoTokenizer.from_pretrained(str(models["policy"]))
    cfg = DataConfig(max_length=max_length, max_prompt_length=max_length - 1, pad_to_multiple_of=0)
    pairs, summary = data.load_pairs([str(data_files[kind])], tokenizer, cfg)
    assert summary.n_dropped == 0 and len(pairs) == len(trl_rows) == len(rows)
    if max_length == TRUNC_MAX_LENGTH:
        assert summary.truncated.get("chosen", 0) + summary.truncated.get("rejected", 0) > len(pairs) // 2

    ours = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    for start in range(0, len(pairs), TRL_BATCH[kind]):
        mine = ours(pairs[start : start + TRL_BATCH[kind]])
        theirs = trainer.data_collator(trl_rows[start : start + TRL_BATCH[kind]])
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(mine[key].long(), theirs[key].long()), f"{key} differs in batch at pair {start}"


def test_prompt_longer_than_max_length_is_a_documented_difference(
    models: dict[str, Path], data_files: dict[str, Path], tmp_path: Path
) -> None:
    """Where the two deliberately differ (docs/trl-parity.md): a prompt that alone fills max_length.

    TRL (keep_start) drops such pairs, since its collator would cut every response token. dpokit cuts
    the prompt to data.max_prompt_length (keeping its end) and keeps the pair with what of the
    responses fits. Pairs whose prompt fits are tokenized identically by both.
    """
    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import pairs as data

    max_length = 8  # toy prompts are 6-10 tokens
    rows = _read_rows(data_files["standard"])
    trainer = _trl_trainer(models, rows, tmp_path / "trl", "sigmoid", 0.1, 0.0, TRL_BATCH["standard"], max_length)
    tokenizer = AutoTokenizer.from_pretrained(str(models["policy"]))
    prompt_lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    fits = [n < max_length for n in prompt_lengths]
    assert 0 < sum(fits) < len(rows)
    assert len(trainer.eval_dataset) == sum(fits)  # TRL dropped the others

    cfg = DataConfig(max_length=max_length, max_prompt_length=max_length - 1)
    pairs, summary = data.load_pairs([str(data_files["standard"])], tokenizer, cfg)
    assert len(pairs) == len(rows) and summary.n_dropped == 0  # dpokit kept every pair
    assert summary.truncated.get("prompt", 0) == len(rows) - sum(fits)
    assert all(len(p.prompt_ids) <= max_length - 1 for p in pairs)
    kept_by_trl = [p for p, ok in zip(pairs, fits) if ok]
    for pair, ex in zip(kept_by_trl, trainer.eval_dataset):
        trl_batch = trainer.data_collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        ours = [*pair.prompt_ids, *pair.chosen_ids]
        assert trl_batch["input_ids"][0].tolist() == ours
