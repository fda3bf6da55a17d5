"""RL arithmetic against hand-computed values (the docstrings of dpokit.rl.losses show the sums), and the
vectorised GAE against a plain per-response loop."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.rl import losses as L
from dpokit.rl.loop import step_prompts
from dpokit.rl.toy import letter_e


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_estimators_by_hand() -> None:
    logps, ref = t([-1.0, -0.5]), t([-2.0, -0.5])
    assert L.kl_k1(logps, ref).tolist() == [[1.0, 0.0]]
    # k3: log r = ref - logp = -1 -> e^-1 - 1 + 1 = 0.367879...; equal log-probs -> 0
    assert L.kl_k3(logps, ref)[0].tolist() == pytest.approx([math.exp(-1), 0.0])
    # k3 is never negative, k1 is when the sample is likelier under the reference
    assert float(L.kl_k3(t([-3.0]), t([-1.0]))) == pytest.approx(math.exp(2) - 1 - 2)
    assert float(L.kl_k1(t([-3.0]), t([-1.0]))) == -2.0


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    kl = t([0.5, 0.25, 9.0])
    mask = torch.tensor([[True, True, False]])
    rewards, non_score = L.token_rewards(t([1.0])[0], kl, mask, 0.1)
    assert non_score[0].tolist() == pytest.approx([-0.05, -0.025, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.975, 0.0])


def test_gae_by_hand() -> None:
    # r = (0, 1), V = (0.5, 0.25), gamma 1, lam 0.5: A_1 = 1 - 0.25 = 0.75; A_0 = 0 + 0.25 - 0.5 + 0.5 * 0.75 = 0.125
    adv, ret = L.gae(t([0.0, 1.0, 0.0]), t([0.5, 0.25, 7.0]), torch.tensor([[True, True, False]]), 1.0, 0.5)
    assert adv[0].tolist() == pytest.approx([0.125, 0.75, 0.0])
    assert ret[0].tolist() == pytest.approx([0.625, 1.0, 0.0])
    # gamma 0.5, lam 1, one token: delta = r - V = 2 - 1 = 1 (no next value: the episode ends)
    adv, _ = L.gae(t([2.0]), t([1.0]), torch.tensor([[True]]), 0.5, 1.0)
    assert adv.tolist() == [[1.0]]


def _naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE of one unpadded response, the textbook recursion."""
    out, running = [0.0] * len(rewards), 0.0
    for k in reversed(range(len(rewards))):
        next_value = values[k + 1] if k + 1 < len(rewards) else 0.0
        running = rewards[k] + gamma * next_value - values[k] + gamma * lam * running
        out[k] = running
    return out


def test_gae_batched_equals_the_per_response_loop() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    rewards, values = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[k < n for k in range(5)] for n in lengths])
    adv, ret = L.gae(rewards, values, mask, 0.9, 0.8)
    for i, n in enumerate(lengths):
        expected = _naive_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.8)
        assert adv[i, :n].tolist() == pytest.approx(expected)
        assert adv[i, n:].abs().sum() == 0
        assert ret[i, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[i, :n].tolist())])


def test_rloo_leave_one_out_baseline() -> None:
    assert L.rloo_advantages(t([1.0, 2.0, 6.0]))[0].tolist() == pytest.approx([-3.0, -1.5, 4.5])
    # a failed reward leaves its group's baselines and gets advantage 0
    valid = torch.tensor([[True, False, True]])
    assert L.rloo_advantages(t([1.0, 100.0, 6.0]), valid)[0].tolist() == pytest.approx([-5.0, 0.0, 5.0])
    # no valid sibling: no baseline, advantage 0
    assert L.rloo_advantages(t([1.0, 2.0]), torch.tensor([[True, False]])).tolist() == [[0.0, 0.0]]


def test_clipped_policy_loss_by_hand() -> None:
    old = t([0.0, 0.0, 0.0])
    logps = torch.log(t([1.5, 1.5, 0.5]))
    loss, clipped = L.clipped_policy_loss(logps, old, t([1.0, -1.0, 1.0]), 0.2)
    # A=1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1, ratio 1.5: max(1.5, 1.2) = 1.5;
    # A=1, ratio 0.5: max(-0.5, -0.8) = -0.5 (not clipped: the pessimistic, unclipped side)
    assert loss[0].tolist() == pytest.approx([-1.2, 1.5, -0.5])
    assert clipped.tolist() == [[True, False, False]]


def test_clipped_value_loss_by_hand() -> None:
    loss, clipped = L.clipped_value_loss(t([1.0, 0.1]), t([0.0, 0.0]), t([1.0, 0.0]), 0.2)
    # V 1 vs old 0, G 1: v_clip 0.2 -> 0.5 * max(0, 0.64) = 0.32; V 0.1 within the range: 0.5 * 0.01
    assert loss[0].tolist() == pytest.approx([0.32, 0.005])
    assert clipped.tolist() == [[True, False]]


def test_approx_kl_explained_variance_and_whitening() -> None:
    assert L.approx_kl(t([0.2]), t([0.0]))[0].tolist() == pytest.approx([0.02])
    mask = torch.tensor([[True, True, True, False]])
    returns = t([1.0, 2.0, 3.0, 50.0])
    assert L.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # V = 0: Var(G - V) = Var(G) -> 0; a constant return has no variance to explain -> nan
    assert L.explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)
    assert math.isnan(L.explained_variance(returns, t([1.0, 1.0, 1.0, 1.0]), mask))
    w = L.masked_whiten(returns, mask)
    # mean 2, unbiased var 1 -> (-1, 0, 1), padding 0
    assert w[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert float(L.masked_mean(returns, mask)) == 2.0


def test_adaptive_kl_controller_by_hand() -> None:
    c = L.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(12.0, 16) == pytest.approx(0.1 * (1 + 0.2 * 16 / 1000))  # error clipped to +0.2
    c = L.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(5.4, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 1000))
    fixed = L.AdaptiveKLController(0.1)
    assert fixed.update(100.0, 16) == 0.1


def test_step_prompts_cover_each_epoch_once_and_repeat_exactly() -> None:
    first_epoch = [i for s in range(1, 6) for i in step_prompts(10, 2, 3, s)]
    assert sorted(first_epoch) == list(range(10))
    assert step_prompts(10, 4, 3, 7) == step_prompts(10, 4, 3, 7)
    # a step that straddles two epochs: the end of one permutation, then the start of the next
    assert len(step_prompts(10, 4, 3, 3)) == 4


def test_toy_reward_by_hand() -> None:
    assert letter_e(["tree", "a1!", "", "EeX"]) == [0.5, 0.0, 0.0, pytest.approx(2 / 3)]


def test_rl_config_checks() -> None:
    Config().validate()
    with pytest.raises(ConfigError, match="rloo needs rl.samples_per_prompt >= 2"):
        Config().override(["rl.algorithm=rloo", "rl.samples_per_prompt=1"]).validate()
    assert Config().override(["rl.algorithm=rloo"]).rl.samples() == 2
    with pytest.raises(ConfigError, match="rl.kl_target must be > 0"):
        Config().override(["rl.kl_target=0"]).validate()
    with pytest.raises(ConfigError, match="did you mean rl.ppo_epochs"):
        Config().override(["train.num_ppo_epochs=2"])


def test_a_bare_no_on_the_command_line_is_the_string_no() -> None:
    # YAML 1.1 reads `no` as false; train.mixed_precision's choices are the strings "no" and "bf16"
    assert Config().override(["train.mixed_precision=no"]).train.mixed_precision == "no"
