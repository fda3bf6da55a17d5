"""Preference losses over sequence log-probabilities, and the `LOSSES` registry.

Every loss takes the same arguments, so the trainer never branches on the loss name:

```python
fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
   chosen_lengths, rejected_lengths, params) -> LossOutput
```

* ``*_logps`` are (B,) fp32 log-probabilities of each response given its prompt, SUMMED over the
  response tokens (see `dpokit.models.logps`). The ``ref_*`` tensors may be ``None`` for reference-free
  losses (``LossSpec.reference_free``).
* ``*_lengths`` are (B,) numbers of response tokens (int or float); losses that need per-token
  averages divide by them (clamped to at least 1, so an empty response cannot divide by zero).
* The result holds the UNREDUCED per-pair loss and detached implicit rewards for logging.

Notation used in the docstrings: ``pi_c, pi_r`` policy log-probs, ``ref_c, ref_r`` reference
log-probs, ``h = (pi_c - ref_c) - (pi_r - ref_r)`` the DPO log-ratio margin, ``|y|`` a response
length, ``sigma`` the logistic function.

KTO (`dpokit kto`) is not a pair loss: `kto_loss` takes each example's completion log-probs, its label
(desirable or not) and the batch's reference point z0 (`kto_reference_point`), and has its own small
registry, `UNPAIRED_LOSSES`.

Imports only torch (and the stdlib-only `dpokit.errors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.config import LOSS_TYPES
from dpokit.errors import ConfigError

__all__ = [
    "KTOLossOutput",
    "KTOParams",
    "LOSSES",
    "LossFn",
    "LossOutput",
    "LossParams",
    "LossSpec",
    "compute_loss",
    "hinge_loss",
    "ipo_loss",
    "log1mexp",
    "orpo_loss",
    "register_loss",
    "robust_loss",
    "sigmoid_loss",
    "simpo_loss",
    "UNPAIRED_LOSSES",
    "kto_loss",
    "kto_reference_point",
]


class LossOutput(NamedTuple):
    """Per-pair result of a preference loss.

    Attributes:
        losses: (B,) per-pair loss, unreduced (the trainer takes the mean).
        chosen_rewards: (B,) detached implicit reward of the chosen response.
        rejected_rewards: (B,) detached implicit reward of the rejected response.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the preference losses.

    Attributes:
        beta: Inverse temperature / KL strength. DPO-family: scales the log-ratio margin and the
            rewards. IPO: the regulariser tau, the target margin is ``1 / (2 * beta)``. SimPO: the
            reward scale. ORPO: the weight lambda of the odds-ratio term. Must be > 0.
        label_smoothing: Assumed probability ``eps`` that a preference label is flipped. Used by
            ``sigmoid`` (conservative DPO), ``robust`` (rDPO, needs ``eps < 0.5``) and ``simpo``;
            ignored by ``ipo``, ``hinge`` and ``orpo``. Must be in ``[0, 0.5)`` (as `Config.validate`).
        ipo_length_normalize: ``ipo`` only. True: divide each response's log-ratio by its length
            before forming the margin (what TRL does and, per TRL, what the IPO authors used).
            False: use the summed log-ratios, as in the paper's equation.
        simpo_gamma: ``simpo`` only: the target reward margin gamma (in reward units, i.e. it is
            subtracted after multiplying by ``beta``).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_length_normalize: bool = True
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"loss beta must be a finite number > 0, got {self.beta}")
        if not (0.0 <= self.label_smoothing < 0.5):  # the same bound as Config.validate
            raise ConfigError(
                f"loss label_smoothing must be in [0, 0.5), got {self.label_smoothing}: at 0.5 a label is a coin "
                "flip (cDPO's loss no longer depends on the margin, and robust DPO divides by 1 - 2 eps = 0)"
            )
        if not math.isfinite(self.simpo_gamma):
            raise ConfigError(f"loss simpo_gamma must be finite, got {self.simpo_gamma}")


LossFn = Callable[
    [Tensor, Tensor, Tensor | None, Tensor | None, Tensor, Tensor, LossParams],
    LossOutput,
]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        fn: The loss function (signature in the module docstring).
        reference_free: True when the loss never reads the reference log-probs, so no reference
            model needs to be run or stored.
        description: One line for ``--help`` / docs.
    """

    fn: LossFn
    reference_free: bool
    description: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, reference_free: bool = False, description: str | None = None
) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss function to `LOSSES` under ``name``.

    Args:
        name: Registry key (what users write as ``loss.name`` in the config).
        reference_free: Whether the loss ignores the reference log-probs.
        description: One-line description; defaults to the first line of the function's docstring.

    Returns:
        The decorator, which returns the function unchanged.

    Raises:
        ValueError: If ``name`` is already registered (a programming error, not a user error).
    """

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        doc = description if description is not None else (fn.__doc__ or "").strip().split("\n")[0]
        LOSSES[name] = LossSpec(fn=fn, reference_free=reference_free, description=doc)
        LOSS_TYPES.add(name)  # so Config.validate accepts it as loss.type
        return fn

    return decorator


# --------------------------------------------------------------------------------------------------
# helpers


def _lengths(lengths: Tensor, like: Tensor) -> Tensor:
    """Lengths as floats of ``like``'s dtype, clamped to >= 1 so empty responses never divide by 0."""
    return lengths.to(device=like.device, dtype=like.dtype).clamp(min=1.0)  # (B,)


def _require_ref(
    ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, name: str
) -> tuple[Tensor, Tensor]:
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ConfigError(f"loss {name!r} needs reference log-probs; use a reference-free loss to train without one")
    return ref_chosen_logps, ref_rejected_logps


def _ref_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO implicit rewards ``beta * (pi - ref)`` on SUMMED log-probs, detached (logging only)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return chosen, rejected


def _smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """``(1 - eps) * -log sigma(z) + eps * -log sigma(-z)``; skips the second term when eps == 0.

    Skipping matters: with z = +1e4, ``-log sigma(-z)`` is 1e4 and ``0 * 1e4`` is fine, but there
    is no reason to pay for it, and it keeps eps == 0 bit-identical to plain DPO.
    """
    losses = -F.logsigmoid(logits)  # (B,) softplus(-z), stable for any z
    if eps > 0:
        losses = (1.0 - eps) * losses + eps * -F.logsigmoid(-logits)
    return losses


def log1mexp(x: Tensor) -> Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x <= 0``.

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` far from it, switching at ``-ln 2``
    (Maechler, "Accurately computing log(1 - exp(-|a|))", 2012). Each branch only ever sees inputs
    valid for it, so the branch ``torch.where`` discards cannot leak inf/NaN into the gradient.
    ``x`` is clamped to ``<= -1e-6`` (gradient 0 above that) because the function goes to -inf at
    0; a per-token average log-prob above -1e-6 means the model is already certain of the response.

    Args:
        x: Log-probabilities, any shape, ``<= 0``.

    Returns:
        ``log(1 - exp(x))``, same shape, always finite.
    """
    x = x.clamp(max=-1e-6)
    cut = -math.log(2.0)
    near_zero = x > cut
    x_near = torch.where(near_zero, x, torch.full_like(x, cut))  # values for the expm1 branch
    x_far = torch.where(near_zero, torch.full_like(x, cut), x)  # values for the log1p branch
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


# --------------------------------------------------------------------------------------------------
# losses


@register_loss("sigmoid", reference_free=False)
def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), optionally conservative (cDPO) with label smoothing.

    ``loss = -log sigma(beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``. With
    ``eps = params.label_smoothing > 0`` (Mitchell 2023, "A note on DPO with noisy preferences"):
    ``loss = (1 - eps) * -log sigma(beta * h) + eps * -log sigma(-beta * h)``.
    Rewards: ``beta * (pi - ref)`` for each response.
    """
    ref_c, ref_r = _require_ref(ref_chosen_logps, ref_rejected_logps, "sigmoid")
    margin = (policy_chosen_logps - ref_c) - (policy_rejected_logps - ref_r)  # (B,) h
    losses = _smoothed_logistic(params.beta * margin, params.label_smoothing)  # (B,)
    return LossOutput(losses, *_ref_rewards(policy_chosen_logps, policy_rejected_logps, ref_c, ref_r, params.beta))


@register_loss("ipo", reference_free=False)
def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17): squared margin regression.

    ``loss = (h - 1 / (2 * beta))^2`` where ``beta`` is the paper's tau. With
    ``params.ipo_length_normalize`` (default, as TRL's DPOTrainer) each log-ratio is averaged over its
    response: ``h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|``; otherwise the summed
    ``h = (pi_c - ref_c) - (pi_r - ref_r)`` of the paper's equation. Summed margins grow with the
    response length, so the fixed target ``1 / (2 * beta)`` means different things for short and long
    responses; normalising makes beta comparable across lengths.
    Rewards: ``beta * (pi - ref)`` on the SUMMED log-probs whatever the normalisation (as TRL logs).
    """
    ref_c, ref_r = _require_ref(ref_chosen_logps, ref_rejected_logps, "ipo")
    chosen_ratio = policy_chosen_logps - ref_c  # (B,)
    rejected_ratio = policy_rejected_logps - ref_r  # (B,)
    if params.ipo_length_normalize:
        chosen_ratio = chosen_ratio / _lengths(chosen_lengths, chosen_ratio)  # (B,) per-token average
        rejected_ratio = rejected_ratio / _lengths(rejected_lengths, rejected_ratio)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * params.beta)) ** 2  # (B,)
    return LossOutput(losses, *_ref_rewards(policy_chosen_logps, policy_rejected_logps, ref_c, ref_r, params.beta))


@register_loss("hinge", reference_free=False)
def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF", rank-calibration loss) applied to DPO log-ratios.

    ``loss = max(0, 1 - beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``, i.e. a margin of
    ``1 / beta`` nats (``delta = 1/beta`` in SLiC's notation). Rewards: ``beta * (pi - ref)``.
    """
    ref_c, ref_r = _require_ref(ref_chosen_logps, ref_rejected_logps, "hinge")
    margin = (policy_chosen_logps - ref_c) - (policy_rejected_logps - ref_r)  # (B,)
    losses = torch.relu(1.0 - params.beta * margin)  # (B,)
    return LossOutput(losses, *_ref_rewards(policy_chosen_logps, policy_rejected_logps, ref_c, ref_r, params.beta))


@register_loss("robust", reference_free=False)
def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """Robust DPO (rDPO; Chowdhury et al. 2024, "Provably Robust DPO"): de-biased for label-flip rate eps.

    ``loss = [(1 - eps) * -log sigma(beta * h) - eps * -log sigma(-beta * h)] / (1 - 2 * eps)``
    with ``eps = params.label_smoothing`` (< 0.5, checked by `LossParams`). Unlike cDPO the flipped-label term is
    SUBTRACTED, which makes the loss an unbiased estimate of the clean-label DPO loss; it can be
    negative. Same formula as TRL's ``loss_type="robust"``. Rewards: ``beta * (pi - ref)``.
    """
    ref_c, ref_r = _require_ref(ref_chosen_logps, ref_rejected_logps, "robust")
    eps = params.label_smoothing
    logits = params.beta * ((policy_chosen_logps - ref_c) - (policy_rejected_logps - ref_r))  # (B,)
    clean = -(1.0 - eps) * F.logsigmoid(logits)  # (B,) loss if the label is right
    flipped = -eps * F.logsigmoid(-logits)  # (B,) loss if the label is flipped
    losses = (clean - flipped) / (1.0 - 2.0 * eps)  # (B,)
    return LossOutput(losses, *_ref_rewards(policy_chosen_logps, policy_rejected_logps, ref_c, ref_r, params.beta))


@register_loss("simpo", reference_free=True)
def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-averaged log-probs with a target margin.

    ``loss = -log sigma(beta * (pi_c / |y_c| - pi_r / |y_r|) - gamma)``, ``gamma = params.simpo_gamma``.
    With label smoothing eps the logistic term is smoothed as in cDPO (as TRL's CPOTrainer does):
    ``(1 - eps) * -log sigma(z) + eps * -log sigma(-z)``.
    Rewards: ``beta * pi / |y|`` (the paper's implicit reward).
    """
    avg_c = policy_chosen_logps / _lengths(chosen_lengths, policy_chosen_logps)  # (B,)
    avg_r = policy_rejected_logps / _lengths(rejected_lengths, policy_rejected_logps)  # (B,)
    logits = params.beta * (avg_c - avg_r) - params.simpo_gamma  # (B,)
    losses = _smoothed_logistic(logits, params.label_smoothing)  # (B,)
    return LossOutput(losses, params.beta * avg_c.detach(), params.beta * avg_r.detach())


@register_loss("orpo", reference_free=True)
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
) -> LossOutput:
    """ORPO (Hong et al. 2024, Eqs. 4-7): chosen NLL plus a weighted log odds-ratio term.

    With per-token averages ``a_c = pi_c / |y_c|`` and ``a_r = pi_r / |y_r|`` (as TRL's ORPOTrainer),
    ``odds(y) = p / (1 - p)`` with ``p = exp(a)``, so
    ``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`` and
    ``loss = -a_c - beta * log sigma(log_odds)`` (``beta`` is the paper's lambda).
    The NLL term here covers the response tokens only and is averaged per pair; TRL's ORPOTrainer
    averages cross-entropy over prompt AND response tokens of the whole batch instead.
    Rewards: ``beta * a`` (as TRL logs).
    """
    # fp32 at least: log1mexp near 0 is only as good as the precision of its input
    acc = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    avg_c = policy_chosen_logps.to(acc) / _lengths(chosen_lengths, policy_chosen_logps.to(acc))  # (B,)
    avg_r = policy_rejected_logps.to(acc) / _lengths(rejected_lengths, policy_rejected_logps.to(acc))  # (B,)
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))  # (B,)
    losses = -avg_c - params.beta * F.logsigmoid(log_odds)  # (B,) NLL(chosen) + lambda * L_OR
    return LossOutput(losses, params.beta * avg_c.detach(), params.beta * avg_r.detach())


# --------------------------------------------------------------------------------------------------
# entry point


def compute_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    params: LossParams,
    nll_weight: float = 0.0,
) -> LossOutput:
    """Run the registered loss ``name``, optionally adding an RPO-style NLL term on the chosen response.

    With ``nll_weight = alpha > 0`` each pair's loss gets ``alpha * (-pi_c / |y_c|)`` (the
    length-averaged negative log-likelihood of the chosen response, as in RPO: Pang et al. 2024,
    "Iterative Reasoning Preference Optimization"). Rewards are those of the base loss.

    Args:
        name: A key of `LOSSES`.
        policy_chosen_logps: (B,) summed policy log-probs of the chosen responses.
        policy_rejected_logps: (B,) summed policy log-probs of the rejected responses.
        ref_chosen_logps: (B,) summed reference log-probs, or None for reference-free losses.
        ref_rejected_logps: (B,) summed reference log-probs, or None for reference-free losses.
        chosen_lengths: (B,) number of chosen response tokens.
        rejected_lengths: (B,) number of rejected response tokens.
        params: Loss hyper-parameters.
        nll_weight: Weight of the extra NLL term; 0 disables it.

    Returns:
        The `LossOutput` of the loss, with the NLL term folded into ``losses``.

    Raises:
        ConfigError: If ``name`` is not registered, ``nll_weight`` is negative, or a
            reference-based loss gets no reference log-probs.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    if not (nll_weight >= 0 and math.isfinite(nll_weight)):
        raise ConfigError(f"nll_weight must be a finite number >= 0, got {nll_weight}")
    out = spec.fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        params,
    )
    if nll_weight > 0:
        nll = -policy_chosen_logps / _lengths(chosen_lengths, policy_chosen_logps)  # (B,) mean NLL per token
        out = out._replace(losses=out.losses + nll_weight * nll)
    return out


# --------------------------------------------------------------------------------------------------
# unpaired losses: KTO


class KTOLossOutput(NamedTuple):
    """Per-example result of an unpaired loss (`kto_loss`).

    Attributes:
        losses: (B,) per-example weighted loss, unreduced (the trainer takes the mean).
        rewards: (B,) detached implicit reward ``beta * (pi - ref)`` of each completion.
    """

    losses: Tensor
    rewards: Tensor


@dataclass(frozen=True)
class KTOParams:
    """Hyper-parameters of KTO (`dpokit kto`: loss.beta, kto.desirable_weight, kto.undesirable_weight).

    Attributes:
        beta: Scales the log-ratios inside the value function (TRL's KTOConfig.beta). Must be > 0.
        desirable_weight: lambda_D, the weight of a desirable (label true) example's loss.
        undesirable_weight: lambda_U, the weight of an undesirable (label false) example's loss.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"KTO beta (loss.beta) must be a finite number > 0, got {self.beta}")
        weights = (("desirable_weight", self.desirable_weight), ("undesirable_weight", self.undesirable_weight))
        for name, value in weights:
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"kto.{name} must be a finite number >= 0, got {value}")


def kto_reference_point(
    policy_kl_logps: Tensor, ref_kl_logps: Tensor, reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """KTO's reference point z0: the KL estimate of a batch, ``max(0, mean_j (pi'_j - ref'_j))``, detached.

    ``pi'_j`` / ``ref'_j`` (B,) are the summed policy / reference log-probs of MISMATCHED sequences:
    example j's prompt followed by another example's completion (TRL's KL sequences). With
    `reduce_sum` (`Dist.reduce_sum`: a sum over processes) the mean is over every process's examples,
    sum of the sums / sum of the counts; with equal batches per process that is TRL's mean of the
    per-process means (`gather_for_metrics(kl).mean()`). The clamp comes after the mean, as in TRL.

    Example: pi' = [-3, -5], ref' = [-4, -4] -> diffs [1, -1] -> mean 0 -> z0 = 0; pi' = [-3, -3]
    -> diffs [1, 1] -> z0 = 1; pi' = [-5, -5] -> mean -1 -> clamped: z0 = 0.
    """
    diff = (policy_kl_logps.detach().float() - ref_kl_logps.detach().float())  # (B,)
    packed = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])  # (2,) sum, count
    if reduce_sum is not None:
        packed = reduce_sum(packed)
    return (packed[0] / packed[1].clamp(min=1.0)).clamp(min=0.0)  # ()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor, params: KTOParams) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024, Eq. 7-8; TRL's KTOTrainer, loss_type="kto"): a per-example loss on
    labelled completions, no pairs.

    With ``r = pi - ref`` (summed completion log-probs) and the reference point ``z0 = kl``
    (`kto_reference_point`, detached):

        desirable (label true):     loss = lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable (label false):  loss = lambda_U * (1 - sigma(beta * (z0 - r)))

    computed as ``sigma(-z)`` (= 1 - sigma(z), without the cancellation). Rewards: ``beta * r``.
    The mean over a batch is TRL's loss (``losses.nanmean()`` over the batch's desirable and
    undesirable examples together).

    Example: beta = 0.1, z0 = 1, lambda_D = 1, lambda_U = 2; a desirable example with r = 3 has
    loss 1 - sigma(0.1 * (3 - 1)) = 1 - sigma(0.2) = 0.450166; an undesirable one with r = -1 has
    loss 2 * (1 - sigma(0.1 * (1 - (-1)))) = 2 * 0.450166 = 0.900332. Rewards 0.3 and -0.1.

    Args:
        policy_logps: (B,) summed policy log-probs of each completion given its prompt.
        ref_logps: (B,) the same under the reference.
        labels: (B,) bool, True = desirable.
        kl: () the reference point z0 (>= 0).
        params: beta and the two weights.
    """
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    ratio = policy_logps - ref_logps  # (B,) r
    z = params.beta * torch.where(labels, ratio - kl, kl - ratio)  # (B,)
    weights = torch.where(labels, params.desirable_weight, params.undesirable_weight).to(z.dtype)  # (B,)
    return KTOLossOutput(weights * torch.sigmoid(-z), params.beta * ratio.detach())


UnpairedLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, KTOParams], KTOLossOutput]

# The unpaired losses (per-example labels and a reference point, not pairs: `dpokit kto`), by name.
# The pair registry `LOSSES` does not fit them (its functions take chosen/rejected tensors).
UNPAIRED_LOSSES: dict[str, UnpairedLossFn] = {"kto": kto_loss}
