"""The offline movie-review task: prompts asking for short movie reviews.

This is dpokit's stand-in for the controlled-sentiment experiment of the DPO paper (section 6.1),
which generated IMDb review continuations and rewarded positive sentiment. Here an instruct model is
asked to *write* a short review; a sentiment judge (`dpokit.eval.judges`) then prefers the more positive
of two samples. The prompts are deliberately neutral: they never ask for praise or criticism, so any
shift in sentiment after training comes from the preference data, not from the prompt.

Prompts are built from the project's own templates (genre x setting x focus x length x phrasing),
sampled without replacement by a seeded RNG, so ``write_prompt_files(dir, seed=0)`` regenerates the
shipped ``dpokit/assets/data/reviews/*.jsonl`` byte for byte.

    python -m dpokit.apps.prompts dpokit/assets/data/reviews --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from dpokit.errors import DpokitError

GENRES = (
    "sci-fi thriller", "romantic comedy", "horror film", "animated family film", "war drama",
    "heist movie", "courtroom drama", "western", "musical", "coming-of-age story", "superhero movie",
    "fantasy epic", "detective mystery", "disaster movie", "sports drama", "psychological thriller",
    "period drama", "buddy comedy", "documentary", "zombie film", "spy thriller", "action movie",
    "indie drama", "space opera",
)  # fmt: skip

SETTINGS = (
    "set on a space station", "set in 1920s Chicago", "set in a small coastal town",
    "set in a haunted hotel", "set in post-war Berlin", "set in a near-future Tokyo",
    "set on a cross-country train", "set in a high school", "set in the Arctic",
    "set in a Parisian bakery", "set during a hurricane", "set in a remote mountain village",
    "set on a pirate ship", "set in a hospital emergency room", "set in a desert mining town",
    "set in a virtual-reality game", "set in Victorian London", "set on a submarine",
    "set at a summer camp", "set in a big-city newsroom",
)  # fmt: skip

FOCUS = (
    "the acting", "the soundtrack", "the visual effects", "the pacing", "the screenplay", "the ending",
    "the cinematography", "the villain", "the dialogue", "the main character", "the plot twists",
    "the direction",
)  # fmt: skip

# Length words: all short, so generations stay within a few dozen tokens.
LENGTHS = ("one-sentence", "two-sentence", "three-sentence", "short", "brief", "very short")

# {a_length} / {a_genre}: the length word / genre with its article ("a one-sentence", "an action movie").
TEMPLATES = (
    "Write {a_length} review of {a_genre} {setting}, focusing on {focus}.",
    "Give {a_length} movie review of {a_genre} {setting}. Comment on {focus}.",
    "You just watched {a_genre} {setting}. Write {a_length} review that discusses {focus}.",
    "Review {a_genre} {setting} in {a_length} paragraph, paying attention to {focus}.",
    "Imagine you are a film critic. Write {a_length} review of {a_genre} {setting}, mentioning {focus}.",
    "Describe your opinion of {a_genre} {setting} in {a_length} review. Say something about {focus}.",
    "Write {a_length} audience review of {a_genre} {setting}, with a comment on {focus}.",
    "Post {a_length} review of {a_genre} {setting} for a movie website, covering {focus}.",
)

_AXES: tuple[Sequence[str], ...] = (TEMPLATES, LENGTHS, GENRES, SETTINGS, FOCUS)
N_TRAIN = 1000
N_EVAL = 250


def _article(phrase: str) -> str:
    # "one-" is pronounced with a consonant sound ("a one-sentence review").
    vowel = phrase[0].lower() in "aeiou" and not phrase.startswith("one")
    return f"{'an' if vowel else 'a'} {phrase}"


def prompt_space_size() -> int:
    """How many distinct prompts the templates can produce."""
    size = 1
    for axis in _AXES:
        size *= len(axis)
    return size


def prompt_at(index: int) -> str:
    """The prompt with this index in the (template, length, genre, setting, focus) product."""
    if not 0 <= index < prompt_space_size():
        raise DpokitError(f"prompt index {index} out of range [0, {prompt_space_size()})")
    picks: list[str] = []
    for axis in reversed(_AXES):  # mixed-radix decoding, last axis varies fastest
        index, digit = divmod(index, len(axis))
        picks.append(axis[digit])
    focus, setting, genre, length, template = picks
    return template.format(a_length=_article(length), a_genre=_article(genre), setting=setting, focus=focus)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts chosen by a seeded RNG; the same (n, seed) always gives the same list."""
    total = prompt_space_size()
    if not 0 <= n <= total:
        raise DpokitError(f"can make at most {total} distinct prompts, asked for {n}")
    # Sampling indices from a range never materialises the product, and without replacement there
    # are no duplicates by construction (every index decodes to a different string).
    indices = random.Random(seed).sample(range(total), n)
    prompts = [prompt_at(i) for i in indices]
    assert len(set(prompts)) == n  # templates differ pairwise, so indices map to distinct strings
    return prompts


def split_prompts(seed: int = 0, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) prompt lists: one draw of n_train + n_eval, cut in two."""
    prompts = make_prompts(n_train + n_eval, seed)
    return prompts[:n_train], prompts[n_train:]


def _write_jsonl(path: Path, prompts: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")


def write_prompt_files(
    out_dir: str | Path, seed: int = 0, n_train: int = N_TRAIN, n_eval: int = N_EVAL
) -> tuple[Path, Path]:
    """Write ``train_prompts.jsonl`` and ``eval_prompts.jsonl`` ({"prompt": ...} per line) to out_dir.

    With the defaults this reproduces the shipped ``dpokit/assets/data/reviews`` files exactly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split_prompts(seed, n_train, n_eval)
    train_path, eval_path = out / "train_prompts.jsonl", out / "eval_prompts.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, held_out)
    return train_path, eval_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpokit.apps.prompts", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write train_prompts.jsonl and eval_prompts.jsonl to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-eval", type=int, default=N_EVAL)
    args = parser.parse_args(argv)
    train_path, eval_path = write_prompt_files(args.out_dir, args.seed, args.n_train, args.n_eval)
    print(f"wrote {args.n_train} prompts to {train_path} and {args.n_eval} to {eval_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
