"""Loading models for training and saving them: dtype, attention kernel, LoRA, the final folder.

Owns: the one dtype resolver, the attention-implementation choice, loading any source
`dpokit.models.sources` understands (HF folder, .gguf file, alias), wrapping the policy with LoRA,
and writing a Hugging Face folder at the end of a run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.models import quantize, sources, varlen

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The one dtype resolver: 'auto' -> bf16 on a GPU that supports it, fp32 elsewhere (fp16 is never
    chosen: it NaNs DPO, and CPUs run it ~100x slower); explicit names (float32/fp32, bfloat16/bf16,
    float16/fp16) as given. `device`: where the model will run (default: CUDA if there is one)."""
    if name in _DTYPES:
        return _DTYPES[name]
    if name != "auto":
        raise ConfigError(f"unknown dtype '{name}'; choose auto, float32, bfloat16 or float16")
    device = torch.device(device) if device is not None else None
    on_cuda = (device is not None and device.type == "cuda") or (device is None and torch.cuda.is_available())
    if on_cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attn_implementation(cfg: Config, dtype: torch.dtype) -> str:
    """`model.attn_implementation`, with auto resolved: dpokit's flash varlen kernel on a CUDA GPU
    computing in half precision (the flash kernels need it), SDPA everywhere else."""
    impl = cfg.model.attn_implementation
    if impl != "auto":
        return impl
    half = dtype in (torch.bfloat16, torch.float16) or cfg.train.mixed_precision == "bf16"
    return "varlen" if half and torch.cuda.is_available() and varlen.flash_available() else "sdpa"


def base_reference(source: sources.ModelSource) -> str:
    """How a trained output names its base (a LoRA adapter's ``base_model_name_or_path``): the Hub
    id for a Hub model, else the folder the weights were loaded from (for a GGUF source, its
    materialised folder: peft needs a path ``from_pretrained`` can load, and the .gguf is not one)."""
    return source.hub_id or str(source.path)


def load_model_and_tokenizer(name_or_path: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model and tokenizer of any source. A GGUF source is loaded from its materialised Hugging Face
    folder (dequantized once per file, `sources.materialize_gguf`), never dequantized per load."""
    # allow_pickle / trust_remote_code also decide what is fetched for a Hub id (pickle weights, code)
    source = sources.materialize_gguf(
        sources.resolve_source(name_or_path, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    )
    model = sources.load_model(
        source,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        attn_implementation=resolve_attn_implementation(cfg, dtype),
    )
    tokenizer = sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    # peft's get_peft_model records the model's name_or_path as the adapter's base
    model.name_or_path = base_reference(source)
    return model, tokenizer


def load_config_and_tokenizer(name_or_path: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """The model's transformers config (attention kernel resolved as `load_model_and_tokenizer`
    would) and its tokenizer, without loading weights: what the memory plan needs."""
    source = sources.materialize_gguf(
        sources.resolve_source(name_or_path, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    )
    conf = transformers.AutoConfig.from_pretrained(str(source.path), trust_remote_code=cfg.model.trust_remote_code)
    conf._attn_implementation = resolve_attn_implementation(cfg, dtype)
    return conf, sources.load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)


def prepare_for_training(model: Any, cfg: Config) -> None:
    """Before wrapping with LoRA: no KV cache (useless in training, costs memory). Checkpointing is
    applied later (`apply_checkpointing`), once the memory plan has chosen it."""
    model.config.use_cache = False


def fixed_checkpointing(setting: bool | int | str) -> int:
    """train.gradient_checkpointing as every-k-th-layer (0 = off; true = 1). auto is 0 here: the memory
    plan resolves it in training (`training.memory.choose_checkpointing`); dpokit rl has no plan."""
    if setting is True:
        return 1
    return setting if isinstance(setting, int) and not isinstance(setting, bool) else 0


def apply_checkpointing(model: Any, every: int) -> None:
    """Recompute the activations of every `every`-th decoder layer in the backward (0: none; 1: all).

    Works on the bare or the LoRA-wrapped model. Non-reentrant checkpointing; the inputs are made
    to require grad so that checkpointed segments see a gradient when the embeddings are frozen
    (LoRA)."""
    if every <= 0:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
    base.enable_input_require_grads()


def load_policy(cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """The trainable model (LoRA-wrapped when enabled) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg, dtype)
    prepare_for_training(model, cfg)
    if cfg.lora.quantize != "none":  # QLoRA: the frozen base stored in int8 / nf4, before peft wraps it
        quantize.quantize_base(model, cfg.lora.quantize)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model, tokenizer


def apply_lora(model: Any, cfg: Config) -> Any:
    import peft

    targets: Any = cfg.lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora_cfg = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return peft.get_peft_model(model, lora_cfg)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules}: {exc}") from None


# ---- saving -----------------------------------------------------------------------------
def save_final(model: Any, tokenizer: Any, cfg: Config, out_dir: Path) -> dict[str, str]:
    """Write the trained model: full weights, or the LoRA adapter (+ merged model if asked).

    Returns a dict naming what was written, for the run summary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if cfg.lora.enabled:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        written["adapter"] = str(out_dir)
        if cfg.lora.merge:
            merged = copy.deepcopy(model).merge_and_unload()
            sources.save_pretrained_clean(merged, tokenizer, out_dir / "merged")
            written["merged"] = str(out_dir / "merged")
    else:
        sources.save_pretrained_clean(model, tokenizer, out_dir)
        written["model"] = str(out_dir)
    return written
