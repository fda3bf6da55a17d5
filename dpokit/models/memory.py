"""What a decoder model costs in memory, from its config alone: parameters and saved activations.

The training-run plan (`dpokit.training.memory`) adds these up with the optimizer, the reference
and the batch; this module knows only the model. Nothing here loads weights.

Saved activations (what autograd keeps from the forward for the backward) are linear in the
tokens of a micro-batch and, per decoder layer and token, linear in the layer's widths:

    bytes / (token * layer) = a*hidden + b*kv_dim + c*intermediate + d*heads + e*r*targets + f

with kv_dim = kv_heads * head_dim and r the LoRA rank. The coefficients below were measured on
Llama-style layers (RMSNorm, RoPE, SDPA with a boolean or additive mask, gated SiLU MLP: Llama,
Mistral, Qwen2, SmolLM) with `torch.autograd.graph.saved_tensors_hooks`, one fit per precision, and
every fit was exact (integer coefficients, zero residual over seven shapes);
`tests/unit/test_memory_plan.py` re-measures them on tiny models. Reading the fp32 row:
32*h = the residual stream, the two RMSNorm inputs and outputs and the attention output (8 tensors
of h floats); 8*kv_dim = k and v after RoPE; 16*i = gate, up, SiLU(gate) and their product (4
tensors of i floats); 4*heads = SDPA's log-sum-exp; 8 = the two RMSNorm reciprocal roots. LoRA
saves less for frozen norms (24*h) and 4*r bytes per adapted module for each adapter's A output.
In bf16 the norms still save fp32 copies (hence 20*h, not 16*h); LoRA on a bf16 base runs its
adapters in fp32 and saves fp32 casts of their inputs (36*h, 10*i).
A checkpointed layer saves only its input (one hidden vector per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (hidden, kv_dim, intermediate, heads, r * targets, constant) -> bytes per token per layer.
# Keys: (precision, lora) with precision one of "fp32", "bf16", "fp32+autocast".
_LAYER_COEFFS: dict[tuple[str, bool], tuple[int, int, int, int, int, int]] = {
    ("fp32", False): (32, 8, 16, 4, 0, 8),
    ("fp32", True): (24, 8, 16, 4, 4, 8),
    ("bf16", False): (20, 4, 8, 4, 0, 8),
    ("bf16", True): (36, 4, 10, 4, 4, 8),
    ("fp32+autocast", False): (30, 4, 8, 4, 0, 8),
    ("fp32+autocast", True): (24, 4, 8, 4, 2, 8),
}

# The modules LoRA adapts by default (config.LoraConfig.target_modules); "all-linear" means these too.
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, conf: Any) -> ModelShape:
        """From a transformers config (Llama-style names; multimodal configs: their text_config)."""
        conf = getattr(conf, "text_config", None) or conf
        heads = conf.num_attention_heads
        return cls(
            layers=conf.num_hidden_layers,
            hidden=conf.hidden_size,
            intermediate=conf.intermediate_size,
            heads=heads,
            kv_heads=getattr(conf, "num_key_value_heads", None) or heads,
            head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // heads,
            vocab=conf.vocab_size,
            tied_embeddings=bool(getattr(conf, "tie_word_embeddings", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def layer_params(self) -> int:
        """Parameters of one decoder layer: its linears and two norm weights."""
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden

    def params(self) -> int:
        """All parameters: embeddings, layers, final norm, and the LM head unless tied."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Adapter parameters: r * (in + out) per adapted linear per layer."""
        shapes = self.linear_shapes()
        names = _LINEARS if targets == ["all-linear"] else [t for t in targets if t in shapes]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    def lora_targets(self, targets: list[str]) -> int:
        """How many linears per layer LoRA adapts."""
        return len(_LINEARS) if targets == ["all-linear"] else sum(t in self.linear_shapes() for t in targets)

    def layer_activation_bytes(self, precision: str, lora_r: int = 0, lora_targets: int = 0) -> int:
        """Bytes one decoder layer saves for the backward, per token (not checkpointed).

        precision: "fp32", "bf16" (the weights' dtype, no autocast) or "fp32+autocast" (fp32
        weights, bf16 autocast). lora_r > 0: a LoRA run (frozen base) with `lora_targets` adapters.
        E.g. SmolLM2-135M (h 576, kv_dim 192, i 1536, 9 heads) in fp32, full fine-tuning:
        32*576 + 8*192 + 16*1536 + 4*9 + 8 = 44,588 bytes per token per layer.
        """
        a, b, c, d, e, f = _LAYER_COEFFS[(precision, lora_r > 0)]
        return (a * self.hidden + b * self.kv_dim + c * self.intermediate + d * self.heads
                + e * lora_r * lora_targets + f)  # fmt: skip

    def checkpointed_layer_bytes(self, precision: str) -> int:
        """Bytes a checkpointed layer keeps per token: its input hidden state (fp32 under autocast)."""
        return self.hidden * (2 if precision == "bf16" else 4)
