"""Sampling responses from a causal LM: chat-templated, batched, left-padded, reproducible.

`generate_samples` is the one sampler: `dpokit pairs` (AI-feedback pair building) keeps the texts,
`dpokit evaluate --prompts` and `dpokit demo` also score the exact token ids (`dpokit.eval.scoring`).
Sampling is pure temperature + nucleus (top-p): the model's own ``generation_config`` sampling
defaults (top_k=50, repetition penalties...) are deliberately not inherited, so the same call gives
the same distribution whatever folder the model came from. Only its EOS ids are taken from it.

Shared prompt cache: the n samples of a prompt sit next to each other in a generate batch, and the
prompt is prefilled once for them (`_shared_prompt_cache`): all but its last token run through the
model once per distinct prompt, the KV cache is copied to each of that prompt's rows, and
``generate`` resumes from it (it runs only the last prompt token, then decodes). The batches, the
rows in them and the random draws are exactly those of the plain path (``share_prompt_cache=False``,
every row prefilled on its own, what ``generate(num_return_sequences=n)`` does); only the floats of
the prompt's keys and values may differ in the last bits (another batch shape for the same matmuls),
so greedy decoding is token-for-token identical and sampling draws the same tokens except where such
a difference moves a token across a sampling boundary (measured: docs/benchmarks-sampler.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpokit.errors import DpokitError

if TYPE_CHECKING:
    import torch


def render_prompt(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """The text fed to the model for ``prompt``, and whether the tokenizer should add special tokens.

    With a chat template the prompt becomes one user turn followed by the assistant header
    (``add_generation_prompt=True``); the template already writes BOS, so no special tokens are added.
    Without one the prompt is used as plain text and the tokenizer adds its usual specials.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, False
    return prompt, True


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for i in [value] if isinstance(value, int) else list(value):
            if i not in ids:
                ids.append(int(i))
    return ids


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float,
                       top_k: int) -> Any:  # fmt: skip
    """Checked sampling settings as a transformers GenerationConfig (temperature 0 = greedy)."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise DpokitError("max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise DpokitError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if tokenizer.pad_token_id is None:
        raise DpokitError("tokenizer has no pad token; load it with dpokit.models.sources.load_tokenizer")
    do_sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_eos_ids(model, tokenizer) or None,
    )


@dataclass
class Sample:
    """One sampled response: the exact token ids the model drew (for scoring) and its text.

    The ids matter beyond the text: re-tokenizing decoded text can split words differently and
    loses where EOS came, so log-probs of a sample are taken over ``prompt_ids + response_ids``.
    """

    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens up to and including the first EOS (if it came)
    text: str  # response_ids decoded without special tokens, surrounding whitespace stripped
    finished: bool  # ended with EOS rather than at max_new_tokens

    @property
    def n_tokens(self) -> int:
        """Response length in tokens, EOS not counted."""
        return len(self.response_ids) - int(self.finished)


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    top_k: int = 0,
    progress: bool = False,
    share_prompt_cache: bool = True,
) -> list[list[Sample]]:
    """Sample ``n`` responses for every prompt; returns ``samples[i][j]`` for prompt i, sample j.

    Sequences (prompt x sample) are generated ``batch_size`` at a time, left-padded, under
    ``torch.inference_mode`` with the KV cache. ``temperature == 0`` means greedy.

    Deterministic for a given seed, batch_size and prompt list (on the same device and dtype); the
    global torch RNG is left as it was. ``share_prompt_cache`` (on by default; it only matters when
    n > 1) prefills each prompt once per batch and copies its KV cache to the prompt's n rows (see
    the module docstring for what stays equal to the plain path).
    """
    import torch

    if n < 1:
        raise DpokitError(f"number of samples per prompt must be >= 1, got {n}")
    if batch_size < 1:
        raise DpokitError("batch_size must be >= 1")
    gen_config = _generation_config(model, tokenizer, max_new_tokens, temperature, top_p, top_k)
    eos = set(_eos_ids(model, tokenizer))
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=add)["input_ids"] for text, add in rendered]
    # One job per (prompt, sample). Sorting by prompt length keeps padding (wasted compute) small;
    # the stable sort keeps the order, and so the result, deterministic.
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda ij: len(encoded[ij[0]]))
    batches = [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]

    device = next(model.parameters()).device
    out: list[list[Sample | None]] = [[None] * n for _ in prompts]
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="sampling", unit="seq")
    try:
        # fork_rng: the seed applies to this call only, the caller's RNG stream is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            for batch in batches:
                rows = [encoded[i] for i, _ in batch]
                keys = [i for i, _ in batch] if share_prompt_cache else None  # rows of one prompt share its cache
                for (i, j), sample in zip(batch, _generate_batch(model, tokenizer, rows, gen_config, eos, keys)):
                    out[i][j] = sample
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [[s for s in group if s is not None] for group in out]


def _generate_batch(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    gen_config: Any,
    eos: set[int],
    prompt_keys: list[int] | None = None,
) -> list[Sample]:
    """One ``generate`` call over left-padded prompt rows; a `Sample` per row. Rows with the same
    ``prompt_keys`` entry hold the same prompt and share one prefill (`_shared_prompt_cache`)."""
    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    extra: dict[str, Any] = {}
    if prompt_keys is not None:
        shared = _shared_prompt_cache(model, input_ids, attention_mask, prompt_keys)
        if shared is not None:
            extra[_cache_argument(model)] = shared
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config, **extra
    )
    samples = []
    for prompt_ids, new_row in zip(rows, generated[:, input_ids.shape[1] :].tolist()):
        # pad == eos for many models: the response ends at the first EOS, whatever follows is padding
        end = next((k for k, t in enumerate(new_row) if t in eos), None)
        ids = new_row if end is None else new_row[: end + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        samples.append(Sample(list(prompt_ids), ids, text, end is not None))
    return samples


def _forward_parameters(model: Any) -> set[str]:
    """Keyword names the underlying transformers model's forward takes (through a PEFT wrapper)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_argument(model: Any) -> str:
    """What the KV cache is called in forward/generate: ``cache`` in transformers 5.x, before that
    ``past_key_values`` (5.x still accepts it, with a deprecation warning)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _shared_prompt_cache(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_keys: list[int]
) -> Any | None:
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt.

    Rows sharing a key hold identical left-padded prompts. Their distinct prompts (minus the last
    token) run through the model once, with the position ids ``generate`` derives from the mask;
    the cache rows are then copied to every row of their prompt. ``generate`` given this cache and
    the full rows feeds only the last prompt token, whose logits start the decoding (a prompt is
    never cached whole: some token has to produce the first logits). None when no two rows share a
    prompt (nothing to save) or the prompts are one token long.
    """
    import torch
    from transformers import DynamicCache

    first: dict[int, int] = {}  # key -> its first row
    for row, key in enumerate(prompt_keys):
        first.setdefault(key, row)
    if len(first) == len(prompt_keys) or input_ids.shape[1] < 2:
        return None
    slot = {key: k for k, key in enumerate(first)}
    device = input_ids.device
    unique = torch.tensor(list(first.values()), dtype=torch.long, device=device)
    ids, mask = input_ids[unique, :-1], attention_mask[unique, :-1]
    # generate's own position ids (transformers' _prepare_position_ids_for_generation): padding
    # positions are masked and never scored, so their value is irrelevant
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    params = _forward_parameters(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the prompt's logits are not needed
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
          **{_cache_argument(model): cache}, **extra)  # fmt: skip
    cache.batch_select_indices(torch.tensor([slot[key] for key in prompt_keys], dtype=torch.long, device=device))
    return cache


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows: decoder-only generation appends on the right, so real tokens must end there."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        if row:
            ids[k, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[k, width - len(row) :] = 1
    return ids, mask
