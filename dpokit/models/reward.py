"""Reward models: a causal LM's backbone with a one-output score head, trained on preference pairs.

A reward model here is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (and the pad
token set in its config, which transformers needs for batches). For training (`load_reward_base`)
it is built from any base source dpokit loads (HF folder, .gguf file or alias via
`sources.materialize_gguf`, Hub id): the backbone's weights, the LM head dropped, a new score head
``score`` (hidden -> 1) initialised by transformers under the run's seed. LoRA trains adapters on
the backbone plus the whole score head (peft ``modules_to_save``). `load_reward_model` loads what
a run wrote (a full folder, or a LoRA adapter on its base) and refuses a causal LM.

The reward of prompt + response is the score head's output at the LAST REAL TOKEN of the sequence
(for plain text the appended EOS; for chat data the template's end-of-turn tokens). dpokit finds
that position from the batch layout (`last_token_index`), so it is the same in the padded,
packed and prefix-shared layouts. transformers' own ``model(...)`` pools at the rightmost token that
is not the pad token: the same position unless the pad token is also the EOS that ends a
plain-text response (then transformers scores the token before it).

One forward (`rewards_at`) runs the model as a whole (so DDP / PEFT wrappers see their forward)
and reads the score head's per-position output through a forward hook: (R, T, 1) scores of which
the 2B wanted positions are gathered. Scoring texts (`reward_scores`) renders them the way
`dpokit.data.pairs` renders pairs and runs the one inference pass.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpokit.config import Config
from dpokit.data.packing import CHOSEN, REJECTED
from dpokit.dist import Dist
from dpokit.errors import ConfigError, ModelError
from dpokit.models import loading, sources, varlen
from dpokit.models.forward import packed_model_inputs  # the one place that knows how packed rows reach a model
from dpokit.models.inference import inference_batches

__all__ = [
    "SCORE_HEAD",
    "disable_dropout",
    "last_token_index",
    "load_reward_base",
    "load_reward_model",
    "load_value_model",
    "pair_rewards",
    "position_scores",
    "reward_scores",
    "rewards_at",
    "save_reward_model",
    "score_head",
    "tokenize_for_scoring",
]

SCORE_HEAD = "score"  # transformers' name of the sequence-classification head of decoder-only models


# ---- loading ------------------------------------------------------------------------------
def _resolve(name_or_path: str, cfg: Config) -> sources.ModelSource:
    """Any base source as a Hugging Face folder (a GGUF file is dequantised once, then reused)."""
    m = cfg.model
    return sources.materialize_gguf(sources.resolve_source(name_or_path, m.allow_pickle, m.trust_remote_code))


@contextlib.contextmanager
def _new_head_expected() -> Iterator[None]:
    """transformers reports ``score.weight`` as newly initialised and ``lm_head`` as unused when a
    causal LM folder is loaded as a classifier; both are the point here, so the report is muted."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _load_seq_cls(source: sources.ModelSource, cfg: Config, dtype: torch.dtype, pad_token_id: int) -> Any:
    """``AutoModelForSequenceClassification`` (one output) from a Hugging Face folder: safetensors only
    unless model.allow_pickle, the run's attention kernel, the pad token in its config."""
    from transformers import AutoModelForSequenceClassification

    attn = loading.resolve_attn_implementation(cfg, dtype)
    if attn == "varlen":  # dpokit's kernel (dpokit/models/varlen.py); padded batches fall back to SDPA
        varlen.register()
        attn = varlen.IMPL_NAME
    kwargs: dict[str, Any] = {
        "local_files_only": True, "trust_remote_code": cfg.model.trust_remote_code, "num_labels": 1,
        "pad_token_id": pad_token_id, "dtype": dtype, "attn_implementation": attn,
    }  # fmt: skip
    if not cfg.model.allow_pickle:
        kwargs["use_safetensors"] = True  # never unpickle unless asked (as `sources.load_model`)
    try:
        with _new_head_expected():
            return AutoModelForSequenceClassification.from_pretrained(str(source.path), **kwargs)
    except (OSError, ValueError, KeyError, ImportError, NotImplementedError) as exc:
        raise ModelError(
            f"could not load {source} as a reward model (AutoModelForSequenceClassification with one output): {exc}"
        ) from exc


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, as TRL's RewardTrainer does by default (``disable_dropout``): the two
    responses of a pair must be scored by the same function, or the margin is partly noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention modules
            module.attention_dropout = 0.0


def _apply_lora(model: Any, cfg: Config) -> Any:
    """LoRA adapters on the backbone; the score head is new, so it is trained whole (modules_to_save)."""
    import peft

    targets: Any = "all-linear" if cfg.lora.target_modules == ["all-linear"] else cfg.lora.target_modules
    lora_cfg = peft.LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        task_type="SEQ_CLS", modules_to_save=[SCORE_HEAD], bias="none",
    )  # fmt: skip
    try:
        return peft.get_peft_model(model, lora_cfg)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules}: {exc}") from None


def load_reward_base(cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """(trainable reward model, tokenizer) for `dpokit reward`: model.name_or_path's backbone with a
    new score head (or the head it has, for a sequence-classification folder), LoRA-wrapped when
    lora.enabled, dropout off."""
    source = _resolve(cfg.model.name_or_path, cfg)
    tokenizer = sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    model = _load_seq_cls(source, cfg, dtype, tokenizer.pad_token_id)
    model.name_or_path = loading.base_reference(source)  # what a LoRA adapter records as its base
    loading.prepare_for_training(model, cfg)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg)
    disable_dropout(model)
    return model, tokenizer


def _require_score_head(source: sources.ModelSource) -> None:
    """Refuse a folder that is not a one-output sequence classifier (e.g. a causal LM): loading it as
    one would silently score with a random head."""
    conf = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    archs = conf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ModelError(
            f"'{source.name or source.path}' is not a reward model: its config.json names "
            f"{', '.join(map(str, archs)) or 'no architecture'}, which has no score head (scores would come from a "
            "random one). Pass a folder written by `dpokit reward` (the LoRA adapter folder, its merged/ folder, or "
            "a full model), or any AutoModelForSequenceClassification folder with one output"
        )
    n_labels = len(conf.get("id2label") or {0: ""})
    if n_labels != 1:
        raise ModelError(
            f"'{source.name or source.path}' is a classifier with {n_labels} outputs; a reward model has one"
        )


def _load_adapter(folder: Path, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """A reward LoRA adapter (peft task SEQ_CLS, score head saved whole) on its base."""
    import peft
    from transformers import AutoTokenizer

    meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if meta.get("task_type") != "SEQ_CLS":
        raise ModelError(
            f"'{folder}' is a LoRA adapter for task {meta.get('task_type')!r}, not a reward model (task SEQ_CLS): "
            "a DPO/SFT adapter of a causal LM has no score head. Pass a folder written by `dpokit reward`"
        )
    source = _resolve(str(meta["base_model_name_or_path"]), cfg)
    if (folder / "tokenizer_config.json").is_file():  # dpokit saves the tokenizer beside the adapter
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    base = _load_seq_cls(source, cfg, dtype, tokenizer.pad_token_id)  # its random head is replaced below
    return peft.PeftModel.from_pretrained(base, str(folder)), tokenizer


def load_reward_model(name_or_path: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """(reward model in eval mode, tokenizer) of a trained reward folder: a full model (or any
    one-output AutoModelForSequenceClassification folder or Hub id), a `dpokit reward` LoRA adapter
    folder (loaded on its base), or its ``merged/`` folder. A causal LM is refused (ModelError)."""
    folder = Path(name_or_path).expanduser()
    if (folder / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(folder, cfg, dtype)
    else:
        source = _resolve(name_or_path, cfg)
        _require_score_head(source)
        tokenizer = sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
        model = _load_seq_cls(source, cfg, dtype, tokenizer.pad_token_id)
    return model.eval(), tokenizer


def load_value_model(cfg: Config, dtype: torch.dtype, reward_path: str | None) -> tuple[Any, Any]:
    """PPO's trainable value model (one output per position, `position_scores`): a copy of the reward
    model at ``reward_path`` (the standard initialisation: it already reads the responses the way the
    reward does), or, with None, model.name_or_path's backbone with a new head (`load_reward_base`).
    A LoRA reward adapter is merged into its base first, so the value model trains its own adapters
    (lora.enabled) or all its weights, score head included; dropout off, no KV cache. Returns (model,
    tokenizer): the caller checks the value model reads the policy's token ids."""
    if reward_path is None:
        return load_reward_base(cfg, dtype)
    model, tokenizer = load_reward_model(reward_path, cfg, dtype)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.train()
    loading.prepare_for_training(model, cfg)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg)
    disable_dropout(model)
    return model, tokenizer


def save_reward_model(model: Any, tokenizer: Any, cfg: Config, out_dir: Path) -> dict[str, str]:
    """The final folder: full weights, or the LoRA adapter AND ``out/merged`` whatever lora.merge says
    (a reward model is used by other tools, which want a plain AutoModelForSequenceClassification folder)."""
    if cfg.lora.enabled and not cfg.lora.merge:
        cfg = cfg.override(["lora.merge=true"])
    return loading.save_final(model, tokenizer, cfg, out_dir)


# ---- the forward --------------------------------------------------------------------------
def _unwrapped(model: Any) -> Any:
    """The transformers model inside DDP / torch.compile / PEFT wrappers."""
    base = getattr(model, "module", model)  # DDP
    base = getattr(base, "_orig_mod", base)  # torch.compile
    return base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT


def score_head(model: Any) -> torch.nn.Module:
    """The score head module (under LoRA, peft's wrapper that runs the trained copy)."""
    head = getattr(_unwrapped(model), SCORE_HEAD, None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(
            f"{type(_unwrapped(model)).__name__} has no '{SCORE_HEAD}' head: not a decoder-only reward model"
        )
    return head


def position_scores(model: Any, inputs: dict[str, Any]) -> Tensor:
    """One forward of `model` over `inputs` (whose ``input_ids`` are (R, T)): the score head's output at
    every position, (R, T) in the model's dtype. A reward reads the last token; PPO's value model reads
    the position before each response token. transformers' own pooled logits are not used."""
    r, t = inputs["input_ids"].shape
    captured: list[Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[-1].reshape(r, t)  # (R, T): one output per position ((1, R*T, 1) when flattened for flash)


def rewards_at(model: Any, inputs: dict[str, Any], rows: Tensor, cols: Tensor) -> Tensor:
    """One forward of `model` over `inputs` and the score head's output at the positions (rows[k], cols[k]):
    (M,) fp32."""
    return position_scores(model, inputs)[rows, cols].float()


def last_token_index(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(rows, cols), each (2B,): where the last token of sequence s sits (s < B: prompt + chosen of
    pair s; s >= B: prompt + rejected of pair s - B), in any layout of `dpokit.data`.

    Padded rows are right-padded, so it is the last real column. Packed rows: the last position of
    segment s. Prefix-shared rows: the last position of pair i's chosen branch (s = i) or rejected
    branch (s = B + i); the shared prompt belongs to neither.
    """
    mask = batch["attention_mask"]  # (R, T)
    if "segment_ids" not in batch:  # padded [chosen; rejected] rows
        return torch.arange(mask.shape[0], device=mask.device), mask.sum(1) - 1
    b = batch["pair_index"].shape[0]
    seq = batch["segment_ids"]  # (R, T) sequence id (packing), -1 on row padding
    if "branch_ids" in batch:  # prefix sharing: the segment is the pair, the branch says which response
        branch = batch["branch_ids"]
        seq = torch.where(branch == CHOSEN, seq, torch.where(branch == REJECTED, seq + b, -1))  # (R, T)
    flat = seq.reshape(-1)  # (R*T,)
    keep = flat >= 0
    where = torch.arange(flat.numel(), device=flat.device)[keep]
    last = torch.full((2 * b,), -1, dtype=torch.long, device=flat.device)
    last = last.scatter_reduce(0, flat[keep], where, reduce="amax")  # (2B,) flattened index of each last token
    t = mask.shape[1]
    return last // t, last % t


def pair_rewards(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen rewards, rejected rewards), each (B,) fp32, of a collated batch of pairs (any layout):
    one forward, scored at each response's last token."""
    if "score_index" in batch:  # packed / prefix-shared: positions, 4D mask or varlen segments
        inputs = packed_model_inputs(model, batch)
    else:  # right-padded rows under the causal mask: no padding mask needed (as models.forward)
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    rows, cols = last_token_index(batch)
    rewards = rewards_at(model, inputs, rows, cols)  # (2B,)
    b = rewards.shape[0] // 2
    return rewards[:b], rewards[b:]


# ---- scoring texts ------------------------------------------------------------------------
def _as_messages(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The prompt turns to render with the chat template, or None for plain text. A text prompt is one
    user turn when the tokenizer has a template (as the sampler renders prompts), else plain text."""
    if isinstance(prompt, list):
        return prompt
    return [{"role": "user", "content": prompt}] if getattr(tokenizer, "chat_template", None) else None


def tokenize_for_scoring(
    tokenizer: Any, prompts: Sequence[str | list[dict[str, Any]]], responses: Sequence[str]
) -> list[list[int]]:
    """prompt + response ids per item, tokenized as `dpokit.data.pairs` tokenizes a pair's chosen side:
    chat: the prompt rendered with ``add_generation_prompt=True`` and the rest of the rendered full
    conversation, both without special tokens; plain text: the prompt with the tokenizer's special
    tokens, the response without them plus EOS. Nothing is truncated."""
    parts: list[tuple[str, str, bool]] = []  # (prompt text, response text, plain)
    for prompt, response in zip(prompts, responses, strict=True):
        messages = _as_messages(tokenizer, prompt)
        if messages is None:
            parts.append((str(prompt), response, True))
            continue
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise ModelError("the chat template is not prefix-consistent: a response cannot be split off its prompt")
        parts.append((head, full[len(head) :], False))
    out = []
    for prompt_text, response_text, plain in parts:
        prompt_ids = tokenizer(prompt_text, add_special_tokens=plain)["input_ids"]
        response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
        if plain and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
            response_ids.append(tokenizer.eos_token_id)
        out.append([*prompt_ids, *response_ids])
    return out


def _pad_rows(rows: list[list[int]], pad: int) -> dict[str, Tensor]:
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long),  # (N, T)
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long),
    }


def reward_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, Any]]],
    responses: Sequence[str],
    batch_size: int,
    dist: Dist,
) -> list[float]:
    """The reward of each (prompt, response), in order: rendered as `tokenize_for_scoring` says, scored
    at the last token through the one inference pass (`dpokit.models.inference`; sharded over
    processes, every process gets all values). A prompt is text or a list of chat messages. The
    model is moved to ``dist.device`` if it is elsewhere."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    rows = tokenize_for_scoring(tokenizer, prompts, responses)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if next(model.parameters()).device != dist.device:
        model.to(dist.device)
    values = torch.zeros(len(rows), dtype=torch.float32, device=dist.device)  # (N,) this process's share filled
    was_training = model.training
    model.eval()
    try:
        for idx, batch in inference_batches(
            rows, [len(r) for r in rows], lambda rs: _pad_rows(rs, pad), batch_size, dist
        ):
            cols = batch["attention_mask"].sum(1) - 1  # (n,) last real token of each right-padded row
            found = rewards_at(model, {"input_ids": batch["input_ids"], "use_cache": False},
                               torch.arange(len(idx), device=dist.device), cols)  # fmt: skip
            values[torch.tensor(idx, device=dist.device)] = found
        with torch.inference_mode():
            values = dist.reduce_sum(values)
    finally:
        model.train(was_training)
    return [float(v) for v in values.cpu()]
