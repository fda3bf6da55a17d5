"""dpokit: Direct Preference Optimization for Hugging Face causal LMs.

The package import is light: heavy modules (transformers, accelerate, peft) load only when
`train` / `evaluate` are called.
"""

from __future__ import annotations

import logging
from typing import Any

# torchao (lora.quantize, train.optimizer=adamw8bit), which transformers imports whenever it is
# installed, logs in every process that its CUDA-only kernels do not load on a CPU build, and torch
# that torchao's Enum registration is deprecated: neither concerns dpokit. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["Config", "train", "evaluate", "LOSSES", "LossOutput", "__version__"]


def __getattr__(name: str) -> Any:  # lazy public API (PEP 562)
    if name == "Config":
        from dpokit.config import Config

        return Config
    if name in ("LOSSES", "LossOutput"):
        from dpokit.objectives import losses

        return getattr(losses, name)
    if name == "train":
        from dpokit.training.loop import train

        return train
    if name == "evaluate":
        from dpokit.eval.pairs import evaluate

        return evaluate
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
