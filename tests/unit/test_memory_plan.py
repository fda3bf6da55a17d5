"""The memory plan (dpokit.models.memory, dpokit.training.memory): its per-layer activation formula
against autograd's saved tensors, its parameter counts against real models, hand-computed line items,
the checkpointing choice against a budget, and the strategies' division of the state."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpokit.config import Config
from dpokit.errors import DpokitError
from dpokit.models.loading import apply_checkpointing
from dpokit.models.memory import ModelShape
from dpokit.training import memory
from dpokit.training.memory import BatchShape, RunFacts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(layers: int, h: int = 64, i: int = 160, heads: int = 4, kv: int = 2, tied: bool = False) -> LlamaForCausalLM:
    conf = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=tied)  # fmt: skip
    conf._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(conf)
    model.config.use_cache = False
    return model


def _saved_bytes(model: torch.nn.Module, tokens: int, autocast: bool = False) -> int:
    """Bytes autograd keeps for the backward of the decoder's forward (parameters excluded; each
    storage once, however many views of it are saved)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.randint(0, 256, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # fmt: skip
        base.model(input_ids=ids)
    return sum(seen.values())


def _per_layer_token(precision: str, r: int, every: int, **shape: int) -> float:
    """Measured bytes per token of one more decoder layer: (3 layers - 1 layer) / 2, per token as the
    difference of 128 and 64 tokens (what is saved once per layer, not per token, cancels out: autocast's
    bf16 copies of the weights)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = []
    for layers in (1, 3):
        model = _llama(layers, **shape).to(dtype)
        if r:
            model = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=TARGETS))
        apply_checkpointing(model, every)
        model.train()
        autocast = precision == "fp32+autocast"
        out.append(_saved_bytes(model, 128, autocast) - _saved_bytes(model, 64, autocast))
    return (out[1] - out[0]) / 2 / 64


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp32+autocast"])
@pytest.mark.parametrize("r", [0, 8])
@pytest.mark.parametrize("shape", [dict(h=64, i=160, heads=4, kv=2), dict(h=96, i=224, heads=6, kv=3)])
def test_layer_activation_formula_equals_autograds_saved_tensors(precision: str, r: int, shape: dict[str, int]) -> None:
    """The fitted coefficients reproduce what autograd saves per token, byte for byte, also on a shape
    they were not fitted on (h 96, 6 heads)."""
    s = ModelShape(1, shape["h"], shape["i"], shape["heads"], shape["kv"], shape["h"] // shape["heads"], 256, False)
    expected = s.layer_activation_bytes(precision, r, len(TARGETS) if r else 0)
    assert _per_layer_token(precision, r, 0, **shape) == expected


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_checkpointed_layer_keeps_only_its_input() -> None:
    s = ModelShape(1, 64, 160, 4, 2, 16, 256, False)
    assert _per_layer_token("fp32", 0, 1) == s.checkpointed_layer_bytes("fp32") == 4 * 64
    assert _per_layer_token("bf16", 8, 1) == s.checkpointed_layer_bytes("bf16") == 2 * 64


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_equal_the_models(tied: bool) -> None:
    model = _llama(3, tied=tied)
    shape = ModelShape.from_config(model.config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS[:4]))
    assert shape.lora_params(8, TARGETS[:4]) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_params(8, ["all-linear"]) == shape.lora_params(8, TARGETS)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_every_kth_layer_checkpointing_gives_the_same_gradients() -> None:
    """The optimised path (recomputation) equals the naive one (every activation kept)."""
    grads = []
    for every in (0, 2, 1):
        model = _llama(4).train()
        apply_checkpointing(model, every)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-6)


SMOL = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                  tied_embeddings=True)  # fmt: skip


def test_smollm2_items_by_hand() -> None:
    """SmolLM2-135M, full fine-tuning in fp32 with AdamW and a reference copy, one micro-batch of
    2 rows x 600 tokens (prefix sharing: a 4D mask), no checkpointing, on a GPU (no CPU runtime):

    params = 49152*576 (tied) + 30*(576*576*2 + 576*192*2 + 3*576*1536 + 2*576) + 576 = 134,515,008
    weights = reference = 4 * params = 538,060,032; AdamW = 8 * params = 1,076,120,064
    gradients at the peak (the start of the backward): those outside the layers, the tied embedding
      and the final norm, (49152*576 + 576) * 4 = 113,248,512 (with accumulation: all 538,060,032)
    activations: per token per layer 32*576 + 8*192 + 16*1536 + 4*9 + 8 = 44,588 bytes
      layers: 1200 tokens * 30 * 44,588 = 1,605,168,000
      outside: 1200 * (2*576*4 + 24) + mask 2*600*600 = 5,558,400 + 720,000
      mask per layer: 720,000 * max(4, 9) * 30 = 194,400,000          -> 1,805,846,400
    working set: 1200 * 44,588 + head: 1000 scored * 576 * 4 + 3 * 256 * 49152 * 4
      = 53,505,600 + 2,304,000 + 150,994,944 = 206,804,544
    """
    facts = RunFacts(SMOL, "fp32", "dpo", "copy", "adamw", device="cuda")
    p = memory.plan(facts, BatchShape(rows=2, length=600, scored=1000, mask_bytes=2 * 600 * 600))
    assert SMOL.params() == 134_515_008
    assert [p.item(n) for n in ("weights", "reference", "gradients", "optimizer state")] == [
        538_060_032, 538_060_032, 113_248_512, 1_076_120_064]
    assert p.item("activations") == 1_805_846_400
    assert p.item("backward working set") == 206_804_544
    assert p.total == 538_060_032 * 2 + 113_248_512 + 1_076_120_064 + 1_805_846_400 + 206_804_544
    assert "runtime" not in [i.name for i in p.items]
    accumulating = memory.plan(RunFacts(SMOL, "fp32", "dpo", "copy", "adamw", device="cuda", grad_accum=2),
                               BatchShape(rows=2, length=600, scored=1000, mask_bytes=2 * 600 * 600))  # fmt: skip
    assert accumulating.item("gradients") == 538_060_032


def test_lora_and_cpu_items_by_hand() -> None:
    """LoRA r 16 on all 7 linears of SmolLM2: r*(in+out) per linear per layer,
    30 * 16 * (1152 + 768 + 768 + 1152 + 2112*3) = 4,884,480 adapter params, trained in fp32:
    AdamW 8 * 4,884,480, gradients none at the peak (smaller than the activations freed before they
    are computed); the adapter reference costs nothing. On CPU the
    runtime and the allocator's share ((factor - 1) * the step's memory) are items too."""
    facts = RunFacts(SMOL, "fp32", "dpo", "adapter", "adamw", lora_r=16, lora_targets=7,
                     lora_params=SMOL.lora_params(16, TARGETS), device="cpu")  # fmt: skip
    p = memory.plan(facts, BatchShape(2, 600, 1000, 0))
    assert SMOL.lora_params(16, TARGETS) == 4_884_480
    assert p.item("gradients") == 0 and p.item("optimizer state") == 8 * 4_884_480
    assert p.item("reference") == 0
    assert p.item("weights") == 4 * SMOL.params() + 4 * 4_884_480
    dynamic = p.item("activations") + p.item("backward working set")
    assert p.item("allocator") == int(dynamic * (memory.CPU_ALLOCATOR_FACTORS["mimalloc"] - 1))
    glibc = memory.plan(RunFacts(**{**facts.__dict__, "allocator": "glibc"}), BatchShape(2, 600, 1000, 0))
    assert glibc.item("allocator") == int(dynamic * (memory.CPU_ALLOCATOR_FACTORS["glibc"] - 1))
    assert p.item("runtime") == memory.CPU_RUNTIME_BYTES


def test_checkpointing_auto_takes_the_cheapest_recomputation_that_fits() -> None:
    facts = RunFacts(SMOL, "fp32", "dpo", "copy", "adamw", device="cuda")
    batch = BatchShape(8, 1024, 4000)
    totals = {every: memory.plan(facts, batch, every).total for every in memory.CHECKPOINT_CHOICES}
    assert totals[0] > totals[4] > totals[3] > totals[2] > totals[1]  # more recomputation, less memory

    def make(budget: int):
        return lambda every: memory.plan(facts, batch, every, budget)

    assert memory.choose_checkpointing(make(totals[0]), "auto").checkpoint_every == 0
    assert memory.choose_checkpointing(make(totals[0] - 1), "auto").checkpoint_every == 4
    assert memory.choose_checkpointing(make(totals[2]), "auto").checkpoint_every == 2
    assert memory.choose_checkpointing(make(totals[1]), "auto").checkpoint_every == 1
    assert not memory.choose_checkpointing(make(totals[1] - 1), "auto").fits
    # explicit settings are kept whatever the budget
    assert memory.choose_checkpointing(make(1), False).checkpoint_every == 0
    assert memory.choose_checkpointing(make(1), 3).checkpoint_every == 3
    assert memory.choose_checkpointing(make(1), True).checkpoint_every == 1
    summary = memory.choose_checkpointing(make(totals[2]), "auto").summary()
    assert summary.startswith(f"memory: plan {totals[2] / memory.GIB:.2f} GiB of ") and "every 2nd layer" in summary


def test_refusal_gives_the_numbers_and_what_to_change() -> None:
    facts = RunFacts(SMOL, "fp32", "dpo", "copy", "adamw", device="cuda")
    p = memory.plan(facts, BatchShape(8, 1024, 4000), 1, budget=memory.GIB)
    cfg = Config().override(["train.micro_batch_size=8", "train.memory_budget=1"])
    message = str(memory.refusal(p, cfg, "pairs"))
    assert f"the plan needs {memory.gib(p.total)} per process, the budget is 1.00 GiB" in message
    assert "train.micro_batch_size=4 train.grad_accum_steps=2 (the same pairs per step)" in message
    assert "lora.enabled=true" in message and "reference.precompute=true" in message
    assert "train.optimizer=adamw8bit" in message and "activations" in message


def test_strategies_divide_the_state_not_the_activations() -> None:
    facts = RunFacts(SMOL, "bf16", "dpo", "copy", "adamw", device="cuda")
    single = memory.plan(facts, BatchShape(4, 512, 1000))
    single = memory.plan(RunFacts(SMOL, "bf16", "dpo", "copy", "adamw", device="cuda", grad_accum=2),
                         BatchShape(4, 512, 1000))  # fmt: skip
    w, g, o, r = (single.item(n) for n in ("weights", "gradients", "optimizer state", "reference"))
    ddp = memory.for_strategy(single, facts, "ddp", 8)
    assert ddp.item("DDP buckets") == memory.gradient_bytes(facts)[0] and ddp.item("weights") == w
    z2 = memory.for_strategy(single, facts, "zero2", 8)
    assert (z2.item("weights"), z2.item("gradients"), z2.item("optimizer state")) == (w, g // 8, o // 8)
    z3 = memory.for_strategy(single, facts, "zero3", 8)
    assert (z3.item("weights"), z3.item("reference")) == (w // 8, r)  # dpokit's ZeRO-3 reference is whole
    fsdp = memory.for_strategy(single, facts, "fsdp", 8)
    assert fsdp.item("reference") == r // 8 and fsdp.item("gathered layers") > 0
    for p in (ddp, z2, z3, fsdp):
        assert p.item("activations") == single.item("activations")
    assert fsdp.total < z2.total < ddp.total


def test_budget_resolution() -> None:
    assert memory.resolve_budget(1.5, torch.device("cpu")) == int(1.5 * memory.GIB)
    auto = memory.resolve_budget("auto", torch.device("cpu"))
    assert 0 < auto < 2**50
    assert memory.resolve_budget("auto", torch.device("cpu"), local_world=2) < auto


def test_checkpointing_and_budget_config_values() -> None:
    for value in ("auto", True, False, 2):
        Config().override([f"train.gradient_checkpointing={str(value).lower()}"]).validate()
    with pytest.raises(Exception, match="every k-th layer"):
        Config().override(["train.gradient_checkpointing=0"]).validate()
    with pytest.raises(Exception, match="memory_budget"):
        Config().override(["train.memory_budget=-1"]).validate()
    with warnings.catch_warnings():
        Config().override(["train.memory_budget=12.5"]).validate()
    with pytest.raises(DpokitError):
        raise memory.refusal(memory.plan(RunFacts(SMOL, "fp32", "dpo", "none", "adamw"), BatchShape(1, 8, 8)),
                             Config(), "pairs")  # fmt: skip
