"""A tiny randomly initialised Llama with the shipped tiny tokenizer, for tests and smoke runs.

Nothing is downloaded: the architecture comes from a `transformers` config class and the
tokenizer from `dpokit/assets/tiny_tokenizer`. The same seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

ASSET_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"


def build_tiny_llama(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random Llama + tokenizer as a Hugging Face folder (safetensors) and return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    # Its own random stream: building the model on first use must not move the caller's (a run seeds
    # before loading, and its LoRA init would otherwise depend on whether the model was cached).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
