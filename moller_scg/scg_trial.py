"""Step 6 of Møller's SCG: the trial point w + αp and the comparison ratio Δ measured there.

One evaluation of the objective at w + αp gives E(w + αp) and r₊ = −E'(w + αp); with them,

    Δ = 2δ(E(w) − E(w + αp)) / μ²,

the ratio of the loss decrease to the decrease the scaled quadratic model predicts (μ²/2δ). The decrease is
:func:`moller_scg.step_arithmetic.loss_decrease`'s (measured, or from the slopes when rounding drowns it). A trial
whose loss or gradient is not finite has Δ = NaN: SCG rejects it (step 7) and raises λ as for a poor model (step 8).

Step 7 accepts the trial when Δ ≥ 0, so a loss above E(w) (or not finite) rejects it whatever r₊ is. The loss is
therefore asked for first (:func:`~moller_scg.scg_objective.evaluate_loss_first`), and r₊ only when it could be
accepted: with an objective that can defer its backward pass (a :class:`~moller_scg.GradientAccumulator` over one
batch, :func:`moller_scg.minimize`'s function), a rejected trial costs a forward pass, and SCG takes the same steps
as with the gradient formed. (One difference: a trial whose loss rose but whose gradient would not have been
finite counts as a poor step, Δ < 0, instead of a non-finite one.)

:class:`moller_scg.SCG` calls :func:`trial_at` in step 6 and leaves the parameters at w + αp; accepting or rejecting
the trial stays in step 7.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moller_scg import _vectors as vec
from moller_scg import step_arithmetic
from moller_scg.objective import Objective
from moller_scg.quasi_newton import SecantPairs
from moller_scg.scg_objective import evaluate_loss_first
from moller_scg.scg_storage import _StateVectors


class Trial(NamedTuple):
    """What step 6 measured at the trial point w + αp.

    A trial rejected on its loss alone (:func:`rejected_by_loss`) carries no r₊: ``new_residual`` is ``None`` and
    its products NaN.

    Attributes:
        loss: E(w + αp).
        new_residual: r₊ = −E'(w + αp), in the storage's layout (:meth:`_StateVectors.negated`), or ``None``.
        new_residual_sq: |r₊|².
        new_dot_old: r₊ᵀr, for β of Møller's next direction (step 7).
        finite: whether E(w + αp) and r₊ are finite (E alone, when r₊ was not formed).
        comparison: Δ = 2δ(E(w) − E(w + αp)) / μ², NaN when the trial is not finite.
    """

    loss: float
    new_residual: list[torch.Tensor] | None
    new_residual_sq: float
    new_dot_old: float
    finite: bool
    comparison: float

    def accepted_residual(self) -> list[torch.Tensor]:
        """r₊ of a trial step 7 accepts (Δ ≥ 0): every such trial has it; only one rejected on its loss has none."""
        if self.new_residual is None:
            raise RuntimeError("a trial rejected on its loss alone has no r₊: step 7 cannot accept it")
        return self.new_residual


def rejected_by_loss(loss: float, trial_loss: float) -> bool:
    """Whether E(w + αp) alone settles step 7: a loss that is not finite, or one above E(w) (a measured increase,
    which :func:`~moller_scg.step_arithmetic.loss_decrease` always uses as it is, gives Δ < 0)."""
    return not trial_loss <= loss


def trial_at(
    objective: Objective,
    params: list[torch.Tensor],
    storage: _StateVectors,
    direction: list[torch.Tensor],
    residual: list[torch.Tensor],
    alpha: float,
    mu: float,
    delta: float,
    loss: float,
    residual_sq: float,
    secant_pairs: SecantPairs | None = None,
) -> Trial:
    """Move the parameters from w to w + αp, evaluate the objective there once, and form Δ.

    Args:
        params: hold w; they hold w + αp when this returns (or raises: SCG puts w back).
        storage: where r and p live; ``direction``: p, ``residual``: r, as it hands them out.
        alpha: α (step 5); ``mu``: μ = pᵀr; ``delta``: δ, scaled (steps 3–4).
        loss: E(w); ``residual_sq``: |r|².
        secant_pairs: SCG's pairs (m ≥ 1), whose products for step 7 the storage may form with the trial's
            (:meth:`_StateVectors.trial_products`), or ``None``.
    """
    vec.add_(params, storage.per_parameter(direction), alpha)
    trial_loss, trial_gradient = evaluate_loss_first(objective)
    if rejected_by_loss(loss, trial_loss):
        # Δ < 0 (or NaN) whatever r₊ is: step 7 rejects the trial without its gradient, which is never formed.
        if not math.isfinite(trial_loss):
            return Trial(trial_loss, None, math.nan, math.nan, False, math.nan)
        return Trial(trial_loss, None, math.nan, math.nan, True, comparison_ratio(delta, loss - trial_loss, mu))
    new_residual = storage.negated(trial_gradient())
    new_residual_sq, new_dot_old, new_dot_direction = storage.trial_products(
        new_residual, residual, direction, secant_pairs
    )
    finite = math.isfinite(trial_loss) and step_arithmetic.all_finite_given_squared_norm(new_residual, new_residual_sq)
    if not finite:
        return Trial(trial_loss, new_residual, new_residual_sq, new_dot_old, False, math.nan)
    unchanged = trial_loss == loss and new_residual_sq == new_dot_old == residual_sq
    decrease = step_arithmetic.loss_decrease(
        loss, trial_loss, alpha, mu, new_dot_direction, step_arithmetic.loss_epsilon(params), unchanged=unchanged
    )
    return Trial(trial_loss, new_residual, new_residual_sq, new_dot_old, True, comparison_ratio(delta, decrease, mu))


def comparison_ratio(delta: float, decrease: float, mu: float) -> float:
    """Δ = 2δ(E(w) − E(w + αp)) / μ², given the decrease E(w) − E(w + αp)."""
    return 2.0 * delta * decrease / mu**2
