"""Quantised frozen base weights for LoRA (QLoRA): lora.quantize = int8 | nf4, through torchao.

Under LoRA the base weights never change, so they can be stored in 8 or 4 bits and dequantised
on the fly in each forward; only the adapters (and their optimizer state) stay in full precision.
This cuts the largest static cost of a LoRA run, the base model, to ~1/4 (int8 of fp32) or ~1/8
(nf4 of fp32), and on CPU as well as CUDA: torchao's tensor subclasses are pure PyTorch.

How each kind reaches peft (checked against peft 0.21 and torchao 0.18):

- nf4: each ``nn.Linear.weight`` becomes a torchao ``NF4Tensor`` (QLoRA's 4-bit NormalFloat with
  double-quantised block scales). NF4Tensor is not one of the torchao subclasses peft dispatches
  on, so peft wraps the layer with its ordinary ``lora.Linear``; the base layer's ``F.linear`` is
  routed by NF4Tensor to an autograd function that dequantises the weight for the matmul in the
  forward and again for the input gradient in the backward (the weight itself gets none).
- int8: ``quantize_(linear, Int8WeightOnlyConfig())`` turns the weight into a torchao ``Int8Tensor``
  (per-output-row symmetric int8); peft recognises it and wraps the layer with its
  ``TorchaoLoraLinear``, which trains like ``lora.Linear``.

The output head (``get_output_embeddings``) and the embeddings stay in full precision, as in QLoRA:
the head feeds the log-probs DPO is made of, and embeddings are not ``nn.Linear`` anyway.

Not supported on a quantised base: merging the adapter into it (peft cannot write into these
weights: int8 raises, nf4 cannot be copied, below), so the adapter is saved on its own and merges
into the full-precision base it was trained from; and a deep copy of the model (reference.mode=copy
under LoRA): torchao 0.18 clones an NF4Tensor by re-quantising it with its default group of 256
block scales, which fails for layers whose size is not a multiple of 64 * 256 (e.g. SmolLM2's
576 x 576 attention). reference.mode=adapter (the LoRA default) needs no copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from typing import Any

import torch

from dpokit.errors import ConfigError, DpokitError

NF4_BLOCK = 64  # values per 4-bit block, each with its own absmax scale (QLoRA's choice)
NF4_SCALER_BLOCK = 256  # block scales per second-level block (double quantisation)
KINDS = ("int8", "nf4")


def import_torchao(module: str, needs: str) -> Any:
    """Import a torchao module on first use (torchao is the optional extra ``dpokit[quant]``).

    Missing torchao raises a DpokitError with `needs` (what to install); a torchao that is there but
    fails to import says so, with the reason. torchao logs a warning for each of its CUDA-only
    libraries a CPU build of torch cannot load, and torch one per enum torchao registers with
    pytree: noise for the user, so both loggers are quieted for the import.
    """
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if importlib.util.find_spec("torchao") is None:
            raise DpokitError(needs) from None
        raise DpokitError(f"torchao is installed but `import {module}` failed ({exc}); "
                          f"dpokit[quant] pins the tested version: {needs.split(': ', 1)[-1]}") from exc
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def quant_needs(kind: str) -> str:
    """The message for a run asking for lora.quantize without the library installed."""
    return f"lora.quantize={kind} needs torchao: pip install 'dpokit[quant]'"


def _import_torchao_quantization(kind: str) -> Any:
    """`torchao.quantization`, or a DpokitError naming the extra to install."""
    return import_torchao("torchao.quantization", quant_needs(kind))


def bytes_per_param(kind: str, in_features: int = 2048) -> float:
    """Storage bytes per base weight once quantised: what the memory plan counts per Linear weight.

    nf4:  4 bits = 0.5 byte per weight; each block of 64 weights has an absmax scale, itself
          quantised to int8 (1/64 byte per weight), and each group of 256 block scales has one
          fp32 factor (4 / (64 * 256) byte per weight): 0.5 + 0.015625 + 0.000244 = 0.51587.
          (A per-tensor fp32 mean of the scales and a 16-entry lookup table are ignored; a layer
          too small for 256 scales per group uses a smaller group, see `_nf4_scaler_block`.)
    int8: 1 byte per weight plus one scale per output row in the weight's dtype, counted as fp32:
          4 / in_features byte per weight (in_features: the layer's input width; the default, 2048,
          gives 1.00195, a typical small-LLM figure).
    """
    if kind == "nf4":
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALER_BLOCK)
    if kind == "int8":
        return 1.0 + 4 / in_features
    raise ValueError(f"unknown quantization '{kind}'; choose one of {', '.join(KINDS)}")


def quantize_base(model: torch.nn.Module, kind: str) -> int:
    """Store the frozen base ``nn.Linear`` weights of `model` in `kind` (int8 | nf4), in place.

    Call before wrapping with LoRA, so that peft wraps the quantised layers. The quantised weights
    do not train (requires_grad is False): this is for LoRA only. The output head is kept in full precision, and so is any
    Linear whose shape the format cannot hold (nf4: a weight whose size is not a multiple of 64).
    Returns how many layers were quantised; a model with none raises, since the user asked for it.
    """
    if kind not in KINDS:
        raise ConfigError(f"lora.quantize='{kind}': choose none, {' or '.join(KINDS)}")
    ao_quant = _import_torchao_quantization(kind)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    done = 0
    for linear in targets:
        if kind == "nf4":
            done += _to_nf4(linear, ao_quant)
        else:
            done += _to_int8(linear, ao_quant)
    if not done:
        raise DpokitError(f"lora.quantize={kind}: the model has no Linear layer (other than the output head) "
                          "that can be quantised; set lora.quantize=none")
    return done


def _nf4_scaler_block(numel: int) -> int:
    """Block scales per second-level group: 256 (QLoRA) when the count of 64-blocks allows, else the
    largest divisor of that count that is a power of two up to 256 (torchao needs an exact fit)."""
    return math.gcd(numel // NF4_BLOCK, NF4_SCALER_BLOCK)


def _to_nf4(linear: torch.nn.Linear, ao_quant: Any) -> int:
    weight = linear.weight.detach()
    if weight.numel() % NF4_BLOCK:
        return 0
    nf4 = ao_quant.to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=_nf4_scaler_block(weight.numel()))
    linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
    return 1


def _to_int8(linear: torch.nn.Linear, ao_quant: Any) -> int:
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings
    # (tuning flags meant for inference), which the rest of the run does not expect
    ao_quant.quantize_(linear, ao_quant.Int8WeightOnlyConfig(set_inductor_config=False))
    linear.weight.requires_grad_(False)
    return 1


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes the quantised weights of `model` actually occupy (their inner tensors), for reports and tests."""
    total = 0
    for param in model.parameters():
        inner = param.__tensor_flatten__()[0] if hasattr(param, "__tensor_flatten__") else None
        if inner:
            total += sum(getattr(param, name).numel() * getattr(param, name).element_size() for name in inner)
    return total
