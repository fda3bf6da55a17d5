"""`dpokit export`: a trained llama-family output folder -> one GGUF file (f16 or q8_0).

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a llama model, built
with the `gguf` package: the architecture metadata, the tensors under llama.cpp's names, the
tokenizer as metadata (a byte-level BPE, llama.cpp's "gpt2" model: tokens, token types, merges,
special ids, chat template). Two details that a plain renaming gets wrong:

* llama.cpp's rotary embedding pairs neighbouring dimensions of a head where transformers' Llama
  pairs the two halves, so the rows of q_proj and k_proj are permuted per head (`_llama_cpp_permute`);
  transformers' GGUF loader applies the inverse when it reads the file back.
* a model whose lm_head is its embedding matrix (tied, like SmolLM2) has no ``output.weight``:
  that absence is how llama.cpp and transformers know the two are tied.

A LoRA adapter folder is merged into its base (``adapter_config.json``'s ``base_model_name_or_path``,
which dpokit records as a loadable folder or Hub id) before it is written. Other architectures and
tokenizers are refused with a `ModelError` rather than written wrongly.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from dpokit.errors import ModelError
from dpokit.models import sources

ExportType = Literal["f16", "q8_0"]
EXPORT_TYPES: tuple[str, ...] = ("f16", "q8_0")

# The pre-tokenizers dpokit can name for llama.cpp, as tokenizer.json spells them (JSON), and the
# llama.cpp name ("tokenizer.ggml.pre") of each. llama.cpp picks its split regex by that name.
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_PRE_TOKENIZERS: list[tuple[str, list[dict[str, Any]]]] = [
    ("gpt2", [_BYTE_LEVEL]),  # GPT-2's regex (the tiny tokenizer; SmolLM2 as transformers reads its GGUF)
    ("smollm", [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]),  # SmolLM's tokenizer.json
]


# ---- loading what to export -------------------------------------------------------------------
def load_for_export(model_dir: str | Path) -> tuple[Any, Any]:
    """(float32 model, tokenizer) of a full-model folder, or of a LoRA adapter folder merged into its base."""
    import torch

    folder = Path(model_dir)
    adapter_cfg = folder / "adapter_config.json"
    if not adapter_cfg.is_file():
        source = sources.materialize_gguf(sources.resolve_source(folder))
        return sources.load_model(source, dtype=torch.float32), sources.load_tokenizer(source)

    import peft
    from transformers import AutoTokenizer

    base_name = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{adapter_cfg} names no base model (base_model_name_or_path)")
    try:
        base_source = sources.materialize_gguf(sources.resolve_source(base_name))
    except ModelError as exc:
        raise ModelError(f"LoRA adapter {folder}: its base model could not be found: {exc}") from None
    base = sources.load_model(base_source, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # dpokit saves it beside the adapter
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- the model ----------------------------------------------------------------------------------
def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ModelError(f"GGUF export supports plain rotary embeddings only; this model uses rope type '{rope_type}'")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError("the model config has no rope_theta")
    return float(theta)


def _check_llama(config: Any) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise ModelError(
            f"GGUF export supports llama-architecture models (LlamaForCausalLM); this one is "
            f"'{getattr(config, 'model_type', '?')}'"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError("GGUF export does not support llama models with attention or MLP biases")


def _write_architecture(writer: Any, config: Any, file_type: int) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _llama_cpp_permute(w: Any, n_head: int) -> Any:
    """Rows of a q/k projection in llama.cpp's rotary order (neighbouring pairs, not halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(writer: Any, model: Any, qtype: ExportType) -> None:
    import gguf
    import numpy as np
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 values per Q8_0 block
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # no output.weight marks the tie for llama.cpp and transformers
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, config.num_key_value_heads or config.num_attention_heads)
        name = f"{gguf_base}.{suffix}"
        if data.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(name, np.ascontiguousarray(data))
        elif qtype == "q8_0" and data.shape[-1] % block == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:  # f16, and q8_0 rows that are not whole 32-value blocks (llama.cpp's fallback)
            writer.add_tensor(name, np.ascontiguousarray(data.astype(np.float16)))


# ---- the tokenizer ------------------------------------------------------------------------------
def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for name, pattern in _PRE_TOKENIZERS:
        if len(steps) == len(pattern) and all(all(s.get(k) == v for k, v in p.items()) for s, p in zip(steps, pattern)):
            return name
    raise ModelError(
        f"GGUF export supports byte-level BPE tokenizers with a GPT-2 or SmolLM pre-tokenizer; this one has {pre}"
    )


def _vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (1 normal, 3 control, 4 user-defined, 5 unused)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model only {n_vocab} embedding rows")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        tokens.append(by_id[i])
        types.append((3 if added[i].special else 4) if i in added else 1)
    return tokens, types


def _write_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers; this one is {spec.get('model', {}).get('type')}")
    pre = _pre_tokenizer_name(spec)
    tokens, types = _vocab(tokenizer, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):  # fmt: skip
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a")["input_ids"]  # does encoding add BOS / EOS? llama.cpp must do the same
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# ---- writing -------------------------------------------------------------------------------------
def write_gguf(model: Any, tokenizer: Any, out_file: str | Path, qtype: ExportType = "f16", name: str = "") -> Path:
    """Write ``model`` (a dense LlamaForCausalLM) and ``tokenizer`` as one GGUF file, atomically."""
    import gguf

    if qtype not in EXPORT_TYPES:
        raise ModelError(f"unknown GGUF type '{qtype}'; choose {' or '.join(EXPORT_TYPES)}")
    config = model.config
    _check_llama(config)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or out.stem)
        _write_architecture(writer, config, file_type)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        _write_tensors(writer, model, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():  # a failure part-way leaves no half-written file behind
            with contextlib.suppress(Exception):
                writer.close()
            tmp.unlink()
    return out


def export_gguf(
    model_dir: str | Path, out_file: str | Path, qtype: ExportType = "f16", log: Callable[[str], None] | None = None
) -> Path:
    """`dpokit export MODEL_DIR --gguf OUT --type f16|q8_0`: load the folder (merging a LoRA adapter
    into its base) and write it as a GGUF file; returns the file."""
    log = log or print
    model, tokenizer = load_for_export(model_dir)
    out = write_gguf(model, tokenizer, out_file, qtype, name=Path(model_dir).resolve().name)
    log(f"wrote {out} ({qtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return out
