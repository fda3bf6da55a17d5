"""The sampling stage: n responses per prompt from the one sampler, in chunks. `dpokit sample` writes
them as a candidates file for people to label; `dpokit pairs` (dpokit/apps/pairs.py) hands them to a
judge instead. Both commands run the stage here, with the settings of `SampleSettings`.

Candidates (the format of `dpokit.data.labels`, read by `read_candidates`), one JSON line per prompt::

    {"id": "c0007", "prompt": [{"role": "user", "content": "Write a review of ..."}],
     "responses": ["first sampled response", "second sampled response"], "model": "smollm2-135m-instruct"}

``id`` is ``c`` + the prompt's 0-based position in the prompts file (four digits at least), so the
same prompts file gives the same ids whatever ``--limit`` says. ``prompt`` is one user message for
models with a chat template (as `dpokit pairs` writes its rows), the plain string otherwise.
``responses`` keeps every sample in the order drawn, an empty one included (counted in the summary):
labels refer to responses by index, so none is dropped or moved.

Chunks: prompts are sampled ``chunk_prompts`` at a time and chunk k samples with seed ``seed + k``;
each chunk's rows are written before the next is sampled, so an interrupted run keeps what it made.

CLI: ``dpokit sample --model M --prompts P --n 2 --out CANDIDATES.jsonl`` (`add_sample_arguments` +
`sample_command`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from dpokit.data.files import read_prompts
from dpokit.errors import DpokitError
from dpokit.models import sources


@dataclass
class SampleSettings:
    """What the sampling stage reads and how it samples; `dpokit pairs`'s `PairsSettings` extends it.
    The field defaults are the commands' defaults, written only here (and where a subclass overrides
    one): the argument parsers take theirs from these fields."""

    model: str  # a model folder, .gguf file or alias (any `dpokit.models.sources` source)
    prompts: str  # .jsonl with {"prompt": ...} lines, or .txt
    out: str  # the JSONL file to write
    n_samples: int = 2  # responses sampled per prompt (`dpokit sample --n`): one pair to label
    seed: int = 0
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # sequences generated together
    limit: int | None = None  # use only the first N prompts
    dtype: str = "auto"
    device: str | None = None  # default: cuda if available
    chunk_prompts: int = 64  # prompts per chunk; rows are written after each chunk
    allow_pickle: bool = False
    trust_remote_code: bool = False
    progress: bool = True


LIBRARY_ONLY = {"chunk_prompts"}  # settings the commands have no option for
S = TypeVar("S", bound=SampleSettings)


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """``cls`` from parsed arguments: every field but the library-only ones has an option of that dest."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in LIBRARY_ONLY})


def is_chat(tokenizer: Any) -> bool:
    """Whether prompts go to this tokenizer as chat messages (it has a chat template)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(prompt: str, conversational: bool) -> str | list[dict[str, str]]:
    """The prompt as written to a file: one user message for chat models, else the text."""
    return [{"role": "user", "content": prompt}] if conversational else prompt


def candidate_id(index: int) -> str:
    """The candidates-file id of the prompt at 0-based position ``index``: ``c0007``."""
    return f"c{index:04d}"


# ---- the stage --------------------------------------------------------------------------------
def load_prompts(st: SampleSettings) -> list[str]:
    """The prompts of ``st.prompts``, the first ``st.limit`` of them when set."""
    if st.limit is not None and st.limit < 1:
        raise DpokitError(f"--limit must be >= 1, got {st.limit}")
    if st.chunk_prompts < 1:
        raise DpokitError(f"chunk_prompts must be >= 1, got {st.chunk_prompts}")
    prompts = read_prompts(st.prompts)
    return prompts if st.limit is None else prompts[: st.limit]


def load_sampler(st: SampleSettings) -> tuple[Any, Any]:
    """(model on its device, tokenizer) of ``st.model``; a GGUF file is dequantized once into a cached
    folder (what training and evaluation load too)."""
    import torch

    from dpokit.models.loading import resolve_dtype

    device = st.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    source = sources.materialize_gguf(sources.resolve_source(st.model), log=lambda m: print(m, file=sys.stderr))
    lm = sources.load_model(
        source, dtype=resolve_dtype(st.dtype, device), allow_pickle=st.allow_pickle,
        trust_remote_code=st.trust_remote_code,
    ).to(device)  # fmt: skip
    tokenizer = sources.load_tokenizer(source, trust_remote_code=st.trust_remote_code)
    print(f"loaded {source} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return lm, tokenizer


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int = SampleSettings.n_samples,
    max_new_tokens: int = SampleSettings.max_new_tokens,
    temperature: float = SampleSettings.temperature,
    top_p: float = SampleSettings.top_p,
    seed: int = SampleSettings.seed,
    batch_size: int = SampleSettings.batch_size,
    progress: bool = False,
) -> list[list[str]]:
    """``responses[i][j]``: the text of sample j of prompt i, from the one sampler (`generate_samples`)."""
    from dpokit.eval.sampling import generate_samples  # torch: loaded when sampling, not for `--help`

    samples = generate_samples(
        model, tokenizer, list(prompts), n=n, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return [[s.text for s in group] for group in samples]


@dataclass
class Chunk:
    """One chunk of the stage: prompts ``start .. start + len(prompts)`` and their sampled responses."""

    index: int  # k: sampled with seed + k
    start: int  # position of its first prompt in the prompt list
    prompts: list[str]
    responses: list[list[str]]  # responses[i][j]: sample j of prompts[i]


def sample_chunks(
    model: Any, tokenizer: Any, prompts: Sequence[str], st: SampleSettings, desc: str,
    postfix: Callable[[], dict[str, Any]] | None = None,
) -> Iterator[Chunk]:  # fmt: skip
    """The sampling stage: ``st.n_samples`` responses per prompt, ``st.chunk_prompts`` prompts at a
    time, chunk k with seed ``st.seed + k``. The progress bar (``st.progress``, named ``desc``) moves
    once the caller is done with a chunk, showing ``postfix()`` when given."""
    bar = None
    if st.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        for k, start in enumerate(range(0, len(prompts), st.chunk_prompts)):
            chunk = list(prompts[start : start + st.chunk_prompts])
            responses = sample_responses(
                model, tokenizer, chunk, n=st.n_samples, max_new_tokens=st.max_new_tokens,
                temperature=st.temperature, top_p=st.top_p, seed=st.seed + k, batch_size=st.batch_size,
            )  # fmt: skip
            yield Chunk(k, start, chunk, responses)
            if bar is not None:
                bar.update(len(chunk))
                if postfix is not None:
                    bar.set_postfix(postfix())
    finally:
        if bar is not None:
            bar.close()


# ---- the `dpokit sample` command --------------------------------------------------------------
@dataclass
class SampleStats:
    """What a `dpokit sample` run wrote."""

    prompts: int = 0
    responses: int = 0
    empty_responses: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return f"{self.prompts} prompts x {self.responses // max(1, self.prompts)} responses ({self.empty_responses} empty)"


def candidate_rows(chunk: Chunk, conversational: bool, model: str) -> list[dict[str, Any]]:
    """The candidates-file rows of one chunk (the format of `dpokit.data.labels.read_candidates`)."""
    return [
        {"id": candidate_id(chunk.start + i), "prompt": chat_prompt(prompt, conversational),
         "responses": list(responses), "model": model}
        for i, (prompt, responses) in enumerate(zip(chunk.prompts, chunk.responses))
    ]  # fmt: skip


def run_sample_command(settings: SampleSettings) -> SampleStats:
    """Load the model, sample ``n_samples`` responses per prompt and write the candidates file to
    ``settings.out``, a chunk at a time. Prints a summary and returns the counts."""
    st = settings
    if st.n_samples < 1:
        raise DpokitError(f"--n must be >= 1 (1 for binary labelling, 2 or more for pairs), got {st.n_samples}")
    prompts = load_prompts(st)  # a missing or bad prompts file fails before the slow model load
    lm, tokenizer = load_sampler(st)
    conversational = is_chat(tokenizer)
    out_path = Path(st.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = SampleStats()
    start = time.perf_counter()
    with out_path.open("w", encoding="utf-8") as f:
        for chunk in sample_chunks(lm, tokenizer, prompts, st, "sample"):
            for row in candidate_rows(chunk, conversational, st.model):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            stats.prompts += len(chunk.prompts)
            stats.responses += sum(len(r) for r in chunk.responses)
            stats.empty_responses += sum(not t.strip() for r in chunk.responses for t in r)
    stats.seconds = time.perf_counter() - start
    print(stats.summary())
    print(f"wrote {stats.prompts} candidates to {out_path} in {stats.seconds:.0f}s; label them with `dpokit label`")
    return stats


def add_sampling_arguments(parser: argparse.ArgumentParser, d: type[SampleSettings], out_help: str) -> None:
    """The options of the sampling stage, shared by `dpokit sample` and `dpokit pairs`; each ``dest``
    is the settings field it sets and each default that field's default in ``d``."""
    add = parser.add_argument
    add("--model", required=True, help="model folder, .gguf file or alias (smollm2-135m-instruct)")
    add("--prompts", required=True, help='prompts: .jsonl with {"prompt": ...} lines, or .txt')
    add("--out", required=True, help=out_help)
    add("--seed", type=int, default=d.seed)
    add("--max-new-tokens", type=int, default=d.max_new_tokens)
    add("--temperature", type=float, default=d.temperature)
    add("--top-p", type=float, default=d.top_p)
    add("--batch-size", type=int, default=d.batch_size, help=f"sequences generated together (default: {d.batch_size})")
    add("--limit", type=int, default=d.limit, help="use only the first N prompts")
    add("--dtype", default=d.dtype, help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16")
    add("--device", default=d.device, help="cpu or cuda (default: cuda if available)")
    add("--allow-pickle", action="store_true", default=d.allow_pickle, help="allow loading pytorch_model.bin weights")
    add("--trust-remote-code", action="store_true", default=d.trust_remote_code)
    add("--no-progress", dest="progress", action="store_false", default=d.progress, help="no progress bar")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `dpokit sample` options to ``parser``; each ``dest`` is the `SampleSettings` field it sets."""
    d = SampleSettings
    add_sampling_arguments(parser, d, "output JSONL candidates file (id, prompt, responses, model per prompt)")
    parser.add_argument("--n", "--n-samples", dest="n_samples", type=int, default=d.n_samples,
                        help=f"responses per prompt (default: {d.n_samples}, one pair; 1 for binary labelling)")  # fmt: skip


def sample_command(args: argparse.Namespace) -> int:
    """Run `dpokit sample` from parsed arguments; returns the exit status."""
    run_sample_command(settings_from_args(SampleSettings, args))
    return 0
