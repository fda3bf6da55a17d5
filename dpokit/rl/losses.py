"""The arithmetic of RLHF's RL stage: KL estimators, per-token rewards, GAE, RLOO's baseline, the
clipped policy and value losses, and the adaptive KL controller. Pure functions of tensors (torch
only), unreduced where a loss is concerned; `dpokit.rl.loop` does the bookkeeping around them.

Layout: N responses, each a row of R response-token slots, right-padded; ``mask`` (N, R) marks the
real tokens. Slot t of row i holds the t-th generated token of response i (EOS included when it
came), its log-prob under the policy / reference, and the value of the state before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


# ---- masked statistics ----------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true: sum(x * m) / sum(m); 0 for no position."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of ``x`` over the masked positions (n - 1 in the denominator; 0 below 2 positions)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    return (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; unmasked positions are set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask.to(x.dtype)


# ---- KL -------------------------------------------------------------------------------------
def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(y_t) - log ref(y_t) per token: unbiased for KL(pi || ref) when y ~ pi, can be negative.

    Example: log pi = -1, log ref = -2 -> 1.
    """
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = ref(y_t) / pi(y_t) (Schulman's estimator): unbiased, always >= 0, lower
    variance than k1 when pi and ref are close.

    Example: log pi = -1, log ref = -2 -> log r = -1, r = e^-1 = 0.367879: 0.367879 - 1 + 1 = 0.367879.
    """
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """(rewards, non-score rewards), each (N, R): every token is penalised by ``-kl_coef * kl_t`` and the
    last real token of each response also receives its ``score`` (N,) (the InstructGPT / Ziegler et al.
    reward). Padding slots are 0.

    Example: score 1, kl (0.5, 0.25), coef 0.1 -> non-score (-0.05, -0.025), rewards (-0.05, 0.975).
    """
    m = mask.to(kl.dtype)
    non_score = -kl_coef * kl * m  # (N, R)
    last = (mask.long().sum(1) - 1).clamp(min=0)  # (N,) slot of the last real token
    rewards = non_score.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


# ---- advantages -----------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response: (advantages, returns),
    each (N, R), 0 on padding.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last real token (the episode ends there);
    A_t = delta_t + gamma * lam * A_{t+1}; returns_t = A_t + V_t (the value loss's targets).

    Example (one response of 2 tokens, gamma = 1, lam = 0.5): r = (0, 1), V = (0.5, 0.25):
    delta_1 = 1 - 0.25 = 0.75, A_1 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5 * 0.75 = 0.125;
    returns = (0.625, 1.0).
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    n, r = values.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(n, dtype=values.dtype, device=values.device)  # A_{t+1}
    for t in reversed(range(r)):
        live_next = m[:, t + 1] if t + 1 < r else torch.zeros_like(running)  # 0 once the response has ended
        next_value = values[:, t + 1] * live_next if t + 1 < r else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * live_next
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


def rloo_advantages(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each of a prompt's k samples is
    baselined by the mean reward of the OTHER samples of that prompt. ``rewards`` (P, k); ``valid`` (P, k)
    marks scored samples (a failed reward is left out of its group's baselines; its own advantage is 0, as
    is that of a sample with no valid sibling).

    Example: rewards (1, 2, 6) -> baselines (4, 3.5, 1.5) -> advantages (-3, -1.5, 4.5).
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    v = valid.to(rewards.dtype)
    r = rewards * v
    others = v.sum(1, keepdim=True) - v  # (P, k) valid siblings of each sample
    baseline = (r.sum(1, keepdim=True) - r) / others.clamp(min=1)
    return torch.where(valid & (others > 0), rewards - baseline, torch.zeros_like(rewards))


# ---- losses ---------------------------------------------------------------------------------
def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, cliprange: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), to be minimised: (loss, clipped), both
    (N, R). ratio = exp(log pi - log pi_old); loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps));
    ``clipped`` is true where the clipped term is the larger one (the clip fraction's numerator).

    Example: A = 1, ratio = 1.5, eps = 0.2: max(-1.5, -1.2) = -1.2 (clipped: no gain from going further);
    A = -1, ratio = 1.5: max(1.5, 1.2) = 1.5 (not clipped: the pessimistic side is kept).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token: (loss, clipped), both (N, R).
    v_clip = V_old + clip(V - V_old, -c, c); loss = 0.5 * max((V - G)^2, (v_clip - G)^2).

    Example: V_old = 0, V = 1, G = 1, c = 0.2: v_clip = 0.2; 0.5 * max(0, 0.64) = 0.32 (clipped).
    """
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain, clip = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clip), clip > plain


def approx_kl(logps: Tensor, old_logps: Tensor) -> Tensor:
    """0.5 * (log pi - log pi_old)^2 per token: how far an update moved the policy from the rollout's
    (the k2 estimator; a health metric, not a loss). Example: log-ratio 0.2 -> 0.02."""
    return 0.5 * (logps - old_logps) ** 2


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(G - V) / Var(G) over the masked tokens: 1 = perfect values, 0 = no better than a constant,
    negative = worse; nan when the returns do not vary."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


# ---- the adaptive KL coefficient ------------------------------------------------------------
@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019's proportional controller: after each rollout batch of ``n`` samples whose mean
    sequence KL was ``kl``, coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon).

    Example: coef 0.1, target 6, kl 12, n 16, horizon 1000: error clipped to 0.2 -> 0.1 * 1.0032 = 0.10032.
    """

    value: float
    target: float | None = None  # None: a fixed coefficient, `update` changes nothing
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value
