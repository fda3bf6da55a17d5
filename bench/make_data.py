"""Generate data/bench/pairs.jsonl: a deterministic chat preference set with a realistic length spread.

Shape (as in Anthropic HH and UltraFeedback): a long system preamble shared by many pairs, 0-2 earlier
user/assistant turns, a final user question (prompt ~100-350 SmolLM2 tokens with the chat template),
then a chosen and a rejected assistant reply of uneven length (~20-200 tokens each, drawn
independently, so the two rows of a pair differ in length as in real data).

Rows are conversational: {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}.
The text is assembled from word banks with a fixed seed; it only has to look and tokenize like chat.

    python bench/make_data.py                 # rewrite data/bench/pairs.jsonl (256 pairs)
    python bench/make_data.py --check TOK     # also print token-length stats with a tokenizer folder
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "bench" / "pairs.jsonl"

SYSTEMS = [
    "You are a careful, friendly assistant for a public library. Answer questions about books, opening hours, "
    "membership and research help. Be accurate and say so when you are unsure. Keep answers short unless the "
    "reader asks for detail, use plain language, never invent titles or authors, and point to a librarian "
    "for anything that needs an account lookup.",
    "You are a support agent for a small software company that makes a note-taking app for phones and laptops. "
    "Help users with sync problems, exports, billing and keyboard shortcuts. Ask one clarifying question when "
    "the problem is ambiguous. Do not promise features that are not released, and never ask for passwords.",
    "You are a cooking assistant. Suggest recipes from the ingredients people have, explain techniques step by "
    "step, give temperatures in both Celsius and Fahrenheit, and mention common allergens. Prefer simple home "
    "equipment. If a request is unsafe, such as storing cooked rice warm overnight, explain the risk politely.",
    "You are a travel planning assistant. Help people plan trips: routes, budgets, seasons, packing lists and "
    "local customs. Be honest about uncertainty in prices and schedules, which change often, and suggest "
    "checking official sources. Keep a calm, encouraging tone and avoid long lists unless asked for one.",
    "You are a patient tutor for secondary-school mathematics and physics. Explain ideas with small worked "
    "examples, check the student's reasoning instead of only giving answers, and encourage them to try the "
    "next step themselves. Use units consistently and point out common mistakes when you see them.",
]

TOPICS = {
    "library": ["renewing a loan", "finding a history of the railway", "a reading list on climate", "the quiet study rooms",
                "interlibrary loans", "e-book lending", "printing at the branch", "a book club for teenagers"],
    "software": ["notes that do not sync", "exporting notebooks to PDF", "a double charge on the invoice",
                 "shortcuts on a laptop", "restoring a deleted page", "sharing a notebook with a team", "offline mode"],
    "cooking": ["a dinner from lentils and spinach", "bread that does not rise", "a dessert without eggs",
                "roasting vegetables evenly", "a quick weekday soup", "cooking rice on a stove", "a picnic menu"],
    "travel": ["a week in Portugal by train", "a cheap weekend in the mountains", "packing for a rainy autumn trip",
               "visiting Japan in spring", "a road trip with two children", "avoiding jet lag", "a city break in winter"],
    "tutoring": ["solving a quadratic equation", "the speed of a falling stone", "adding fractions", "Ohm's law",
                 "drawing a force diagram", "percent change", "the area of a circle", "simple probability"],
}
DOMAIN_OF_SYSTEM = ["library", "software", "cooking", "travel", "tutoring"]

SUBJECTS = ["I", "My partner", "My friend", "Our team", "My daughter", "My neighbour", "Someone at work", "We"]
VERBS = ["tried", "looked at", "asked about", "read about", "worked on", "thought about", "struggled with", "planned"]
DETAILS = [
    "last week and it did not go as expected", "a few times already", "but the instructions were confusing",
    "and I would like a second opinion", "without much luck so far", "and we are short on time",
    "because the deadline is on Friday", "after reading several forum posts", "and the result was only half right",
    "on an old laptop with little memory", "with a very small budget", "for the first time",
]
FILLER = [
    "The first thing to check is whether the basic assumptions hold.",
    "It helps to write down what you already know before changing anything.",
    "Most people find that a small test run saves time later.",
    "There are two common approaches, and each has a trade-off.",
    "If the simple fix does not work, the next step is to look at the details.",
    "A useful rule of thumb is to change one thing at a time.",
    "Keep a short note of what you tried, so you can undo it.",
    "The exact numbers depend on your situation, so treat them as a starting point.",
    "It is worth checking the official guidance, because it changes from time to time.",
    "Many beginners skip this step, which is why the result looks wrong.",
    "Once that works, you can make it faster or cheaper.",
    "This also explains the behaviour you noticed earlier.",
    "In practice the difference is small, but it matters for larger cases.",
    "A quick way to verify the answer is to estimate it roughly first.",
    "If you are unsure, ask for help before the last step rather than after it.",
    "That said, your first attempt was close, and the idea behind it was sound.",
]
VAGUE = [
    "It depends.", "You could try a few things.", "Maybe search online for it.", "That is a common problem.",
    "There are many options here.", "Just do what seems right.", "It should probably work eventually.",
    "Some people like it and some do not.", "I am not sure, but it might be fine.", "Try again later.",
]


def _question(rng: random.Random, topic: str) -> str:
    parts = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {topic} {rng.choice(DETAILS)}."]
    for _ in range(rng.randint(0, 2)):
        parts.append(rng.choice(FILLER))
    parts.append(rng.choice(["What would you suggest?", "Can you explain what to do next?", "Is there a better way?",
                             "What am I missing?", "How should I start?", "Could you walk me through it?"]))
    return " ".join(parts)


def _reply(rng: random.Random, topic: str, n_sentences: int, helpful: bool) -> str:
    if helpful:
        lines = [f"Good question about {topic}."]
        for i in range(n_sentences):
            sentence = rng.choice(FILLER)
            lines.append(f"{i + 1}. {sentence}" if n_sentences > 4 and i % 3 == 0 else sentence)
        return " ".join(lines)
    lines = [rng.choice(VAGUE) for _ in range(max(4, 2 * n_sentences))]  # vague sentences are short
    return " ".join(lines)


def _n_sentences(rng: random.Random) -> int:
    """Reply length in sentences (~13 tokens each): skewed, mostly short, a long tail up to ~200 tokens."""
    return min(14, max(1, int(rng.lognormvariate(1.4, 0.7))))


def make_pairs(n: int = 256, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    # Pairs come in groups that share a conversation so far (system + earlier turns): long common prefixes.
    while len(rows) < n:
        s = rng.randrange(len(SYSTEMS))
        topics = TOPICS[DOMAIN_OF_SYSTEM[s]]
        history = [{"role": "system", "content": SYSTEMS[s]}]
        for _ in range(rng.choice([0, 1, 1, 2, 2])):
            t = rng.choice(topics)
            history.append({"role": "user", "content": _question(rng, t)})
            history.append({"role": "assistant", "content": _reply(rng, t, rng.randint(1, 3), helpful=True)})
        for _ in range(rng.randint(1, 4)):  # several final questions on the same shared context
            t = rng.choice(topics)
            prompt = history + [{"role": "user", "content": _question(rng, t)}]
            good = _reply(rng, t, _n_sentences(rng), helpful=True)
            bad = _reply(rng, t, _n_sentences(rng), helpful=rng.random() < 0.4)
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows[:n]


def write(path: Path = OUT, n: int = 256, seed: int = 1234) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in make_pairs(n, seed):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def length_stats(path: Path, tokenizer_dir: str) -> dict[str, list[int]]:
    """Prompt / response token lengths with a tokenizer's chat template (as both trainers render them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        p = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        out["prompt"].append(len(tok(p, add_special_tokens=False).input_ids))
        for k in ("chosen", "rejected"):
            full = tok.apply_chat_template(row["prompt"] + row[k], tokenize=False)
            out[k].append(len(tok(full, add_special_tokens=False).input_ids) - out["prompt"][-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--check", metavar="TOKENIZER_DIR", help="print token-length stats with this tokenizer")
    args = ap.parse_args()
    path = write(args.out, args.n, args.seed)
    print(f"wrote {args.n} pairs to {path}")
    if args.check:
        for k, v in length_stats(path, args.check).items():
            v = sorted(v)
            print(f"{k:9s} min {v[0]:4d}  p10 {v[len(v) // 10]:4d}  median {v[len(v) // 2]:4d}  "
                  f"p90 {v[9 * len(v) // 10]:4d}  max {v[-1]:4d}")


if __name__ == "__main__":
    main()
