"""The reward model's pieces without a model: the Bradley-Terry loss by hand, the optional per-pair
margin column (read, validated, carried through tokenizing, the cache and the collators), where each
sequence's last token sits in every batch layout, the `reward:` config and presets, the model card
and the CLI's refusals.

Notation: ``sp(x) = ln(1 + e^x)`` (softplus), so ``-log sigma(x) = sp(-x)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dpokit import resources
from dpokit.cli import main
from dpokit.config import Config, DataConfig
from dpokit.data import pairs as pair_data
from dpokit.data.collate import PreferenceCollator, TokenizedPair
from dpokit.data.packing import PackedCollator
from dpokit.errors import ConfigError, DataError
from dpokit.models.reward import last_token_index
from dpokit.objectives.reward import REWARD_KEYS, RewardObjective, _WithMargins, bradley_terry_loss, reward_values
from dpokit.training import card
from tests.conftest import PRESETS

REWARD_PRESETS = ["reward-reviews", "reward-tiny"]


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- the loss ---------------------------------------------------------------------------------
def test_bradley_terry_loss_by_hand() -> None:
    """r_c = (2, 0, -1), r_r = (1, 0, 1), margin = (0.5, 0, 0), c = 0.1:
    d = r_c - r_r - m = (0.5, 0, -2)       -> -log sigma(d) = sp(-d) = (sp(-0.5), ln 2, sp(2))
                                              = (0.474077, 0.693147, 2.126928)
    (r_c + r_r)^2 = (9, 0, 0), c * that    = (0.9, 0, 0)
    loss = (1.374077, 0.693147, 2.126928); without margin and centring: (sp(-1), ln 2, sp(2))."""
    chosen, rejected, margin = t(2, 0, -1), t(1, 0, 1), t(0.5, 0, 0)
    got = bradley_terry_loss(chosen, rejected, margin, center_coefficient=0.1)
    want = [sp(-0.5) + 0.9, math.log(2), sp(2)]
    torch.testing.assert_close(got, t(*want), atol=1e-6, rtol=1e-6)
    assert abs(want[0] - 1.374077) < 1e-6 and abs(want[2] - 2.126928) < 1e-6  # the docstring's figures
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), t(sp(-1), math.log(2), sp(2)))
    assert got.shape == (3,)  # unreduced: one loss per pair


def test_bradley_terry_loss_is_stable_and_differentiable() -> None:
    chosen = torch.tensor([200.0, -200.0], requires_grad=True)
    rejected = torch.tensor([-200.0, 200.0], requires_grad=True)
    losses = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(losses).all() and losses[0] == 0 and abs(losses[1].item() - 400.0) < 1e-3
    losses.sum().backward()
    # d/dr_c -log sigma(r_c - r_r) = -sigma(r_r - r_c): 0 for the easy pair, -1 for the hopeless one
    torch.testing.assert_close(chosen.grad, t(0.0, -1.0))
    torch.testing.assert_close(rejected.grad, t(0.0, 1.0))


def test_reward_values_in_key_order() -> None:
    """Accuracy counts a tie as a miss (as TRL: chosen > rejected)."""
    values = reward_values(t(0.1, 0.2), t(1.0, 0.0), t(0.0, 0.0))
    assert len(REWARD_KEYS) == values.shape[0] == 5
    want = {"loss": [0.1, 0.2], "reward/accuracy": [1.0, 0.0], "reward/margin": [1.0, 0.0],
            "reward/chosen": [1.0, 0.0], "reward/rejected": [0.0, 0.0]}  # fmt: skip
    for key, row in zip(REWARD_KEYS, values.tolist()):
        assert row == pytest.approx(want[key]), key


# ---- the margin column ------------------------------------------------------------------------
ROW = {"prompt": "p", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize(("margin", "want"), [(None, 0.0), (2, 2.0), (0.25, 0.25), (-1.5, -1.5)])
def test_margin_is_read_from_the_row(margin: object, want: float) -> None:
    row = dict(ROW) if margin is None else {**ROW, "margin": margin}
    assert pair_data.normalize_row(row, "data.jsonl", 3).margin == want
    assert pair_data.normalize_row({**ROW, "margin": None}, "data.jsonl", 3).margin == 0.0  # null = absent


@pytest.mark.parametrize(
    ("margin", "says"),
    [("0.5", "got text '0.5'"), (True, "got a boolean"), ([1], "got a list"), (float("nan"), "got a number nan")],
)
def test_a_margin_that_is_not_a_finite_number_names_file_row_and_field(margin: object, says: str) -> None:
    with pytest.raises(DataError) as info:
        pair_data.normalize_row({**ROW, "margin": margin}, "data.jsonl", 7)
    err = info.value
    assert (err.path, err.row, err.field) == ("data.jsonl", 7, "margin")
    assert "data.jsonl, line 7, field 'margin': expected a finite number" in str(err) and says in str(err), str(err)


def test_csv_margins_are_numeric_text(tmp_path: Path, tiny_tokenizer) -> None:  # noqa: ANN001
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nHi there,good one,bad one,1.5\nHi again,nice,awful,\n")
    pairs, _ = pair_data.load_pairs([str(path)], tiny_tokenizer, DataConfig(cache_tokenized=False))
    assert [p.margin for p in pairs] == [1.5, 0.0]  # an empty cell is no margin
    path.write_text("prompt,chosen,rejected,margin\nHi there,good one,bad one,large\n")
    with pytest.raises(DataError, match=r"pairs.csv, line 2, field 'margin': expected a finite number.*'large'"):
        pair_data.load_pairs([str(path)], tiny_tokenizer, DataConfig(cache_tokenized=False))


def test_margins_survive_tokenizing_the_cache_and_weights(tmp_path: Path, tiny_tokenizer) -> None:  # noqa: ANN001
    rows = [
        {"prompt": f"Tell me {i}.", "chosen": f"good {i}", "rejected": f"bad {i}", "margin": i / 2} for i in range(4)
    ]
    rows[1].pop("margin")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(cache_tokenized=True)
    first, s1 = pair_data.load_pairs([str(path)], tiny_tokenizer, cfg)
    again, s2 = pair_data.load_pairs([str(path)], tiny_tokenizer, cfg)  # from the tokenized-pairs cache
    assert "cache hit" in s2.render() and "cache hit" not in s1.render()
    assert [p.margin for p in first] == [p.margin for p in again] == [0.0, 0.0, 1.0, 1.5]
    from dpokit.data.files import DataFiles

    doubled, _ = pair_data.load_pairs(DataFiles([str(path)], weights=[2.0]), tiny_tokenizer, cfg)
    assert sorted(p.margin for p in doubled) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.5, 1.5]  # repeats keep theirs


def test_a_bad_margin_is_skipped_under_on_bad_row_skip(tmp_path: Path, tiny_tokenizer) -> None:  # noqa: ANN001
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**ROW, "margin": "big"}) + "\n" + json.dumps({**ROW, "margin": 1}) + "\n")
    cfg = DataConfig(on_bad_row="skip", cache_tokenized=False)
    pairs, summary = pair_data.load_pairs([str(path)], tiny_tokenizer, cfg, skipped_path=tmp_path / "skipped.jsonl")
    assert [p.margin for p in pairs] == [1.0] and summary.n_skipped == 1
    assert json.loads((tmp_path / "skipped.jsonl").read_text())["field"] == "margin"


@pytest.fixture(scope="module")
def tiny_tokenizer():  # noqa: ANN201
    from transformers import AutoTokenizer

    from dpokit.models.tiny import ASSET_TOKENIZER

    return AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER))


# ---- batches: margins and last tokens ----------------------------------------------------------
def _pairs() -> list[TokenizedPair]:
    # one-token responses too: a rejected branch of one token is predicted from the prompt
    return [
        TokenizedPair([5, 6], [7, 8, 9], [10], index=0, margin=0.5),
        TokenizedPair([11], [12], [13, 14, 15, 16], index=1),
        TokenizedPair([17, 18, 19], [20, 21], [22, 23], index=2, margin=-1.0),
    ]


LAYOUTS = {
    "padded": lambda: PreferenceCollator(0, pad_to_multiple_of=8),
    "packing": lambda: PackedCollator(0, packing=True, max_tokens=9),
    "prefix sharing": lambda: PackedCollator(0, packing=False, prefix_sharing=True),
    "both": lambda: PackedCollator(0, packing=True, prefix_sharing=True, max_tokens=12),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_last_token_of_every_sequence_in_every_layout(name: str) -> None:
    """Sequence s < B is pair s's prompt + chosen, s >= B pair s - B's prompt + rejected (the padded
    order): at (rows[s], cols[s]) sits that response's last token, and no later token of it follows."""
    pairs = _pairs()
    batch = _WithMargins(LAYOUTS[name]())(pairs)
    torch.testing.assert_close(batch["margin"], t(0.5, 0.0, -1.0))
    rows, cols = last_token_index(batch)
    assert rows.shape == cols.shape == (6,)
    ids = batch["input_ids"]
    for s, response in enumerate([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]):
        assert ids[rows[s], cols[s]] == response[-1], (name, s)
        if name != "padded":  # the position is the response's end: the next position is another unit's or padding
            segment = batch["segment_ids"][rows[s]]
            after = cols[s] + 1
            assert (
                after == ids.shape[1]
                or segment[after] != segment[cols[s]]
                or (
                    "branch_ids" in batch
                    and batch["branch_ids"][rows[s], after] != batch["branch_ids"][rows[s], cols[s]]
                )
            )
        else:
            assert batch["attention_mask"][s, cols[s]] == 1 and batch["attention_mask"][s, cols[s] + 1 :].sum() == 0


def test_with_margins_keeps_the_layout() -> None:
    inner = PackedCollator(0, packing=False, prefix_sharing=True)
    wrapped = _WithMargins(inner)
    assert wrapped.describe() == inner.describe()
    batch, plain = wrapped(_pairs()), inner(_pairs())
    assert set(batch) == set(plain) | {"margin"} and all(torch.equal(batch[k], plain[k]) for k in plain)


# ---- config, presets, CLI ------------------------------------------------------------------------
def test_reward_config_section() -> None:
    cfg = Config().override(["reward.center_rewards_coefficient=0.01"]).validate()
    assert cfg.reward.center_rewards_coefficient == 0.01 and "reward:" in cfg.to_yaml()
    with pytest.raises(ConfigError, match="reward.center_rewards_coefficient must be >= 0"):
        Config().override(["reward.center_rewards_coefficient=-1"]).validate()
    with pytest.raises(ConfigError, match="did you mean reward.center_rewards_coefficient"):
        Config().override(["center_rewards_coefficient=0.01"])
    assert Config().override(["data.columns={margin: score_gap}"]).validate().data.columns == {"margin": "score_gap"}


@pytest.mark.parametrize("name", REWARD_PRESETS)
def test_reward_presets_load_validate_and_name_existing_data(name: str) -> None:
    cfg = Config.from_preset(name).validate()
    assert cfg == Config.from_yaml(PRESETS / f"{name}.yaml") and name in resources.presets()
    files = cfg.data.train_files + cfg.data.eval_files
    assert len(cfg.data.eval_files) == 1 and all(resources.resolve_builtin(f).is_file() for f in files)
    assert cfg.reward.center_rewards_coefficient > 0 and RewardObjective(cfg).name == "reward"
    if name == "reward-reviews":
        assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.lora.enabled
        assert files == ["builtin:reviews/pairs.jsonl", "builtin:reviews/eval_pairs.jsonl"]


def test_reward_command_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reward"]) == 2
    assert "dpokit reward needs a config" in capsys.readouterr().err
    assert main(["reward", "--preset", "reward-tiny", "reward.center_rewards_coefficient=-1"]) == 2
    assert "reward.center_rewards_coefficient must be >= 0" in capsys.readouterr().err


def test_sft_rows_are_refused_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prompt/completion (or messages) rows handed to `dpokit reward`: one line that says what they are."""
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!"}) + "\n")
    csv = tmp_path / "sft.csv"
    csv.write_text("prompt,completion\nHi,Hello!\n")
    for path in (jsonl, csv):
        out = tmp_path / f"run-{path.suffix[1:]}"
        argv = ["reward", "--preset", "reward-tiny", "model.name_or_path=/nonexistent/model",
                f"data.train_files=[{path}]", "data.eval_files=[]", f"train.output_dir={out}"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}") and "'chosen'" in err, err
        assert "These look like SFT rows (prompt/completion or messages)" in err and "prompt, chosen, rejected" in err
        assert "/nonexistent/model" not in err and not out.exists()  # refused before the model was looked at


# ---- the model card --------------------------------------------------------------------------------
def _facts(*overrides: str) -> card.RunFacts:
    cfg = Config.from_preset("reward-tiny").override(["reward.center_rewards_coefficient=0.02", *overrides])
    return card.run_facts(cfg, 50, {"loss": 0.1, "reward/accuracy": 0.9}, {"eval/reward/accuracy": 0.8},
                          objective="reward")  # fmt: skip


def _meta(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_of_a_reward_model() -> None:
    text = card.render_card(_facts(), "model")
    meta = _meta(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["tags"] == ["reward-model", "reward", "dpokit"]  # not "dpo"
    assert "A reward model trained by dpokit" in text and "AutoModelForSequenceClassification" in text
    assert "-log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2`, c = 0.02" in text
    assert "| `reward.center_rewards_coefficient` | `0.02` |" in text
    assert "loss.beta" not in text and "reference.mode" not in text  # DPO's settings are not this model's
    assert "| reward/accuracy | 0.9 | 0.8 |" in text and "dpokit reward config.yaml" in text

    adapter = card.render_card(_facts("lora.enabled=true"), "adapter")
    meta = _meta(adapter)
    assert meta["library_name"] == "peft" and meta["tags"] == ["reward-model", "reward", "dpokit", "lora"]
    assert "pipeline_tag" not in meta and "LoRA adapter (score head included) of a reward model" in adapter
    merged = card.render_card(_facts("lora.enabled=true"), "merged")
    assert _meta(merged)["library_name"] == "transformers" and "A reward model (LoRA adapter merged" in merged
