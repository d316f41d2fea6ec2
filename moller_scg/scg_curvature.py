"""Step 2 of Møller's SCG: the curvature δ = pᵀs along the search direction p, with s ≈ E''(w)p at the accepted w.

Two ways, by SCG's ``hvp`` mode:

- exact (``"double-backward"``): s = E''(w)p from the objective (:func:`_exact_curvature`), which takes it from the
  graph of its last evaluation when that was at w;
- Møller's finite difference (``"finite-difference"``, and ``"secant"`` before its first pair): σₖ = σ/|p| and
  s = (E'(w + σₖp) − E'(w))/σₖ, formed from the r = −E'(w) SCG holds, so only E'(w + σₖp) is evaluated.

:func:`curvature_along` picks one, and refuses a δ that is not finite. The products themselves are
:mod:`moller_scg.curvature`'s and :func:`moller_scg.step_arithmetic.finite_difference_from_residual`'s; this module
is where SCG asks for them. The objective counts the evaluations; SCG's
:class:`~moller_scg.scg_objective.EvaluationTally` is told when a finite difference was formed. Steps 3–9
(λ, μ, α, Δ) stay in :mod:`moller_scg.scg`.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moller_scg import _vectors as vec
from moller_scg import step_arithmetic
from moller_scg.objective import Objective
from moller_scg.scg_objective import EvaluationTally, evaluate


def curvature_along(
    direction: list[torch.Tensor],
    direction_sq: float,
    residual: list[torch.Tensor],
    objective: Objective,
    params: list[torch.Tensor],
    accepted: list[torch.Tensor],
    group: dict[str, Any],
    tally: EvaluationTally,
) -> float:
    """Step 2: δ = pᵀs with s ≈ E''(w)p at the accepted weights w.

    Møller's finite difference is formed here from r = −E'(w), which SCG holds (so it needs E' at w + σₖp
    only, also right after a ``load_state_dict``); the exact product is the objective's. s is needed for δ
    only: it is released when this returns, before the trial point is evaluated.

    Args:
        direction: p, one tensor per parameter; ``direction_sq``: |p|².
        residual: r = −E'(w), one tensor per parameter.
        params: the parameters, holding w (moved to w + σₖp and back, bit-exactly, for the finite difference).
        accepted: the copy of w taken before the iteration.
        group: SCG's hyperparameters (``hvp`` and σ, ``sigma``).
        tally: the step's :class:`~moller_scg.scg_objective.EvaluationTally`, told of a finite difference formed here
            (the objective counts the evaluations themselves).

    Raises:
        FloatingPointError: δ, or the gradient at w + σₖp, is not finite.
    """
    if group["hvp"] in ("finite-difference", "secant"):  # "secant" before its first pair: Møller's σ
        sigma_k = group["sigma"] / math.sqrt(direction_sq)
        vec.add_(params, direction, sigma_k)
        _, shifted_gradients = evaluate(objective)
        tally.finite_difference_products += 1
        vec.copy_(params, accepted)
        curvature = step_arithmetic.finite_difference_from_residual(shifted_gradients, residual, sigma_k)
        (delta,) = vec.dots([(direction, curvature)])
        # A non-finite E'(w + σₖp) makes s and then δ non-finite (0·inf is NaN too), so it is looked for only then.
        if not math.isfinite(delta) and not vec.all_finite(shifted_gradients):
            raise FloatingPointError(
                f"the gradient at w + σₖp (σₖ = {sigma_k:.3g}) for the finite-difference curvature is not finite: "
                f"lower sigma (now {group['sigma']!r}), or use hvp='double-backward' for exact curvature"
            )
    else:
        (delta,) = vec.dots([(direction, _exact_curvature(direction, objective))])
    if not math.isfinite(delta):
        raise FloatingPointError(
            f"the curvature δ = pᵀs along the search direction is not finite ({delta}): the second "
            f"derivatives overflow at the accepted weights. Check the model for operations that overflow "
            f"(exp, log near 0, division), or train in float64"
        )
    return delta


def _exact_curvature(direction: list[torch.Tensor], objective: Objective) -> list[torch.Tensor]:
    """s = E''(w)p at the accepted weights w, from the objective (one nhev of its counts).

    The objective takes it from the graph of its last evaluation when that was at w (the accepted trial's, or
    step 1's), and evaluates once more otherwise (after a ``load_state_dict`` or a copy): such an evaluation is
    one more ngev of its counts, so a closure call of SCG's.
    """
    with torch.enable_grad():
        return objective.hvp(direction)
