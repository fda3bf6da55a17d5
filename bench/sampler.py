"""dpokit's sampler (each prompt prefilled once, its KV cache shared by its N samples) against plain
``model.generate(num_return_sequences=N)`` (every sample prefills its own copy of the prompt).
Writes docs/benchmarks-sampler.md.

    python bench/sampler.py                  # SmolLM2-135M-Instruct, 32 prompts, N = 4 and 8, 40 new tokens (~5 min, 2 CPU cores)
    python bench/sampler.py --quick          # the tiny random llama, a smoke run (seconds; to runs/bench/sampler-quick.md)

Both sides get the same prompts in the same row order (dpokit's: sorted by prompt length), the same
batch (all prompts x N in one generate call), the same sampling settings and the same seed, so they
make the same random draws: the report also counts how many sampled responses are token-for-token
equal, and checks greedy decoding is identical. Tokens/s = generated tokens (up to and including
EOS) / wall time of the call. One timed run per cell after a warm-up; the machine may be busy, so
the load average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/sampler.py`: make `bench` and `dpokit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

REPO = common.REPO


def load(model: str) -> tuple[Any, Any]:
    import torch

    from dpokit.config import Config
    from dpokit.models.loading import load_model_and_tokenizer

    cfg = Config().override(["model.attn_implementation=sdpa", "model.dtype=float32"])
    model_obj, tok = load_model_and_tokenizer(model, cfg, torch.float32)
    return model_obj.eval(), tok


def hf_generate(
    model: Any, tok: Any, prompts: list[str], n: int, args: argparse.Namespace, temperature: float
) -> tuple[list[list[int]], float]:
    """Plain transformers: one generate call, num_return_sequences=n; (response ids per row, seconds)."""
    import torch

    from dpokit.eval import sampling

    config = sampling._generation_config(model, tok, args.max_new_tokens, temperature, args.top_p, 0)
    eos = set(sampling._eos_ids(model, tok))
    rows = [
        tok(text, add_special_tokens=add)["input_ids"]
        for text, add in (sampling.render_prompt(tok, p) for p in prompts)
    ]
    if temperature > 0:
        config.num_return_sequences = n
    else:  # transformers refuses num_return_sequences > 1 for greedy: the same rows, repeated by hand
        rows = [row for row in rows for _ in range(n)]
    ids, mask = sampling._left_pad(rows, tok.pad_token_id)
    start = time.perf_counter()
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(args.seed)  # generate_samples seeds the same way before its first batch
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    seconds = time.perf_counter() - start
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((k for k, t in enumerate(row) if t in eos), None)
        responses.append(row if end is None else row[: end + 1])
    return responses, seconds


def dpokit_sampler(
    model: Any, tok: Any, prompts: list[str], n: int, args: argparse.Namespace, temperature: float
) -> tuple[list[list[int]], float]:
    from dpokit.eval.sampling import generate_samples

    start = time.perf_counter()
    groups = generate_samples(model, tok, prompts, n=n, max_new_tokens=args.max_new_tokens, temperature=temperature,
                              top_p=args.top_p, seed=args.seed, batch_size=len(prompts) * n)  # fmt: skip
    seconds = time.perf_counter() - start
    return [s.response_ids for group in groups for s in group], seconds


def sorted_prompts(tok: Any, prompts: list[str]) -> list[str]:
    """The prompts in the order generate_samples batches them (stable sort by token length), so the
    plain call sees the same rows in the same order and draws the same random numbers."""
    from dpokit.eval.sampling import render_prompt

    lengths = [len(tok(t, add_special_tokens=a)["input_ids"]) for t, a in (render_prompt(tok, p) for p in prompts)]
    return [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: lengths[i])]


def measure(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.samples:
        cell: dict[str, Any] = {"n": n, "load_before": os.getloadavg()[0]}
        plain, plain_s = hf_generate(model, tok, prompts, n, args, args.temperature)
        shared, shared_s = dpokit_sampler(model, tok, prompts, n, args, args.temperature)
        cell.update(
            plain_s=plain_s, shared_s=shared_s, plain_tokens=sum(map(len, plain)), shared_tokens=sum(map(len, shared)),
            equal=sum(a == b for a, b in zip(plain, shared)), sequences=len(plain), load_after=os.getloadavg()[0],
        )  # fmt: skip
        print(f"N={n}: generate {cell['plain_tokens'] / plain_s:.0f} tok/s, dpokit {cell['shared_tokens'] / shared_s:.0f} tok/s, "
              f"{cell['equal']}/{cell['sequences']} responses token-equal", flush=True)  # fmt: skip
        rows.append(cell)
    return rows


def greedy_check(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace) -> tuple[int, int]:
    """(identical, total) responses of greedy decoding, N = 2, on the first 8 prompts."""
    a, _ = hf_generate(model, tok, prompts[:8], 2, args, 0.0)
    b, _ = dpokit_sampler(model, tok, prompts[:8], 2, args, 0.0)
    return sum(x == y for x, y in zip(a, b)), len(a)


def render(
    args: argparse.Namespace, rows: list[dict[str, Any]], greedy: tuple[int, int], env: dict[str, Any], minutes: float
) -> str:
    command = "python bench/sampler.py" + (" --quick" if args.quick else "")
    lines = [
        "# Benchmark: dpokit's sampler (shared prompt cache) vs `generate(num_return_sequences=N)`",
        "",
        "Generated by (do not edit by hand; rerun the command):",
        "",
        f"    {command}",
        "",
        f"{dt.datetime.now():%Y-%m-%d %H:%M}, {minutes:.1f} min. Device: **cpu** ({env['cpu']}; {env['cpu_count']} CPU cores, "
        f"torch threads {env['torch_threads']}). torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}.",
        "",
        f"Model `{args.model}` (fp32, SDPA); {args.n_prompts} prompts from `{args.prompts}` (chat template, "
        f"~{args.prompt_tokens:.0f} tokens each); {args.max_new_tokens} new tokens at most; temperature {args.temperature}, "
        f"top-p {args.top_p}, seed {args.seed}; all prompts x N in one generate call on both sides.",
        "",
        "| N | sequences | `generate` tok/s | dpokit tok/s | **speed-up** | `generate` s | dpokit s | token-equal responses | load avg before / after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        plain, shared = r["plain_tokens"] / r["plain_s"], r["shared_tokens"] / r["shared_s"]
        lines.append(
            f"| {r['n']} | {r['sequences']} | {plain:.0f} | {shared:.0f} | **{shared / plain:.2f}x** | {r['plain_s']:.1f} | "
            f"{r['shared_s']:.1f} | {r['equal']}/{r['sequences']} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    lines += [
        "",
        f"Greedy decoding (8 prompts, N = 2): {greedy[0]}/{greedy[1]} responses identical.",
        "",
        "What is measured: `generate(num_return_sequences=N)` repeats every prompt N times before the prefill, so "
        "each prompt's forward runs N times; dpokit's sampler (`dpokit.eval.sampling`) runs each distinct prompt "
        "once (all but its last token), copies its KV cache to the prompt's N rows, and lets `generate` resume "
        "from it (one token per row, then the decode). The decode itself is the same on both sides, so the gain "
        "grows with the prompt's share of the work: long prompts, short responses, large N.",
        "",
        "What is equal: the rows, their order and the random draws are the same on both sides, so greedy decoding "
        "is token-for-token identical and sampling picks the same tokens unless a last-bit difference in the "
        "prompt's keys and values (the prefill runs as a batch of distinct prompts instead of N copies) moves a "
        "token across a sampling boundary; the 'token-equal responses' column counts how often that did not happen. "
        "Either way each response is a sample from the same distribution.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", default="builtin:reviews/eval_prompts.jsonl")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--samples", type=int, nargs="+", default=[4, 8])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the tiny random llama, 8 prompts, N = 2 and 4")
    p.add_argument(
        "--out", default=None, help="default docs/benchmarks-sampler.md (--quick: runs/bench/sampler-quick.md)"
    )
    args = p.parse_args(argv)
    import torch

    from dpokit.data.files import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        from dpokit.models.tiny import build_tiny_llama

        args.model = str(build_tiny_llama(REPO / "runs" / "bench" / "tiny-sampler"))
        args.n_prompts, args.samples = 8, [2, 4]
    out = Path(args.out or ("runs/bench/sampler-quick.md" if args.quick else "docs/benchmarks-sampler.md"))
    start = time.perf_counter()
    model, tok = load(args.model)
    prompts = sorted_prompts(tok, read_prompts(args.prompts)[: args.n_prompts])
    from dpokit.eval.sampling import render_prompt

    rendered = [render_prompt(tok, q) for q in prompts]
    args.prompt_tokens = sum(len(tok(t, add_special_tokens=a)["input_ids"]) for t, a in rendered) / len(prompts)
    dpokit_sampler(
        model, tok, prompts[:2], 2, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}), args.temperature
    )  # warm-up
    rows = measure(model, tok, prompts, args)
    greedy = greedy_check(model, tok, prompts, args)
    text = render(args, rows, greedy, common.environment("cpu"), (time.perf_counter() - start) / 60)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
