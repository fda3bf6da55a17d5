"""SFT without a model: the loss (hand-computed values, how accumulation normalises), completion rows
(kinds, exact chat masks, truncation), bad inputs, the two batch layouts, config keys and the card.

Notation: a batch of examples with summed completion log-probs ``logps`` over ``n`` completion tokens;
the per-token loss is ``sum(-logps) / sum(n)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dpokit
from dpokit.config import Config
from dpokit.data.completions import (
    PAIRS_NEED_TARGET,
    CompletionCollator,
    PackedCompletionCollator,
    TokenizedCompletion,
    _truncate,
    check_completions,
    load_completions,
)
from dpokit.errors import ConfigError, DataError, ModelError
from dpokit.objectives.sft import sft_loss
from dpokit.training import card

TOKENIZER_DIR = Path(dpokit.__file__).parent / "assets" / "tiny_tokenizer"
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Sky colour?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def cfg(**overrides: Any) -> SimpleNamespace:
    base = {"format": "auto", "max_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_end",
            "on_bad_row": "error", "sft_target": None, "sft_loss_on": "all_assistant", "columns": {}}  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def scored_text(tok: Any, ex: TokenizedCompletion) -> list[str]:
    return [tok.decode(ex.input_ids[a:b]) for a, b in ex.spans]


# ---- the loss ------------------------------------------------------------------------------------
def test_loss_is_per_token_over_the_batch_with_the_docstring_values() -> None:
    """logps [-6, -1] over [3, 1] tokens, 2 + 1 tokens right: n_bar = 2, shares [3.0, 0.5], loss 7/4."""
    logps = torch.tensor([-6.0, -1.0], requires_grad=True)
    out = sft_loss(logps, torch.tensor([3, 1]), torch.tensor([2.0, 1.0]))
    assert out.loss.item() == pytest.approx(1.75)  # (6 + 1) / (3 + 1); per sequence it would be 1.5
    assert out.nll.tolist() == pytest.approx([3.0, 0.5]) and out.nll.mean().item() == pytest.approx(1.75)
    assert out.accuracy.tolist() == pytest.approx([1.0, 0.5]) and out.accuracy.mean().item() == pytest.approx(0.75)
    out.loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.25, -0.25])  # every token weighs 1 / sum(n)
    # eval: n_bar of the whole eval set (10 tokens in 4 examples), so the shares average over the set
    assert sft_loss(logps.detach(), torch.tensor([3, 1]), mean_tokens=2.5).nll.tolist() == pytest.approx([2.4, 0.4])


def test_the_step_is_normalised_by_all_its_tokens_like_trl() -> None:
    """A (NLL 6 over 3 tokens) and B (NLL 1 over 1 token) in one step: begin_step's n_bar = 4 / 2 = 2,
    losses 6/2 = 3 and 1/2 = 0.5, step loss (3 + 0.5) / 2 = 1.75 = 7 / 4 (TRL's), every token 1/4.
    (Each micro-batch's own n_bar would give (6/3 + 1/1) / 2 = 1.5.)"""
    a, b = torch.tensor([-6.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    step = (sft_loss(a, torch.tensor([3]), mean_tokens=2.0).loss + sft_loss(b, torch.tensor([1]), mean_tokens=2.0).loss) / 2
    step.backward()
    assert step.item() == pytest.approx(1.75)
    assert (a.grad.item(), b.grad.item()) == pytest.approx((-1 / 4, -1 / 4))
    own = (sft_loss(torch.tensor([-6.0]), torch.tensor([3])).loss + sft_loss(torch.tensor([-1.0]), torch.tensor([1])).loss) / 2
    assert own.item() == pytest.approx(1.5)


def test_begin_step_counts_the_steps_tokens() -> None:
    from dpokit.dist import Dist
    from dpokit.objectives.sft import SFTObjective

    objective = SFTObjective(Config())
    batches = [{"score_index": torch.zeros(4, 3, dtype=torch.long), "example_index": torch.zeros(1)},
               {"score_index": torch.zeros(4, 1, dtype=torch.long), "example_index": torch.zeros(1)}]  # fmt: skip
    objective.begin_step(batches, Dist.local("cpu"))
    assert objective.mean_tokens["train"] == 2.0


# ---- rows and tokenisation ---------------------------------------------------------------------
def test_prompt_completion_rows_score_the_completion_and_eos(tok: Any, tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", [{"prompt": "Sky colour?", "completion": " Blue."}])
    [ex], summary = load_completions([str(path)], tok, cfg())
    prompt = tok("Sky colour?")["input_ids"]
    assert ex.input_ids == prompt + tok(" Blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.spans == [(len(prompt), len(ex.input_ids))] and ex.index == 0
    assert summary.kinds == {"completion": 1} and summary.n_kept == 1 and "1 examples read" in summary.render()


@pytest.mark.parametrize(
    ("loss_on", "expected"), [("all_assistant", ["Blue.", "Green."]), ("last_assistant", ["Green."])]
)
def test_messages_masks_are_exact_assistant_turns(tok: Any, tmp_path: Path, loss_on: str, expected: list[str]) -> None:
    """Each scored span is the assistant turn as the template renders it (content + end of turn), and
    the pieces, tokenised apart, join into the tokens of the whole rendered conversation."""
    path = write(tmp_path / "m.jsonl", [{"messages": CHAT}])
    [ex], _ = load_completions([str(path)], tok, cfg(sft_loss_on=loss_on, max_length=200, max_prompt_length=100))
    assert scored_text(tok, ex) == [f"{t}<|im_end|>\n" for t in expected]
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]


def test_chat_prompt_completion_and_preferred_ft_pairs(tok: Any, tmp_path: Path) -> None:
    """TRL's conversational prompt-completion rows, and pairs with data.sft_target=chosen (text and chat):
    prompt + chosen, the chosen response scored; the rejected one never appears."""
    chat = write(tmp_path / "cc.jsonl", [{"prompt": CHAT[:2], "completion": CHAT[2:3]}])
    [ex], s = load_completions([str(chat)], tok, cfg())
    assert scored_text(tok, ex) == ["Blue.<|im_end|>\n"] and s.kinds == {"chat completion": 1}
    pairs = write(tmp_path / "p.jsonl", [
        {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."},
        {"chosen": CHAT[:3], "rejected": [*CHAT[:2], {"role": "assistant", "content": "Red."}]},
    ])  # fmt: skip
    text, conv = load_completions([str(pairs)], tok, cfg(sft_target="chosen"))[0]
    assert scored_text(tok, text) == [" Blue.<|endoftext|>"] and scored_text(tok, conv) == ["Blue.<|im_end|>\n"]
    assert "Red" not in tok.decode(text.input_ids) + tok.decode(conv.input_ids)


def test_truncation_cuts_the_prompt_then_the_completion(tok: Any, tmp_path: Path) -> None:
    long_prompt = " ".join(["word"] * 30)
    path = write(tmp_path / "t.jsonl", [{"prompt": long_prompt, "completion": " one two three four five six"}])
    [ex], s = load_completions([str(path)], tok, cfg(max_length=12, max_prompt_length=8))
    assert len(ex.input_ids) == 12 and ex.spans == [(8, 12)]  # prompt cut to 8, completion to the 4 that fit
    assert s.truncated == {"prompt": 1, "completion": 1}
    keep_start = load_completions(
        [str(path)], tok, cfg(max_length=12, max_prompt_length=8, truncation_mode="keep_start")
    )[0][0]
    assert keep_start.input_ids[:8] == tok(long_prompt)["input_ids"][:8]
    # a leading BOS survives keep_end; nothing scored left after the cut drops the example
    kept = _truncate([([1, 5, 6, 7, 8], False), ([9, 10], True)], 6, 3, "keep_end", bos=1)
    assert kept.example.input_ids == [1, 7, 8, 9, 10]
    assert (
        _truncate([([5, 6, 7], False), ([9], True)], 3, 3, "keep_start", None).reason
        == "completion empty after truncation"
    )


# ---- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "field", "expected"),
    [
        ({"prompt": "Sky?"}, "completion", "missing field 'completion'"),
        ({"prompt": "Sky?", "completion": ""}, "completion", "text is empty"),
        ({"messages": []}, "messages", "empty message list"),
        ({"messages": CHAT[:4]}, "messages[3].role", "the last turn must be the assistant's, got 'user'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role 'robot'"),
        ({"text": "just text"}, None, "expected prompt/completion fields or a messages list"),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tok: Any, tmp_path: Path, row: dict, field: str | None, expected: str
) -> None:
    path = write(tmp_path / "bad.jsonl", [{"prompt": "ok?", "completion": " ok."}, row])
    with pytest.raises(DataError) as info:
        load_completions([str(path)], tok, cfg())
    assert str(info.value).startswith(f"{path}, line 2") and expected in str(info.value) and info.value.field == field
    # with data.on_bad_row=skip the row is left out, counted and listed
    examples, summary = load_completions(
        [str(path)], tok, cfg(on_bad_row="skip"), skipped_path=tmp_path / "skipped.jsonl"
    )
    assert len(examples) == 1 and summary.n_skipped == 1
    assert json.loads((tmp_path / "skipped.jsonl").read_text())["row"] == 2


def test_pairs_without_sft_target_are_refused_for_the_whole_file(tok: Any, tmp_path: Path) -> None:
    rows = [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."}]
    for path in (write(tmp_path / "p.jsonl", rows), tmp_path / "p.csv"):
        if path.suffix == ".csv":
            path.write_text("prompt,chosen,rejected\nSky?, Blue., Red.\n")
        for call in (
            lambda p: load_completions([str(p)], tok, cfg(on_bad_row="skip")),
            lambda p: check_completions([str(p)], cfg()),
        ):
            with pytest.raises(DataError, match="set data.sft_target=chosen to train on the chosen responses") as info:
                call(path)
            assert PAIRS_NEED_TARGET in str(info.value) and str(path) in str(info.value)
    wrong = write(tmp_path / "c.jsonl", [{"prompt": "Sky?", "completion": " Blue."}])
    with pytest.raises(DataError, match="data.sft_target=chosen reads preference pairs.*unset data.sft_target"):
        load_completions([str(wrong)], tok, cfg(sft_target="chosen"))


def test_tables_need_the_columns_of_one_kind_and_columns_rename(tok: Any, tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("question,answer\nSky?, Blue.\n")
    with pytest.raises(DataError, match="expected prompt/completion columns or a messages column"):
        load_completions([str(csv)], tok, cfg())
    [ex], _ = load_completions([str(csv)], tok, cfg(columns={"prompt": "question", "completion": "answer"}))
    assert scored_text(tok, ex) == [" Blue.<|endoftext|>"]
    Config().override(["data.columns={prompt: question, completion: answer}"]).validate()


def test_chat_rows_need_a_chat_template(tok: Any, tmp_path: Path) -> None:
    plain = type(tok).from_pretrained(str(TOKENIZER_DIR))
    plain.chat_template = None
    path = write(tmp_path / "m.jsonl", [{"messages": CHAT}])
    with pytest.raises(ModelError, match="no chat_template"):
        load_completions([str(path)], plain, cfg(on_bad_row="skip"))


# ---- batches -------------------------------------------------------------------------------------
def test_padded_layout_and_packed_score_the_same_tokens() -> None:
    """prompt [5, 6], completion [7, 2] and prompt [5], completion [8]: token t is scored at t - 1."""
    a, b = TokenizedCompletion([5, 6, 7, 2], [(2, 4)], 0), TokenizedCompletion([5, 8], [(1, 2)], 1)
    batch = CompletionCollator(0, pad_to_multiple_of=None)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["score_index"].tolist() == [[0, 0, 1], [1, 2, 0], [7, 2, 8], [0, 0, 1]]
    packed = PackedCompletionCollator(0, attention_tokens=float("inf"), varlen=True)([a, b])  # one row
    assert packed["input_ids"].tolist() == [[5, 6, 7, 2, 5, 8]] and packed["position_ids"].tolist() == [
        [0, 1, 2, 3, 0, 1]
    ]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    assert packed["score_index"].tolist() == [[0, 0, 0], [1, 2, 4], [7, 2, 8], [0, 0, 1]]
    assert packed["cu_seq_q"].tolist() == [0, 4, 6] and packed["example_index"].tolist() == [0, 1]


# ---- config and card ---------------------------------------------------------------------------
def test_config_keys() -> None:
    cfg_ = Config().override(["data.sft_target=chosen", "data.sft_loss_on=last_assistant"]).validate()
    assert (cfg_.data.sft_target, cfg_.data.sft_loss_on) == ("chosen", "last_assistant")
    assert Config().data.sft_target is None and Config().data.sft_loss_on == "all_assistant"
    for bad in ("data.sft_target=rejected", "data.sft_loss_on=all"):
        with pytest.raises(ConfigError, match="is not one of"):
            Config().override([bad])


def test_card_says_sft_and_its_settings_not_dpo_loss() -> None:
    cfg_ = Config().override(["data.sft_target=chosen"])
    summary = SimpleNamespace(
        n_read=5, n_kept=4, dropped={"completion empty after truncation": 1}, n_skipped=0, unit="examples"
    )
    text = card.render_card(
        card.run_facts(cfg_, 10, {"loss": 1.0}, {"eval/loss": 2.0}, {"train": summary}, "sft"), "model"
    )
    assert "trained with SFT" in text and "token-level NLL of the chosen responses" in text
    assert "| `data.sft_target` | `chosen` |" in text and "5 examples read, 4 kept, 1 dropped" in text
    assert "`loss." not in text and "\nloss:" not in text  # no DPO loss settings, in the table or the config
    assert (
        "beta" not in text and "reference:" not in text and "`reference." not in text
    )  # DPO's settings, also left out of the reproduce config
    assert "dpokit sft config.yaml" in text and "- sft" in text and "- dpo\n" not in text
