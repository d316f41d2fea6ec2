"""Stochastic scaled-conjugate-gradient adaptive optimizers: SCGAdam, SCGAMSGrad and SCGRMSProp.

Sato, Izumi & Iiduka (2024) accelerate an adaptive method by feeding it, in place of the stochastic gradient gₙ,
the scaled conjugate-gradient direction. The paper writes it as a gradient-like vector,

    Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁,    stepping along −Gₙ;

in terms of the step direction d = −G that is dₙ = −(1 + γₙ)gₙ − δₙdₙ₋₁. The authors' public code instead
computes dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁: the previous direction enters with the opposite sign (the classical
conjugate-gradient sign, where the paper's is the sign of an anti-momentum). Both are offered through
``direction_form``: ``"paper"`` (the default) and ``"authors-code"``. d₁ = −g₁ in both. The second moment stays on
the raw gradient gₙ². Everything is elementwise, per parameter tensor. The name is shared with Møller's SCG
(``scg.py``), the idea is not: Møller's method is full-batch, has no learning rate and scales a Hessian model;
these are stochastic, learning-rate driven, and "scaled" refers to the factor 1 + γₙ on the gradient.

Each class is the engine of :mod:`moller_scg.conjugate_adaptive` with the direction rule of this module
(:class:`ScaledConjugateDirection`) and a moment rule of :mod:`moller_scg.adaptive_moments` (Adam, AMSGrad,
RMSProp).

Schedules: γ and δ accept a number or a callable n ↦ value, called with the parameter's step count n = 1, 2, ….
The paper's diminishing learning rate αₙ = α/√n is :func:`diminishing_lr`, a ``torch.optim.lr_scheduler.LambdaLR``.
``state_dict()`` saves a callable schedule as :data:`SCHEDULE_PLACEHOLDER` (callables cannot be loaded with
``weights_only=True``); ``load_state_dict`` keeps the schedule the receiving optimizer was constructed with, so
schedules are re-supplied by constructing the optimizer as before.

Example:
    >>> import torch
    >>> from moller_scg.scg_adam import SCGAdam, diminishing_lr
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    >>> optimizer = SCGAdam([w], lr=0.3, gamma=lambda n: 0.5**n, delta=lambda n: 0.5**n)
    >>> scheduler = diminishing_lr(optimizer)  # αₙ = α/√n
    >>> for _ in range(200):
    ...     optimizer.zero_grad()
    ...     (w**2).sum().backward()
    ...     optimizer.step()
    ...     scheduler.step()
    >>> bool((w.detach() ** 2).sum() < 1e-6)
    True

References:
    Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
    neural networks. Journal of Machine Learning Research 25(395), 1–37. arXiv:2412.11400.

    Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. ICLR. arXiv:1412.6980.

    Reddi, S. J., Kale, S. & Kumar, S. (2018). On the convergence of Adam and beyond. ICLR. (AMSGrad)

    Tieleman, T. & Hinton, G. (2012). Lecture 6.5 — RMSProp. COURSERA: Neural Networks for Machine Learning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from moller_scg.adaptive_moments import AdaptiveMoments, RMSPropMoments
from moller_scg.conjugate_adaptive import (
    SCHEDULE_PLACEHOLDER,
    ConjugateAdaptiveOptimizer,
    Params,
    Schedule,
    check_adam_hyperparameters,
    check_choice,
    check_flag,
    check_nonnegative,
    check_schedule,
    check_smoothing,
    diminishing_lr,
    schedule_value,
)

__all__ = ["SCGAdam", "SCGAMSGrad", "SCGRMSProp", "diminishing_lr", "SCHEDULE_PLACEHOLDER"]

# Adam's defaults (Kingma & Ba 2015; torch.optim.Adam), which the authors' code keeps.
DEFAULT_LR = 1e-3
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
DEFAULT_GAMMA = 0.1
"""γ: the value of the authors' code (its constant setting ``C1``); the paper's constant-rate experiments use γ = 1."""
DEFAULT_DELTA = 0.1
"""δ: the value of the authors' code (``C1``), one of the paper's δ ∈ {1e-1, 1e-2, 1e-3}."""

PREVIOUS_DIRECTION_SIGN = {"paper": -1.0, "authors-code": 1.0}
"""The sign s of the previous direction in dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁, by ``direction_form``:

* ``"paper"``: s = −1, Sato, Izumi & Iiduka (2024), Gₙ = (1 + γₙ)G(xₙ, ξₙ) − δₙGₙ₋₁ with the step along −Gₙ;
* ``"authors-code"``: s = +1, the authors' public SCGAdam code, dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁."""
DEFAULT_DIRECTION_FORM = "paper"
DEFAULT_RMSPROP_ALPHA = 0.99
"""RMSProp's smoothing constant, as in ``torch.optim.RMSprop`` and the authors' RMSProp code."""


# -------------------------------------------------------------------------------------------------------------------
# The direction rule


class ScaledConjugateState(NamedTuple):
    direction: torch.Tensor
    """dₙ₋₁ before a step, dₙ after it"""


@dataclasses.dataclass(frozen=True)
class ScaledConjugateDirection:
    """dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁, d₁ = −g₁ (γ₁, δ₁ are not used), with γₙ, δₙ the group's ``gamma``, ``delta``
    (numbers or schedules) and s = :data:`PREVIOUS_DIRECTION_SIGN` of ``direction_form``."""

    sign: float
    State = ScaledConjugateState
    group_wide = False

    def group_context(self, group: dict[str, Any], inputs: list[tuple[torch.Tensor, Any]]) -> None:
        return None

    def direction(
        self, grad: torch.Tensor, state: ScaledConjugateState, n: int, group: dict[str, Any], context: None
    ) -> torch.Tensor:
        direction = state.direction
        if n == 1:
            return direction.copy_(grad).neg_()
        gamma, delta = schedule_value(group, "gamma", n), schedule_value(group, "delta", n)
        return direction.mul_(self.sign * delta).add_(grad, alpha=-(1.0 + gamma))


def scaled_conjugate_rule(group: dict[str, Any]) -> ScaledConjugateDirection:
    """The direction rule of a group of SCGAdam, SCGAMSGrad or SCGRMSProp."""
    return ScaledConjugateDirection(sign=PREVIOUS_DIRECTION_SIGN[group["direction_form"]])


def _check_scaled_conjugate_rule(group: dict[str, Any]) -> None:
    check_schedule(group, "gamma", "gamma (γ)")
    check_schedule(group, "delta", "delta (δ)")
    check_choice(group, "direction_form", PREVIOUS_DIRECTION_SIGN)


# -------------------------------------------------------------------------------------------------------------------
# The optimizers


class SCGAdam(ConjugateAdaptiveOptimizer):
    r"""Adam whose first moment averages the scaled conjugate-gradient direction (Sato, Izumi & Iiduka 2024).

    For each parameter tensor x with stochastic gradient gₙ at its n-th step (plus ``weight_decay``·x when set),
    elementwise:

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ
        vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²                       (the raw gradient, not d)
        xₙ₊₁ = xₙ + (αₙ/(1 − β₁ⁿ)) · mₙ / (√(vₙ/(1 − β₂ⁿ)) + ε)

    With γ = δ = 0, dₙ = −gₙ and this is ``torch.optim.Adam`` bit for bit. The paper states the direction as
    Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁ with the step along −Gₙ, which is s = −1 here; its authors' code uses s = +1
    (``direction_form="authors-code"``).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: α, the learning rate. For the paper's diminishing αₙ = α/√n use :func:`diminishing_lr`.
        betas: (β₁, β₂), the moments' smoothing constants.
        eps: ε, added to the denominator.
        weight_decay: L2 penalty λ; gₙ ← gₙ + λxₙ.
        gamma: γₙ ≥ 0, the scale of the current gradient: a number or a callable n ↦ γₙ. The paper's
            constant-rate experiments use γ = 1; its diminishing ones γₙ = 0.5ⁿ or 1/n.
        delta: δₙ ≥ 0, the weight of the previous direction: a number or a callable n ↦ δₙ (the paper uses
            δ ∈ {1e-1, 1e-2, 1e-3}, or δₙ = 0.5ⁿ or 1/n). The defaults γ = δ = 0.1 are the authors' code's.
        direction_form: ``"paper"`` (default; s = −1, the paper's Gₙ = (1 + γₙ)gₙ − δₙGₙ₋₁) or
            ``"authors-code"`` (s = +1, dₙ = −(1 + γₙ)gₙ + δₙdₙ₋₁, as the authors' public code, and this class
            before the option existed).

    State per parameter: ``step`` (n), ``direction`` (dₙ), ``exp_avg`` (mₙ), ``exp_avg_sq`` (vₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. ICLR. arXiv:1412.6980.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        _check_scaled_conjugate_rule(group)

    def _rules(self, group: dict[str, Any]) -> tuple[ScaledConjugateDirection, AdaptiveMoments]:
        return scaled_conjugate_rule(group), AdaptiveMoments(amsgrad=False, bias_correction=True)


class SCGAMSGrad(ConjugateAdaptiveOptimizer):
    r"""AMSGrad whose first moment averages the scaled conjugate-gradient direction (Sato, Izumi & Iiduka 2024).

    Elementwise, per parameter tensor, with gₙ the stochastic gradient (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)gₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ)
        xₙ₊₁ = xₙ + αₙ · mₙ / (√v̂ₙ + ε)                                    (bias_correction=False, default)
        xₙ₊₁ = xₙ + (αₙ/(1 − β₁ⁿ)) · mₙ / (√(v̂ₙ/(1 − β₂ⁿ)) + ε)             (bias_correction=True)

    The default is AMSGrad as Reddi et al. and the authors' code state it, without bias correction.
    ``torch.optim.Adam(amsgrad=True)`` corrects the bias (dividing the running maximum v̂ₙ by 1 − β₂ⁿ), so with
    γ = δ = 0 it equals ``SCGAMSGrad(bias_correction=True)`` bit for bit, and the default only in the limit n → ∞.

    ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay``, ``gamma``, ``delta`` and ``direction_form`` are as
    for :class:`SCGAdam`.

    Args:
        bias_correction: whether to divide by 1 − β₁ⁿ and 1 − β₂ⁿ as ``torch.optim.Adam(amsgrad=True)`` does.

    State per parameter: ``step``, ``direction``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (v̂ₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Reddi, S. J., Kale, S. & Kumar, S. (2018). On the convergence of Adam and beyond. ICLR.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        bias_correction: bool = False,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "bias_correction": bias_correction,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group)
        _check_scaled_conjugate_rule(group)
        check_flag(group, "bias_correction")

    def _rules(self, group: dict[str, Any]) -> tuple[ScaledConjugateDirection, AdaptiveMoments]:
        return scaled_conjugate_rule(group), AdaptiveMoments(amsgrad=True, bias_correction=group["bias_correction"])


class SCGRMSProp(ConjugateAdaptiveOptimizer):
    r"""RMSProp stepping along the scaled conjugate-gradient direction (built here from Sato, Izumi & Iiduka 2024).

    Elementwise, per parameter tensor, with gₙ the stochastic gradient (plus ``weight_decay``·x when set):

        d₁ = −g₁,    dₙ = −(1 + γₙ)gₙ + s·δₙdₙ₋₁    (s = −1: the paper's form, the default; s = +1: the authors' code)
        vₙ = ρvₙ₋₁ + (1 − ρ)gₙ²
        xₙ₊₁ = xₙ + αₙ · dₙ / (√vₙ + ε)

    The paper names SCGRMSProp, but neither our sources for it nor the authors' code we could read give its update
    (that code has only plain RMSProp). This is the same construction as :class:`SCGAdam` applied to RMSProp,
    which has no first moment (β₁ = 0) and no bias correction: the direction replaces −gₙ in
    the numerator, and the denominator stays on the raw gradient. With γ = δ = 0 it is
    ``torch.optim.RMSprop(alpha=ρ)`` (no momentum, not centered) bit for bit.

    ``params``, ``lr``, ``eps``, ``weight_decay``, ``gamma``, ``delta`` and ``direction_form`` are as for
    :class:`SCGAdam`.

    Args:
        alpha: ρ, the smoothing constant of vₙ, named and defaulted as in ``torch.optim.RMSprop``.

    State per parameter: ``step``, ``direction`` (dₙ), ``square_avg`` (vₙ).

    References:
        Sato, N., Izumi, K. & Iiduka, H. (2024). Scaled conjugate gradient method for nonconvex optimization in deep
        neural networks. JMLR 25(395), 1–37. arXiv:2412.11400.

        Tieleman, T. & Hinton, G. (2012). Lecture 6.5 — RMSProp. COURSERA: Neural Networks for Machine Learning.
    """

    _schedule_keys = ("gamma", "delta")
    _keys_added_later = {"direction_form": "authors-code"}

    def __init__(
        self,
        params: Params,
        lr: float = DEFAULT_LR,
        alpha: float = DEFAULT_RMSPROP_ALPHA,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.0,
        gamma: Schedule = DEFAULT_GAMMA,
        delta: Schedule = DEFAULT_DELTA,
        direction_form: str = DEFAULT_DIRECTION_FORM,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "delta": delta,
            "direction_form": direction_form,
        }
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group, "lr", "learning rate (lr)")
        check_smoothing(group, "alpha", "alpha (ρ)")
        check_nonnegative(group, "eps", "epsilon (eps)")
        check_nonnegative(group, "weight_decay", "weight_decay")
        _check_scaled_conjugate_rule(group)

    def _rules(self, group: dict[str, Any]) -> tuple[ScaledConjugateDirection, RMSPropMoments]:
        return scaled_conjugate_rule(group), RMSPropMoments()
