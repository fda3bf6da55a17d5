"""Tests for dpokit.objectives.losses: hand-computed values, invariants, numerical safety, and parity with TRL.

Notation: ``sp(x) = ln(1 + e^x)`` (softplus), so ``-log sigma(x) = sp(-x)``.
"""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from dpokit.config import LOSS_TYPES
from dpokit.errors import ConfigError
from dpokit.objectives.losses import LOSSES, LossOutput, LossParams, compute_loss, log1mexp, register_loss

LN2 = math.log(2.0)


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(name: str, pc, pr, rc, rr, lc, lr, **params) -> LossOutput:  # noqa: ANN001
    return LOSSES[name].fn(pc, pr, rc, rr, lc, lr, LossParams(**params))


def assert_close(actual: torch.Tensor, expected: list[float] | float, atol: float = 1e-6) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype).expand_as(actual)
    torch.testing.assert_close(actual, expected_t, atol=atol, rtol=1e-6)


def random_inputs(b: int = 8, seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(1, 30, (b,), generator=g)
    lengths_r = torch.randint(1, 30, (b,), generator=g)
    # summed log-probs: about -1 nat per token, reference a little off the policy
    pc = -lengths_c * torch.rand(b, generator=g) * 2
    pr = -lengths_r * torch.rand(b, generator=g) * 2
    rc = pc + torch.randn(b, generator=g)
    rr = pr + torch.randn(b, generator=g)
    pc, pr = pc.requires_grad_(requires_grad), pr.requires_grad_(requires_grad)
    return dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        chosen_lengths=lengths_c,
        rejected_lengths=lengths_r,
    )


# ------------------------------------------------------------------------------------------------
# hand-computed values


def test_sigmoid_zero_margin_is_ln2() -> None:
    """Policy == reference, so h = 0 and loss = -log sigma(0) = ln 2; rewards beta * 0 = 0."""
    z = t(-3.0, -7.0)
    out = run("sigmoid", z, z - 1, z, z - 1, t(2, 3), t(2, 3))
    assert_close(out.losses, LN2)
    assert_close(out.chosen_rewards, 0.0)
    assert_close(out.rejected_rewards, 0.0)


def test_sigmoid_hand_value() -> None:
    """pi_c - ref_c = -1 - (-2) = 1, pi_r - ref_r = -2 - (-1) = -1, h = 2, beta = 0.5, beta*h = 1.

    loss = -log sigma(1) = sp(-1) = ln(1 + e^-1) ~ 0.31326; rewards 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5.
    """
    out = run("sigmoid", t(-1), t(-2), t(-2), t(-1), t(5), t(5), beta=0.5)
    assert_close(out.losses, sp(-1))
    assert_close(out.chosen_rewards, 0.5)
    assert_close(out.rejected_rewards, -0.5)


def test_sigmoid_label_smoothing_hand_value() -> None:
    """Same inputs (beta*h = 1), eps = 0.25: 0.75 * sp(-1) + 0.25 * sp(1) = 0.75*0.31326 + 0.25*1.31326 = 0.56326.

    And with h = 0 any eps gives (1 - eps) ln 2 + eps ln 2 = ln 2.
    """
    out = run("sigmoid", t(-1, -4), t(-2, -4), t(-2, -4), t(-1, -4), t(5, 5), t(5, 5), beta=0.5, label_smoothing=0.25)
    assert_close(out.losses, [0.75 * sp(-1) + 0.25 * sp(1), LN2])
    assert abs(0.75 * sp(-1) + 0.25 * sp(1) - 0.56326) < 1e-5


def test_ipo_length_normalized_hand_value() -> None:
    """beta = 0.5, target 1/(2*0.5) = 1. Chosen log-ratio -2 - (-6) = 4 over 4 tokens -> 1;
    rejected log-ratio -5 - (-3) = -2 over 2 tokens -> -1; h = 1 - (-1) = 2; loss = (2 - 1)^2 = 1.
    Rewards use the SUMMED ratios: 0.5 * 4 = 2 and 0.5 * -2 = -1.
    """
    out = run("ipo", t(-2), t(-5), t(-6), t(-3), t(4), t(2), beta=0.5)
    assert_close(out.losses, 1.0)
    assert_close(out.chosen_rewards, 2.0)
    assert_close(out.rejected_rewards, -1.0)


def test_ipo_summed_hand_value() -> None:
    """Same inputs without length normalisation: h = 4 - (-2) = 6, loss = (6 - 1)^2 = 25; rewards unchanged (2, -1)."""
    out = run("ipo", t(-2), t(-5), t(-6), t(-3), t(4), t(2), beta=0.5, ipo_length_normalize=False)
    assert_close(out.losses, 25.0)
    assert_close(out.chosen_rewards, 2.0)
    assert_close(out.rejected_rewards, -1.0)


def test_ipo_ignores_label_smoothing() -> None:
    """IPO has no smoothing term: eps = 0.3 leaves the loss (h = 0 -> (0 - 1/(2*0.1))^2 = 25) unchanged."""
    z = t(-1.0)
    out = run("ipo", z, z, z, z, t(1), t(1), beta=0.1, label_smoothing=0.3)
    assert_close(out.losses, 25.0, atol=1e-4)


def test_hinge_hand_values() -> None:
    """beta = 0.5. Pair 1: h = 1 -> relu(1 - 0.5) = 0.5. Pair 2: h = 4 -> relu(1 - 2) = 0.
    Pair 3: h = -2 -> relu(1 + 1) = 2. Rewards 0.5 * (pi - ref): pair 1 is (0.5, 0)."""
    out = run("hinge", t(0, 0, 0), t(0, 0, 0), t(-1, -4, 2), t(0, 0, 0), t(1, 1, 1), t(1, 1, 1), beta=0.5)
    assert_close(out.losses, [0.5, 0.0, 2.0])
    assert_close(out.chosen_rewards, [0.5, 2.0, -1.0])
    assert_close(out.rejected_rewards, [0.0, 0.0, 0.0])


def test_robust_hand_values() -> None:
    """eps = 0.25, 1 - 2 eps = 0.5.
    Pair 1, beta*h = 0: (0.75 ln2 - 0.25 ln2) / 0.5 = ln 2.
    Pair 2, beta*h = 1 (ratios 1 and -1, beta 0.5): (0.75 sp(-1) - 0.25 sp(1)) / 0.5
      = 1.5 * 0.31326 - 0.5 * 1.31326 = -0.18674 (rDPO can go negative).
    """
    out = run("robust", t(-1, -1), t(-2, -2), t(-1, -2), t(-2, -1), t(3, 3), t(3, 3), beta=0.5, label_smoothing=0.25)
    assert_close(out.losses, [LN2, 1.5 * sp(-1) - 0.5 * sp(1)])
    assert abs(1.5 * sp(-1) - 0.5 * sp(1) + 0.18674) < 1e-5
    assert_close(out.chosen_rewards, [0.0, 0.5])


def test_robust_rejects_eps_half() -> None:
    """rDPO divides by 1 - 2 eps, which is 0 at eps = 0.5."""
    z = t(0.0)
    with pytest.raises(ConfigError, match="robust"):
        run("robust", z, z, z, z, t(1), t(1), label_smoothing=0.5)


def test_simpo_hand_value() -> None:
    """beta = 1, gamma = 1. Chosen -2 over 4 tokens -> -0.5; rejected -3 over 2 -> -1.5; difference 1.
    logits = 1 * 1 - 1 = 0 -> loss ln 2. Rewards beta * average: -0.5 and -1.5. Refs are ignored (None)."""
    out = run("simpo", t(-2), t(-3), None, None, t(4), t(2), beta=1.0, simpo_gamma=1.0)
    assert_close(out.losses, LN2)
    assert_close(out.chosen_rewards, -0.5)
    assert_close(out.rejected_rewards, -1.5)


def test_simpo_margin_hand_value() -> None:
    """beta = 2, gamma = 0.5, same averages (difference 1): logits 2 - 0.5 = 1.5, loss sp(-1.5) ~ 0.20141."""
    out = run("simpo", t(-2), t(-3), None, None, t(4), t(2), beta=2.0, simpo_gamma=0.5)
    assert_close(out.losses, sp(-1.5))


def test_orpo_hand_value() -> None:
    """Chosen: 3 tokens summing to 3 ln(1/2), average a_c = ln(1/2), p = 1/2, odds 1, log-odds 0.
    Rejected: 2 tokens summing to 2 ln(1/3), a_r = ln(1/3), p = 1/3, odds 1/2, log-odds -ln 2.
    log odds-ratio = 0 - (-ln 2) = ln 2; log sigma(ln 2) = ln(2/3).
    loss = -a_c - beta * ln(2/3) = ln 2 + 0.1 * ln(3/2) ~ 0.69315 + 0.04055 = 0.73369.
    Rewards beta * a: 0.1 ln(1/2) and 0.1 ln(1/3).
    """
    out = run("orpo", t(3 * math.log(0.5)), t(2 * math.log(1 / 3)), None, None, t(3), t(2), beta=0.1)
    assert_close(out.losses, LN2 + 0.1 * math.log(1.5))
    assert_close(out.chosen_rewards, 0.1 * math.log(0.5))
    assert_close(out.rejected_rewards, 0.1 * math.log(1 / 3))


def test_log1mexp_values_and_grads() -> None:
    """log(1 - e^x) against float64 maths on both sides of the -ln 2 switch, and a finite grad at x = 0."""
    x = torch.tensor([-30.0, -5.0, -0.7, -0.69, -1e-3, -1e-5], dtype=torch.float64)
    expected = torch.log(-torch.expm1(x))
    torch.testing.assert_close(log1mexp(x.float()).double(), expected, rtol=1e-5, atol=1e-7)
    x0 = torch.tensor([0.0, -1e-30, -100.0], requires_grad=True)
    y = log1mexp(x0)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x0.grad).all()


# ------------------------------------------------------------------------------------------------
# invariants


def test_label_smoothing_zero_is_plain_dpo() -> None:
    """eps = 0 gives -log sigma(beta * h) exactly, for sigmoid and for robust (whose factor is then 1)."""
    inp = random_inputs()
    params = LossParams(beta=0.3, label_smoothing=0.0)
    h = (inp["policy_chosen_logps"] - inp["ref_chosen_logps"]) - (
        inp["policy_rejected_logps"] - inp["ref_rejected_logps"]
    )
    expected = -F.logsigmoid(0.3 * h)
    torch.testing.assert_close(compute_loss("sigmoid", **inp, params=params).losses, expected)
    torch.testing.assert_close(compute_loss("robust", **inp, params=params).losses, expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_swapping_chosen_and_rejected_swaps_rewards(name: str) -> None:
    """Swapping the pair swaps the rewards, so the reward margin flips sign."""
    inp = random_inputs(seed=1)
    swapped = dict(
        policy_chosen_logps=inp["policy_rejected_logps"],
        policy_rejected_logps=inp["policy_chosen_logps"],
        ref_chosen_logps=inp["ref_rejected_logps"],
        ref_rejected_logps=inp["ref_chosen_logps"],
        chosen_lengths=inp["rejected_lengths"],
        rejected_lengths=inp["chosen_lengths"],
    )
    a = compute_loss(name, **inp, params=LossParams())
    b = compute_loss(name, **swapped, params=LossParams())
    torch.testing.assert_close(a.chosen_rewards, b.rejected_rewards)
    torch.testing.assert_close(a.rejected_rewards, b.chosen_rewards)
    torch.testing.assert_close(a.chosen_rewards - a.rejected_rewards, -(b.chosen_rewards - b.rejected_rewards))


def test_sigmoid_swap_identity() -> None:
    """sp(-x) - sp(x) = -x, so loss(pair) - loss(swapped pair) = -beta * h."""
    inp = random_inputs(seed=2)
    h = (inp["policy_chosen_logps"] - inp["ref_chosen_logps"]) - (
        inp["policy_rejected_logps"] - inp["ref_rejected_logps"]
    )
    a = compute_loss("sigmoid", **inp, params=LossParams(beta=0.2)).losses
    b = compute_loss(
        "sigmoid",
        inp["policy_rejected_logps"],
        inp["policy_chosen_logps"],
        inp["ref_rejected_logps"],
        inp["ref_chosen_logps"],
        inp["rejected_lengths"],
        inp["chosen_lengths"],
        LossParams(beta=0.2),
    ).losses
    torch.testing.assert_close(a - b, -0.2 * h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rewards_are_detached_and_losses_are_not(name: str) -> None:
    inp = random_inputs(requires_grad=True)
    out = compute_loss(name, **inp, params=LossParams(label_smoothing=0.1))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_nll_weight_adds_exactly_the_chosen_nll(name: str) -> None:
    """losses(nll_weight=0.7) - losses(0) = 0.7 * (-pi_c / |y_c|), with its gradient; rewards unchanged."""
    inp = random_inputs(seed=3, requires_grad=True)
    params = LossParams()
    base = compute_loss(name, **inp, params=params)
    with_nll = compute_loss(name, **inp, params=params, nll_weight=0.7)
    nll = -inp["policy_chosen_logps"] / inp["chosen_lengths"]
    torch.testing.assert_close(with_nll.losses - base.losses, 0.7 * nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_nll.chosen_rewards, base.chosen_rewards)
    (g_base,) = torch.autograd.grad(base.losses.sum(), inp["policy_chosen_logps"])
    (g_nll,) = torch.autograd.grad(with_nll.losses.sum(), inp["policy_chosen_logps"])
    torch.testing.assert_close(g_nll - g_base, -0.7 / inp["chosen_lengths"].float(), atol=1e-5, rtol=1e-5)


def test_unknown_loss_name_lists_valid_names() -> None:
    z = t(0.0)
    with pytest.raises(ConfigError) as err:
        compute_loss("dpo_typo", z, z, z, z, t(1), t(1), LossParams())
    for name in LOSSES:
        assert name in str(err.value)


def test_reference_based_loss_without_reference_raises() -> None:
    z = t(0.0)
    with pytest.raises(ConfigError, match="reference"):
        compute_loss("sigmoid", z, z, None, None, t(1), t(1), LossParams())


@pytest.mark.parametrize(
    "kwargs",
    [dict(beta=0.0), dict(beta=-1.0), dict(beta=float("nan")), dict(label_smoothing=-0.1), dict(label_smoothing=0.6)],
)
def test_bad_params_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        LossParams(**kwargs)


def test_negative_nll_weight_raises() -> None:
    z = t(0.0)
    with pytest.raises(ConfigError, match="nll_weight"):
        compute_loss("sigmoid", z, z, z, z, t(1), t(1), LossParams(), nll_weight=-1.0)


def test_registry_metadata_and_custom_loss() -> None:
    """The two reference-free losses are flagged; register_loss adds a loss and refuses duplicates."""
    assert {n for n, s in LOSSES.items() if s.reference_free} == {"simpo", "orpo"}
    assert {"sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"} <= set(LOSSES)
    assert all(s.description for s in LOSSES.values())

    @register_loss("_test_zero", reference_free=True)
    def zero(pc, pr, rc, rr, lc, lr, params):  # noqa: ANN001, ANN202
        """Always zero."""
        return LossOutput(pc * 0, pc.detach() * 0, pr.detach() * 0)

    try:
        assert LOSSES["_test_zero"].description == "Always zero."
        assert "_test_zero" in LOSS_TYPES  # Config.validate accepts a registered loss
        out = compute_loss("_test_zero", t(-1), t(-2), None, None, t(2), t(2), LossParams(), nll_weight=1.0)
        assert_close(out.losses, 0.5)  # 0 + 1.0 * (1 / 2)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_zero")(zero)
    finally:
        del LOSSES["_test_zero"]
        LOSS_TYPES.discard("_test_zero")


def test_config_knows_exactly_the_registered_losses() -> None:
    """config.LOSS_TYPES (what loss.type accepts; config sits below the losses) is the registry's key set."""
    assert LOSS_TYPES == set(LOSSES)


# ------------------------------------------------------------------------------------------------
# numerical safety


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_on_random_and_extreme_inputs(name: str) -> None:
    """Shapes (B,) and finite values AND gradients, including -1e4 log-probs, log-prob 0 and length 0."""
    inp = random_inputs(b=6, seed=4)
    extreme = [
        (-1e4, -1e4, 0.0, 0.0),
        (0.0, -1e4, -1e4, 0.0),
        (-1e4, 0.0, 0.0, -1e4),
        (0.0, 0.0, 0.0, 0.0),  # certain responses: orpo's log(1 - e^0) = -inf must not leak
        (-1e-7, -1e4, -1e-7, -1e4),
        (-5.0, -3.0, -5.0, -3.0),
    ]
    pc, pr, rc, rr = (
        torch.cat([inp[k].detach(), t(*col)])
        for k, col in zip(
            ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"], zip(*extreme)
        )
    )
    lc = torch.cat([inp["chosen_lengths"], torch.tensor([1, 1, 1000, 3, 0, 0])])
    lr = torch.cat([inp["rejected_lengths"], torch.tensor([1000, 1, 1, 3, 1, 0])])
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    for params in (LossParams(), LossParams(beta=5.0, label_smoothing=0.2, ipo_length_normalize=False)):
        out = compute_loss(name, pc, pr, rc, rr, lc, lr, params, nll_weight=0.5)
        for tensor in out:
            assert tensor.shape == (12,)
            assert torch.isfinite(tensor).all(), (name, params, tensor)
        g_c, g_r = torch.autograd.grad(out.losses.sum(), [pc, pr])
        assert torch.isfinite(g_c).all() and torch.isfinite(g_r).all(), (name, params, g_c, g_r)


# ------------------------------------------------------------------------------------------------
# parity with TRL


def _fake_fused_model(log_probs: torch.Tensor) -> object:
    """Stands in for a model called with `fused_lm_head=True`: returns the given per-token log-probs."""

    def model(**kwargs: object) -> types.SimpleNamespace:
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return model


def _trl_dpo_losses(
    loss_type: str, beta: float, eps: float, inp: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards) from TRL's own `DPOTrainer._compute_loss`, called unbound.

    TRL >= 1.x computes the DPO losses inline in `_compute_loss` (there is no `dpo_loss` method), so
    a SimpleNamespace stands in for the trainer and a fake model returns per-token log-probs placed
    so that each row sums to the wanted sequence log-prob. One call per pair, since TRL returns the
    batch mean (rewards are read back from the metrics it logs). Precomputed reference log-probs
    are passed through the batch.
    """
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    trainer_cls = dpo_trainer.DPOTrainer
    if not hasattr(trainer_cls, "_compute_loss"):
        pytest.skip("this TRL version has no DPOTrainer._compute_loss")

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in range(inp["policy_chosen_logps"].shape[0]):
        lengths = [int(inp["chosen_lengths"][i]), int(inp["rejected_lengths"][i])]
        seq_logps = [float(inp["policy_chosen_logps"][i]), float(inp["policy_rejected_logps"][i])]
        T = max(lengths) + 2
        completion_mask = torch.zeros(2, T, dtype=torch.long)
        log_probs = torch.zeros(2, T - 1)  # TRL's fused head returns shifted per-token log-probs
        for row, (n, lp) in enumerate(zip(lengths, seq_logps)):
            completion_mask[row, 1 : 1 + n] = 1
            log_probs[row, :n] = lp / n

        fake_self = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True),
            accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            beta=beta,
            label_smoothing=eps,
            use_weighting=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
            args=types.SimpleNamespace(),
        )
        inputs = dict(
            input_ids=torch.zeros(2, T, dtype=torch.long),
            attention_mask=torch.ones(2, T, dtype=torch.long),
            completion_mask=completion_mask,
            ref_chosen_logps=inp["ref_chosen_logps"][i : i + 1],
            ref_rejected_logps=inp["ref_rejected_logps"][i : i + 1],
        )
        try:
            loss = trainer_cls._compute_loss(fake_self, _fake_fused_model(log_probs), inputs, return_outputs=False)
        except (AttributeError, TypeError, KeyError) as exc:  # TRL internals moved: not a dpokit bug
            pytest.skip(f"cannot drive TRL's DPOTrainer._compute_loss with a stand-in: {exc!r}")
        losses.append(float(loss))
        chosen_rewards.append(fake_self._metrics["train"]["rewards/chosen"][-1])
        rejected_rewards.append(fake_self._metrics["train"]["rewards/rejected"][-1])
    return t(*losses), t(*chosen_rewards), t(*rejected_rewards)


@pytest.mark.parametrize(
    ("name", "eps", "ipo_norm"),
    [("sigmoid", 0.0, True), ("ipo", 0.0, True), ("hinge", 0.0, True), ("robust", 0.0, True), ("robust", 0.2, True)],
)
def test_matches_trl_dpo_losses(name: str, eps: float, ipo_norm: bool) -> None:
    """Same random tensors through dpokit and TRL's DPOTrainer give the same per-pair losses and rewards
    (for ipo: TRL length-normalises the loss but logs rewards on summed log-ratios, as we do).

    (TRL 1.x's `sigmoid` ignores label_smoothing; its cDPO term is gone, so it is compared at eps = 0.)
    """
    inp = random_inputs(b=5, seed=5)
    beta = 0.3
    ours = compute_loss(name, **inp, params=LossParams(beta=beta, label_smoothing=eps, ipo_length_normalize=ipo_norm))
    losses, chosen_rewards, rejected_rewards = _trl_dpo_losses(name, beta, eps, inp)
    torch.testing.assert_close(ours.losses, losses, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-5, rtol=1e-5)


def _experimental(module: str) -> types.ModuleType:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip(module)


def test_matches_trl_orpo() -> None:
    """TRL's `ORPOTrainer.odds_ratio_loss` on the same average log-probs: its per-pair term is
    beta * log sigma(log_odds) (subtracted from the NLL), so ours + a_c must equal minus TRL's term."""
    orpo = _experimental("trl.experimental.orpo.orpo_trainer")
    inp = random_inputs(b=6, seed=6)
    # include averages near 0, where log(1 - e^a) needs care
    pc = torch.cat([inp["policy_chosen_logps"], t(-1e-4, -0.5)])
    pr = torch.cat([inp["policy_rejected_logps"], t(-0.6, -1e-3)])
    lc = torch.cat([inp["chosen_lengths"], torch.tensor([2, 1])])
    lr = torch.cat([inp["rejected_lengths"], torch.tensor([1, 2])])
    fake_self = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    avg_c, avg_r = pc / lc, pr / lr
    trl_losses, trl_chosen, trl_rejected, _, _ = orpo.ORPOTrainer.odds_ratio_loss(fake_self, avg_c, avg_r)
    ours = compute_loss("orpo", pc, pr, None, None, lc, lr, LossParams(beta=0.25))
    torch.testing.assert_close(ours.losses + avg_c, -trl_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_trl_simpo(eps: float) -> None:
    """TRL's `CPOTrainer.cpo_loss` with loss_type='simpo' (fed average log-probs, as CPOTrainer does)."""
    cpo = _experimental("trl.experimental.cpo.cpo_trainer")
    inp = random_inputs(b=6, seed=7)
    fake_self = types.SimpleNamespace(
        beta=2.0,
        simpo_gamma=0.7,
        label_smoothing=eps,
        loss_type="simpo",
        alpha=0.0,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    avg_c = inp["policy_chosen_logps"] / inp["chosen_lengths"]
    avg_r = inp["policy_rejected_logps"] / inp["rejected_lengths"]
    trl_losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(fake_self, avg_c, avg_r)
    ours = compute_loss("simpo", **inp, params=LossParams(beta=2.0, simpo_gamma=0.7, label_smoothing=eps))
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)


@pytest.mark.parametrize(("eps", "ok"), [(0.0, True), (0.25, True), (0.4999, True), (0.5, False), (-0.1, False)])
def test_loss_params_and_config_agree_on_label_smoothing(eps: float, ok: bool) -> None:
    """The config check and the loss's own check accept exactly the same label_smoothing values."""
    from dpokit.config import Config

    def accepted(check: object) -> bool:
        try:
            check()  # type: ignore[operator]
        except ConfigError:
            return False
        return True

    assert accepted(lambda: LossParams(label_smoothing=eps)) is ok
    assert accepted(lambda: Config().override([f"loss.label_smoothing={eps}"]).validate()) is ok
