"""Regenerate dpokit's tiny test assets deterministically.

Writes:
  dpokit/assets/data/toy/train.jsonl, data/toy/eval.jsonl   standard {"prompt", "chosen", "rejected"} pairs
  dpokit/assets/data/toy/chat.jsonl                         conversational rows (message lists, prompt = earlier turns)
  dpokit/assets/data/toy/hh_style.jsonl                     implicit-prompt rows in Anthropic-HH text style
  dpokit/assets/tiny_tokenizer/               byte-level BPE tokenizer with a ChatML chat template

The toy preference signal is per-token and therefore learnable by a tiny randomly-initialised
model in ~100 steps: chosen responses use only POSITIVE words, rejected responses only NEGATIVE
words, in random order and length. Eval pairs use cities never seen in training, so a model that
separates them has learned word preferences rather than memorised prompts.

Usage: python scripts/make_tiny_assets.py [--root REPO_ROOT]
Nothing is downloaded; the output depends only on SEED and the version of `tokenizers`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 1000

POSITIVE = [
    "sunny", "warm", "lovely", "bright", "pleasant", "calm", "gentle", "clear", "wonderful", "delightful",
    "cheerful", "fresh", "friendly", "beautiful", "peaceful", "golden", "sweet", "great", "happy", "charming",
    "relaxing", "splendid", "glorious", "cozy",
]  # fmt: skip
NEGATIVE = [
    "gloomy", "cold", "awful", "dark", "stormy", "grim", "harsh", "muddy", "terrible", "dreadful",
    "miserable", "stale", "rude", "ugly", "noisy", "grey", "bitter", "bad", "sad", "dull",
    "tiring", "soggy", "bleak", "damp",
]  # fmt: skip
TRAIN_CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo",
    "Stockholm", "Helsinki", "Athens", "Warsaw", "Budapest", "Zürich", "Kraków", "Reykjavík", "Montréal", "Toronto",
    "Boston", "Chicago", "Denver", "Seattle", "Austin", "Miami", "Lima", "Bogotá", "São Paulo", "Santiago",
    "Cairo", "Nairobi", "Lagos", "Accra", "Mumbai", "Delhi", "Seoul", "Tokyo", "Osaka", "Sydney",
]  # fmt: skip
EVAL_CITIES = [
    "Malmö", "Łódź", "Porto", "Geneva", "Milan", "Munich", "Quito", "Hanoi", "Perth", "Tunis",
    "Kyoto", "Calgary",
]  # fmt: skip
PROMPTS = [
    "Describe the weather in {city}.",
    "How was your trip to {city}?",
    "What do you think of the food in {city}?",
    "Tell me about your day in {city}.",
    "Write a short review of a hotel in {city}.",
    "How would you describe the people of {city}?",
]
SYSTEM_PROMPTS = ["You are a helpful travel assistant.", "Answer in a few words."]
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# A little general English so the ~1000-token vocabulary also covers common words (the toy data
# alone saturates at ~800 merges) and unseen text does not fall back to single bytes everywhere.
EXTRA_TEXT = [
    "The quick brown fox jumps over the lazy dog while the children watch from the window.",
    "Thank you for your question. Here is a short answer, followed by a longer explanation.",
    "We should always check our work, because small mistakes become large problems over time.",
    "Please write a story about a small robot that learns to paint pictures of the ocean.",
    "Yesterday the train was late, so I walked home through the park and bought some bread.",
    "Can you explain how a computer program reads a file and prints every line it finds?",
    "The model learns which answer people prefer by comparing two responses to the same prompt.",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in many everyday sentences and questions.",
    "I think this is a good idea, but we need more time, more people and a clear plan first.",
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
]


def response(rng: random.Random, words: list[str]) -> str:
    """3-10 words drawn from `words` (repeats allowed), random order, ending with a full stop."""
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + "."


def standard_pairs(rng: random.Random, cities: list[str], n: int) -> list[dict]:
    pairs = []
    for _ in range(n):
        prompt = rng.choice(PROMPTS).format(city=rng.choice(cities))
        pairs.append({"prompt": prompt, "chosen": response(rng, POSITIVE), "rejected": response(rng, NEGATIVE)})
    return pairs


def chat_rows(rng: random.Random, n: int) -> list[dict]:
    """Conversations without a prompt field: the prompt is every turn before the final assistant turn."""
    rows = []
    for i in range(n):
        turns: list[dict] = []
        if i % 3 == 0:
            turns.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if i % 2 == 1:  # multi-turn: an earlier exchange shared by chosen and rejected
            turns.append({"role": "user", "content": rng.choice(PROMPTS).format(city=rng.choice(TRAIN_CITIES))})
            turns.append({"role": "assistant", "content": response(rng, POSITIVE)})
        turns.append({"role": "user", "content": rng.choice(PROMPTS).format(city=rng.choice(TRAIN_CITIES))})
        chosen = turns + [{"role": "assistant", "content": response(rng, POSITIVE)}]
        rejected = turns + [{"role": "assistant", "content": response(rng, NEGATIVE)}]
        rows.append({"chosen": chosen, "rejected": rejected})
    return rows


def hh_rows(rng: random.Random, n: int) -> list[dict]:
    """Anthropic-HH style: only chosen/rejected strings that share the dialogue prefix."""
    rows = []
    for i in range(n):
        prefix = ""
        if i % 2 == 1:
            prefix += "\n\nHuman: Hello there!\n\nAssistant: Hello! How can I help you today?"
        prefix += "\n\nHuman: " + rng.choice(PROMPTS).format(city=rng.choice(TRAIN_CITIES)) + "\n\nAssistant:"
        rows.append(
            {"chosen": prefix + " " + response(rng, POSITIVE), "rejected": prefix + " " + response(rng, NEGATIVE)}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def corpus(datasets: dict[str, list[dict]]) -> list[str]:
    """Every text in the toy data, plus the chat template's role names, for tokenizer training."""
    texts = ["system", "user", "assistant", "\n", *EXTRA_TEXT]
    for rows in datasets.values():
        for row in rows:
            for value in row.values():
                if isinstance(value, str):
                    texts.append(value)
                else:
                    texts.extend(m["content"] for m in value)
    return texts


def build_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Train a byte-level BPE (every unicode string round-trips) and save it for AutoTokenizer.

    tokenizer_config.json is written by hand rather than by transformers' save_pretrained so the
    folder is identical whatever transformers version runs this script, and loads in 4.x and 5.x.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "additional_special_tokens": SPECIAL_TOKENS[2:]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,  # GPT-2 style: no BOS is added to plain text
        "unk_token": None,  # byte-level: nothing is unknown
        "clean_up_tokenization_spaces": False,  # keep decode() lossless
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    args = parser.parse_args()
    rng = random.Random(SEED)
    datasets = {
        "train": standard_pairs(rng, TRAIN_CITIES, 400),
        "eval": standard_pairs(rng, EVAL_CITIES, 100),
        "chat": chat_rows(rng, 20),
        "hh_style": hh_rows(rng, 20),
    }
    for name, rows in datasets.items():
        write_jsonl(args.root / "dpokit" / "assets" / "data" / "toy" / f"{name}.jsonl", rows)
    build_tokenizer(corpus(datasets), args.root / "dpokit" / "assets" / "tiny_tokenizer")
    print(f"wrote {', '.join(f'{k}={len(v)}' for k, v in datasets.items())} rows and the tiny tokenizer")


if __name__ == "__main__":
    main()
