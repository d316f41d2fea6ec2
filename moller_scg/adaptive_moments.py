"""Moment rules of the conjugate-gradient variants: Adam, AMSGrad and RMSProp stepping along a direction dₙ.

Each rule is the method it is named after with dₙ in place of the negative gradient −gₙ in the numerator, and the
second moment on gₙ² (or, for CoBA's ``second_moment="direction"``, on dₙ²). With dₙ = −gₙ each is the
``torch.optim`` optimizer bit for bit: the operations are torch's (``lerp_``, ``mul_``/``addcmul_``, ``sqrt``,
``addcdiv_``), each of which commutes exactly with negation.

References:
    Kingma, D. P. & Ba, J. (2015). Adam: a method for stochastic optimization. ICLR. arXiv:1412.6980.

    Reddi, S. J., Kale, S. & Kumar, S. (2018). On the convergence of Adam and beyond. ICLR. (AMSGrad)

    Tieleman, T. & Hinton, G. (2012). Lecture 6.5 — RMSProp. COURSERA: Neural Networks for Machine Learning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

__all__ = ["AdamState", "AMSGradState", "RMSPropState", "AdaptiveMoments", "RMSPropMoments", "adaptive_moment_step"]


class AdamState(NamedTuple):
    exp_avg: torch.Tensor
    """mₙ, the first moment (of dₙ)"""
    exp_avg_sq: torch.Tensor
    """vₙ, the second moment (of gₙ², or dₙ²)"""


class AMSGradState(NamedTuple):
    exp_avg: torch.Tensor
    """mₙ"""
    exp_avg_sq: torch.Tensor
    """vₙ"""
    max_exp_avg_sq: torch.Tensor
    """v̂ₙ = max(v̂ₙ₋₁, vₙ)"""


class RMSPropState(NamedTuple):
    square_avg: torch.Tensor
    """vₙ, the moving average of gₙ²"""


@dataclasses.dataclass(frozen=True)
class AdaptiveMoments:
    """Adam (``amsgrad=False``) or AMSGrad (``amsgrad=True``) moments of a direction d, and the step:

        mₙ = β₁mₙ₋₁ + (1 − β₁)dₙ,    vₙ = β₂vₙ₋₁ + (1 − β₂)uₙ²,    v̂ₙ = max(v̂ₙ₋₁, vₙ) (AMSGrad, else v̂ₙ = vₙ),
        x ← x + (α/(1 − β₁ⁿ)) mₙ / (√(v̂ₙ/(1 − β₂ⁿ)) + ε)    with bias correction,
        x ← x + α mₙ / (√v̂ₙ + ε)                            without,

    with uₙ = gₙ, or uₙ = dₙ when ``of_direction``. α, (β₁, β₂) and ε are the group's ``lr``, ``betas``, ``eps``.
    """

    amsgrad: bool
    bias_correction: bool
    of_direction: bool = False

    @property
    def State(self) -> type[AdamState] | type[AMSGradState]:  # noqa: N802 - a type, named as one
        return AMSGradState if self.amsgrad else AdamState

    def step(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        grad: torch.Tensor,
        state: Any,
        n: int,
        group: dict[str, Any],
    ) -> None:
        squared = direction if self.of_direction else grad
        adaptive_moment_step(
            param, direction, squared, state, n, group, amsgrad=self.amsgrad, bias_correction=self.bias_correction
        )


def adaptive_moment_step(
    param: torch.Tensor,
    direction: torch.Tensor,
    grad: torch.Tensor,
    state: Any,
    n: int,
    group: dict[str, Any],
    *,
    amsgrad: bool,
    bias_correction: bool,
) -> None:
    """The step of :class:`AdaptiveMoments`, with ``grad`` the vector whose square vₙ averages; ``state`` is an
    :class:`AdamState` or (AMSGrad) an :class:`AMSGradState`."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state.exp_avg, state.exp_avg_sq
    exp_avg.lerp_(direction, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second_moment = exp_avg_sq
    if amsgrad:
        second_moment = torch.maximum(state.max_exp_avg_sq, exp_avg_sq, out=state.max_exp_avg_sq)
    if bias_correction:
        step_size = group["lr"] / (1.0 - beta1**n)
        denominator = (second_moment.sqrt() / (1.0 - beta2**n) ** 0.5).add_(group["eps"])
    else:
        step_size = group["lr"]
        denominator = second_moment.sqrt().add_(group["eps"])
    param.addcdiv_(exp_avg, denominator, value=step_size)


@dataclasses.dataclass(frozen=True)
class RMSPropMoments:
    """RMSProp along a direction d (no first moment, no bias correction):

        vₙ = ρvₙ₋₁ + (1 − ρ)gₙ²,    x ← x + α dₙ / (√vₙ + ε),

    with ρ, α, ε the group's ``alpha``, ``lr``, ``eps`` (``torch.optim.RMSprop``'s names; no momentum, not centered).
    """

    State = RMSPropState

    def step(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        grad: torch.Tensor,
        state: Any,
        n: int,
        group: dict[str, Any],
    ) -> None:
        alpha = group["alpha"]
        square_avg = state.square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
        param.addcdiv_(direction, square_avg.sqrt().add_(group["eps"]), value=group["lr"])
