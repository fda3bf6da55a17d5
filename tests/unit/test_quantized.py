"""Quantised and lean states (torchao): 8-bit AdamW and an int8 / nf4 base under LoRA, on CPU.

The torchao tests skip when torchao is not installed (`pip install 'dpokit[quant]'`); the
missing-library messages are tested either way. The 8-bit optimizer compiles its update kernel
once per parameter shape (torch.compile; several seconds cold), so its tests train parameters of
a single shape.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.models import quantize
from dpokit.models.loading import load_policy
from dpokit.training import optim

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture
def ao() -> Any:
    return pytest.importorskip("torchao")


def _llama(hidden: int = 128, layers: int = 1) -> Any:
    """A random Llama whose attention projections are all hidden x hidden (one compiled optimizer kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def _attention_only(model: Any) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 2)[-2] in ATTENTION)
        if p.requires_grad:
            params.append(p)
    return params


def _cfg(*overrides: str) -> Config:
    return Config.from_preset("tiny").override(list(overrides))


def _batch() -> torch.Tensor:
    return torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _state_bytes(optimizer: torch.optim.Optimizer, skip: tuple[str, ...] = ()) -> int:
    """Bytes the optimizer state's tensors hold (a quantised state: its inner tensors), without the step counts."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step":
                continue
            inner = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
            parts = [getattr(value, n) for n in inner if n not in skip] if inner else [value]
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def _train(model: Any, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    ids, losses = _batch(), []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---- 8-bit AdamW --------------------------------------------------------------------------
def test_adamw8bit_learns_with_a_quarter_of_adamw_state(ao: Any) -> None:
    model = _llama()
    params = _attention_only(model)
    opt8 = optim.build_optimizer(_cfg("train.optimizer=adamw8bit", "train.lr=1e-2"), model)
    assert isinstance(opt8, ao.optim.AdamW8bit)
    losses = _train(model, opt8, 4)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(isinstance(g["lr"], float) for g in opt8.param_groups)  # metrics and resume read floats

    ref = torch.optim.AdamW(params, lr=1e-2)
    _train(model, ref, 1)
    n = sum(p.numel() for p in params)
    assert _state_bytes(ref) == n * optim.optimizer_state_bytes_per_param("adamw", 4)
    # codes + block scales are exactly the documented 2 + 2*4/256 bytes per parameter ...
    assert _state_bytes(opt8, skip=("qmap",)) == n * optim.optimizer_state_bytes_per_param("adamw8bit", 4)
    # ... and with torchao's 256-entry lookup table per state tensor, still ~1/4 of AdamW's
    ratio = _state_bytes(opt8) / _state_bytes(ref)
    assert 0.25 < ratio < 0.28, ratio


def test_adamw8bit_state_dict_round_trip_resumes_bit_for_bit(ao: Any) -> None:
    cfg = _cfg("train.optimizer=adamw8bit", "train.lr=1e-2")
    straight = _llama()
    _attention_only(straight)
    _train(straight, optim.build_optimizer(cfg, straight), 3)

    first = _llama()
    _attention_only(first)
    optimizer = optim.build_optimizer(cfg, first)
    _train(first, optimizer, 2)
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)  # as a checkpoint's optimizer.pt, read back the same way
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=True)
    assert any(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in saved["state"].values())

    resumed = _llama()
    resumed.load_state_dict(first.state_dict())
    _attention_only(resumed)
    fresh = optim.build_optimizer(cfg, resumed)
    fresh.load_state_dict(saved)
    _train(resumed, fresh, 1)
    want, got = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_state_byte_arithmetic() -> None:
    assert optim.optimizer_state_bytes_per_param("adamw", 2) == 4
    assert optim.optimizer_state_bytes_per_param("rmsprop", 4) == 4
    assert optim.optimizer_state_bytes_per_param("adamw8bit", 4) == 2 + 2 * 4 / 256
    assert quantize.bytes_per_param("nf4") == pytest.approx(0.5159, abs=1e-4)
    assert quantize.bytes_per_param("int8", in_features=1024) == 1 + 4 / 1024
    with pytest.raises(ValueError):
        quantize.bytes_per_param("int4")


# ---- int8 / nf4 base under LoRA -------------------------------------------------------------
def _token_logps(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


# measured on the tiny random Llama: largest per-token log-prob change 0.033 (nf4), 0.0028 (int8)
_LOGP_ATOL = {"nf4": 0.1, "int8": 0.01}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_lora_and_saves_the_adapter_only(ao: Any, kind: str, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    linears = {n: m for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    expected = sum(m.weight.numel() * quantize.bytes_per_param(kind, m.in_features) for m in linears.values())

    cfg = _cfg(f"model.name_or_path={tiny_model_dir}", "lora.enabled=true", "lora.r=8", f"lora.quantize={kind}")
    model, _ = load_policy(cfg, torch.float32)
    base = model.get_base_model()
    assert quantize.quantized_bytes(base) == pytest.approx(expected, rel=0.03)  # nf4: + a 16-entry table per layer
    assert type(base.lm_head.weight) is torch.nn.Parameter and type(base.model.embed_tokens.weight) is torch.nn.Parameter

    ids = _batch()
    assert torch.allclose(_token_logps(model, ids), _token_logps(plain, ids), atol=_LOGP_ATOL[kind])
    model(ids, labels=ids).loss.backward()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters.values())
    assert any(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)

    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter only, in full precision
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_quantize_base_keeps_odd_shapes_and_refuses_unknown_kinds(ao: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3), torch.nn.Linear(3, 5))
    assert quantize.quantize_base(model, "nf4") == 2  # 15 weights: not a multiple of nf4's block of 64
    assert [type(m.weight).__name__ for m in model] == ["NF4Tensor", "NF4Tensor", "Parameter"]
    with pytest.raises(DpokitError, match="no Linear layer"):
        quantize.quantize_base(torch.nn.Sequential(torch.nn.Linear(3, 3)), "nf4")
    with pytest.raises(DpokitError, match="lora.quantize='int4'"):
        quantize.quantize_base(model, "int4")


# ---- without torchao ------------------------------------------------------------------------
@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if torchao were not installed: `import torchao...` raises ImportError, find_spec finds nothing."""
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_torchao_names_the_extra(no_torchao: None, tiny_model_dir: Path) -> None:
    model = _llama(hidden=64)
    with pytest.raises(DpokitError) as exc:
        optim.build_optimizer(_cfg("train.optimizer=adamw8bit"), model)
    assert str(exc.value) == "train.optimizer=adamw8bit needs torchao: pip install 'dpokit[quant]'"
    cfg = _cfg(f"model.name_or_path={tiny_model_dir}", "lora.enabled=true", "lora.quantize=nf4")
    with pytest.raises(DpokitError) as exc:
        load_policy(cfg, torch.float32)
    assert str(exc.value) == "lora.quantize=nf4 needs torchao: pip install 'dpokit[quant]'"


def test_a_broken_torchao_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import importlib.util

    def broken(name: str) -> Any:
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(DpokitError, match=r"torchao is installed but `import torchao.optim` failed \(undefined symbol"):
        optim._import_torchao_optim()


def test_a_failed_kernel_compile_names_what_is_needed() -> None:
    from torch._inductor.exc import InvalidCxxCompiler

    def step(closure: Any) -> None:
        raise InvalidCxxCompiler()

    with pytest.raises(DpokitError, match=r"a C\+\+ compiler such as g\+\+"):
        optim._compile_errors_named(step, None)
