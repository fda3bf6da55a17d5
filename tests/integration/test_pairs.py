"""AI-feedback pairs end to end on a tiny random llama, with the real VADER judge.

The tokenizer is word-level over a vocabulary that is mostly sentiment words, so even a random model
samples texts VADER can tell apart. Also covers the review prompt set the pairs are built from.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dpokit.apps import prompts as review_prompts
from dpokit.apps.pairs import PairsSettings, add_pairs_arguments, build_pairs, pairs_command, select_pair
from dpokit.data.files import read_prompts
from dpokit.errors import DataError, DpokitError
from dpokit.eval.sampling import generate_samples, render_prompt
from tests.conftest import REVIEWS

transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

REPO = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = (
    "great wonderful love amazing beautiful superb excellent brilliant fun happy "
    "terrible awful hate boring bad worst ugly dull horrible sad "
    "the movie film was a and plot acting is it user assistant review write"
).split()
PROMPTS = ["Write a short review of a western.", "Review a horror film set on a submarine.", "Write a review."]


def tiny_chat_tokenizer(chat: bool = True):
    """A word-level tokenizer (specials + WORDS) with a ChatML template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="[UNK]",
    )  # fmt: skip
    if chat:
        tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_lm():
    tok = tiny_chat_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.2,  # sharper than the default so greedy decoding has clear argmaxes
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, tok


# ---- generation -----------------------------------------------------------------------------


def sample_texts(*args, **kwargs) -> list[list[str]]:
    """The texts of `generate_samples`, the part `build_pairs` uses."""
    return [[s.text for s in group] for group in generate_samples(*args, **kwargs)]



def test_sample_responses_shape_and_determinism(tiny_lm):
    model, tok = tiny_lm
    kwargs = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=4)
    a = sample_texts(model, tok, PROMPTS, seed=1, **kwargs)
    b = sample_texts(model, tok, PROMPTS, seed=1, **kwargs)
    c = sample_texts(model, tok, PROMPTS, seed=2, **kwargs)
    assert a == b and a != c
    assert len(a) == len(PROMPTS) and all(len(group) == 3 for group in a)
    for text in (t for group in a for t in group):
        assert "<|im_start|>" not in text and "<|im_end|>" not in text and "[UNK]" not in text
        assert text == text.strip() and len(text.split()) <= 10
    # the global RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    sample_texts(model, tok, PROMPTS[:1], seed=5, n=2, max_new_tokens=3)
    assert torch.equal(torch.rand(1), expected)


def test_left_padded_batches_match_single_sequences(tiny_lm):
    """Greedy outputs must not depend on batching: left padding + attention mask are right."""
    model, tok = tiny_lm
    prompts = ["Write a review.", "Review the plot and the acting of a boring film with a happy ending and fun."]
    one = sample_texts(model, tok, prompts, n=1, max_new_tokens=8, temperature=0, batch_size=1)
    batched = sample_texts(model, tok, prompts, n=1, max_new_tokens=8, temperature=0, batch_size=8)
    assert one == batched
    assert any(group[0] for group in one)


def test_samples_keep_the_drawn_ids(tiny_lm):
    """Each `Sample` holds the prompt as fed, the drawn tokens up to the first EOS, and their text."""
    model, tok = tiny_lm
    groups = generate_samples(model, tok, PROMPTS, n=2, max_new_tokens=10, temperature=1.0, seed=3, batch_size=4)
    assert [len(g) for g in groups] == [2] * len(PROMPTS)
    eos = tok.eos_token_id
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            assert s.prompt_ids == tok(render_prompt(tok, prompt)[0], add_special_tokens=False)["input_ids"]
            assert eos not in s.response_ids[:-1] and s.finished == (s.response_ids[-1:] == [eos])
            assert len(s.response_ids) == 10 or s.finished  # stopped early only at EOS
            assert s.n_tokens == len(s.response_ids) - int(s.finished)
            assert s.text == tok.decode(s.response_ids, skip_special_tokens=True).strip()
    with pytest.raises(DpokitError, match=">= 1"):
        generate_samples(model, tok, PROMPTS, n=0)


def test_render_prompt_uses_chat_template(tiny_lm):
    _, tok = tiny_lm
    text, add_special = render_prompt(tok, "hi")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and add_special is False
    assert render_prompt(tiny_chat_tokenizer(chat=False), "hi") == ("hi", True)


# ---- pairs ----------------------------------------------------------------------------------


def test_build_pairs_with_vader(tiny_lm):
    from dpokit.eval.judges import get_judge

    model, tok = tiny_lm
    rows, stats = build_pairs(model, tok, PROMPTS, "vader", n_samples=4, min_gap=0.1, max_new_tokens=12, seed=0)
    assert stats.prompts == 3 and stats.kept == len(rows) >= 2
    assert stats.kept + stats.dropped == 3
    vader = get_judge("vader")
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"] in PROMPTS
        assert len(row["prompt"]) == len(row["chosen"]) == len(row["rejected"]) == 1
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen and rejected and chosen != rejected
        assert row["chosen_score"] >= row["rejected_score"] + 0.1
        assert vader([chosen, rejected]) == [row["chosen_score"], row["rejected_score"]]
    assert stats.mean_gap >= 0.1 and stats.mean_chosen_score > stats.mean_rejected_score
    assert json.loads(json.dumps(rows)) == rows  # JSON-serialisable as is
    again, _ = build_pairs(model, tok, PROMPTS, "vader", n_samples=4, min_gap=0.1, max_new_tokens=12, seed=0)
    assert again == rows


def test_min_gap_drops_pairs_the_judge_cannot_separate(tiny_lm):
    model, tok = tiny_lm
    rows, stats = build_pairs(model, tok, PROMPTS, lambda texts: [0.5] * len(texts), n_samples=2, max_new_tokens=6)
    assert rows == [] and stats.dropped_small_gap + stats.dropped_empty == 3
    rows, stats = build_pairs(
        model, tok, PROMPTS, lambda texts: [float(len(t)) for t in texts], n_samples=3, min_gap=0.0,
        max_new_tokens=6, conversational=False,
    )  # fmt: skip
    for row in rows:
        assert isinstance(row["prompt"], str) and isinstance(row["chosen"], str)
        assert len(row["chosen"]) >= len(row["rejected"])
    with pytest.raises(DpokitError, match="n_samples >= 2"):
        build_pairs(model, tok, PROMPTS, "vader", n_samples=1)


def test_select_pair():
    assert select_pair(["a", "", "b"], [0.1, 0.9, -0.2]) == (0, 2)  # the empty one never wins
    assert select_pair(["a", " "], [0.1, 0.9]) is None
    assert select_pair(["x", "y", "z"], [0.5, 0.5, 0.5]) == (0, 0)  # ties: earliest; gap 0 is dropped later


def test_pairs_command_end_to_end(tiny_lm, tmp_path, capsys):
    model, tok = tiny_lm
    model_dir = tmp_path / "tiny"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    out = tmp_path / "out" / "pairs.jsonl"

    parser = argparse.ArgumentParser()
    add_pairs_arguments(parser)
    args = parser.parse_args(
        ["--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out), "--limit", "4",
         "--max-new-tokens", "10", "--n-samples", "4", "--no-progress"]
    )  # fmt: skip
    assert args.judge == "vader"
    assert pairs_command(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(lines) <= 4
    assert all(r["chosen_score"] - r["rejected_score"] >= 0.1 for r in lines)
    assert "prompts kept as pairs" in capsys.readouterr().out


def test_pairs_options_default_to_the_settings():
    """The CLI's defaults are `PairsSettings`'s, and its options fill every field the CLI has."""
    parser = argparse.ArgumentParser()
    add_pairs_arguments(parser)
    args = vars(parser.parse_args(["--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl"]))
    settings = asdict(PairsSettings(model="m", prompts="p.jsonl", out="o.jsonl"))
    assert args == {k: v for k, v in settings.items() if k in args}
    assert set(settings) - set(args) == {"chunk_prompts"}  # library-only


def test_read_prompts_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match="row 2, field 'prompt'"):
        read_prompts(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_prompts(txt) == ["one", "two"]
    with pytest.raises(DpokitError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


# ---- the review prompt set ------------------------------------------------------------------


def test_make_prompts_distinct_and_deterministic():
    a = review_prompts.make_prompts(300, seed=3)
    assert len(set(a)) == 300 and a == review_prompts.make_prompts(300, seed=3)
    assert a != review_prompts.make_prompts(300, seed=4)
    assert all(p.endswith(".") and "review" in p.lower() and "  " not in p for p in a)
    assert not any(" an one-" in p or " a action" in p or " a animated" in p for p in a)
    with pytest.raises(DpokitError):
        review_prompts.make_prompts(review_prompts.prompt_space_size() + 1)


def test_shipped_prompt_files_are_reproducible(tmp_path):
    train_path, eval_path = review_prompts.write_prompt_files(tmp_path, seed=0)
    shipped = REVIEWS
    assert train_path.read_bytes() == (shipped / "train_prompts.jsonl").read_bytes()
    assert eval_path.read_bytes() == (shipped / "eval_prompts.jsonl").read_bytes()
    train, held_out = read_prompts(train_path), read_prompts(eval_path)
    assert len(train) >= 800 and len(held_out) >= 200
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
