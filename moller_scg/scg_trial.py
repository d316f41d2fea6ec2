"""Step 6 of Møller's SCG: the trial point w + αp and the comparison ratio Δ measured there.

One evaluation of the objective at w + αp gives E(w + αp) and r₊ = −E'(w + αp); with them,

    Δ = 2δ(E(w) − E(w + αp)) / μ²,

the ratio of the loss decrease to the decrease the scaled quadratic model predicts (μ²/2δ). The decrease is
:func:`moller_scg.step_arithmetic.loss_decrease`'s (measured, or from the slopes when rounding drowns it). A trial
whose loss or gradient is not finite has Δ = NaN: SCG rejects it (step 7) and raises λ as for a poor model (step 8).

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
from moller_scg.scg_objective import evaluate
from moller_scg.scg_storage import _StateVectors


class Trial(NamedTuple):
    """What step 6 measured at the trial point w + αp.

    Attributes:
        loss: E(w + αp).
        new_residual: r₊ = −E'(w + αp), in the storage's layout (:meth:`_StateVectors.negated`).
        new_residual_sq: |r₊|².
        new_dot_old: r₊ᵀr, for β of Møller's next direction (step 7).
        finite: whether E(w + αp) and r₊ are finite.
        comparison: Δ = 2δ(E(w) − E(w + αp)) / μ², NaN when the trial is not finite.
    """

    loss: float
    new_residual: list[torch.Tensor]
    new_residual_sq: float
    new_dot_old: float
    finite: bool
    comparison: float


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
) -> Trial:
    """Move the parameters from w to w + αp, evaluate the objective there once, and form Δ.

    Args:
        params: hold w; they hold w + αp when this returns (or raises: SCG puts w back).
        storage: where r and p live; ``direction``: p, ``residual``: r, as it hands them out.
        alpha: α (step 5); ``mu``: μ = pᵀr; ``delta``: δ, scaled (steps 3–4).
        loss: E(w); ``residual_sq``: |r|².
    """
    vec.add_(params, storage.per_parameter(direction), alpha)
    trial_loss, trial_gradients = evaluate(objective)
    new_residual = storage.negated(trial_gradients)
    new_residual_sq, new_dot_old, new_dot_direction = vec.dots(
        [(new_residual, new_residual), (new_residual, residual), (new_residual, direction)]
    )
    finite = math.isfinite(trial_loss) and step_arithmetic.all_finite_given_squared_norm(new_residual, new_residual_sq)
    if not finite:
        return Trial(trial_loss, new_residual, new_residual_sq, new_dot_old, False, math.nan)
    unchanged = trial_loss == loss and new_residual_sq == new_dot_old == residual_sq
    decrease = step_arithmetic.loss_decrease(
        loss, trial_loss, alpha, mu, new_dot_direction, step_arithmetic.loss_epsilon(params), unchanged=unchanged
    )
    return Trial(trial_loss, new_residual, new_residual_sq, new_dot_old, True, 2.0 * delta * decrease / mu**2)
