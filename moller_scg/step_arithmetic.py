"""The arithmetic of an SCG iteration that needs no optimizer state: numbers in, numbers out.

LBFGS's first step length α₀ of the secant mode, δ scaled by λ and made positive (steps 3–4), the loss decrease
E(w) − E(w + αp) of step 6 (measured, or estimated from the slopes when rounding drowns it), Møller's
finite-difference quotient s of step 2, and the finiteness checks and their errors. :class:`moller_scg.SCG` calls
them; each is tested on its own in ``tests/test_scg.py``.
"""

from __future__ import annotations

import functools
import math

import torch

from moller_scg import _vectors as vec

UNRESOLVED_DECREASE_ULPS = 4
"""Loss decreases E(w) − E(w + αp) from 0 up to this many units in the last place of E(w) (in the parameters' dtype)
are rounding noise rather than a measurement: step 6 then estimates the decrease from the slopes at both ends
(:func:`loss_decrease`)."""


def first_step_length(l1: float) -> float | None:
    """α₀ = min(1, 1/|r₁|₁), LBFGS's first step length along p₁ = r₁, for the secant mode's very first step.

    Before any secant pair exists the quasi-Newton model has no curvature to give. Møller's finite difference costs a
    pass; δ = μ/α₀ instead makes the first trial LBFGS's first step (not in the paper). Measured in
    ``benchmarks/levers.py --table passes``: fewer passes to the first target on every problem, none more later. Only
    the first step of a run takes it: after a restart or when the pairs were dropped the finite difference stays
    (on the physics-informed problem, whose loss is concave along −E' at the start, repeating α₀ cost passes).
    ``None`` when |r₁|₁ (``l1``) is not a positive finite number (then the finite difference is taken).
    """
    return min(1.0, 1.0 / l1) if 0.0 < l1 < math.inf else None


def scaled_curvature(delta: float, lambd: float, lambd_bar: float, direction_sq: float) -> tuple[float, float, float]:
    """Steps 3 and 4: δ scaled by λ, then made positive, as (δ, λ, λ̄).

    Step 3: δ ← δ + (λ − λ̄)|p|². Step 4, if δ ≤ 0 (the scaled Hessian is not positive definite along p):
    λ̄ = 2(λ − δ/|p|²), δ ← −δ + λ|p|², λ ← λ̄. ``direction_sq`` is |p|² > 0.
    """
    delta += (lambd - lambd_bar) * direction_sq
    if delta <= 0.0:
        lambd_bar = 2.0 * (lambd - delta / direction_sq)
        delta = -delta + lambd * direction_sq
        lambd = lambd_bar
    return delta, lambd, lambd_bar


def loss_epsilon(params: list[torch.Tensor]) -> float:
    """The machine epsilon of the loss: that of the parameters' dtype (the coarsest, if they differ)."""
    return max(_machine_epsilon(p.dtype) for p in params)


@functools.cache
def _machine_epsilon(dtype: torch.dtype) -> float:
    """ε of a dtype, kept: ``torch.finfo`` took 5 µs a parameter at every step."""
    return torch.finfo(dtype).eps


def loss_decrease(
    loss: float,
    trial_loss: float,
    alpha: float,
    mu: float,
    trial_residual_dot_direction: float,
    epsilon: float,
    *,
    unchanged: bool,
) -> float:
    """E(w) − E(w + αp) for step 6's Δ: measured, or estimated from the slopes when rounding drowns the measurement.

    When 0 ≤ E(w) − E(w + αp) ≤ ``UNRESOLVED_DECREASE_ULPS`` · ε · |E(w)| (ε of the loss's dtype), the difference
    of the two losses is rounding noise, and Δ formed from it sends λ up for nothing (Δ ≈ 0 < 0.25). The
    directional derivatives at both ends are still resolved: E'(w)ᵀp = −μ and E'(w + αp)ᵀp = −r₊ᵀp, and the
    trapezoid rule gives

        E(w) − E(w + αp) ≈ −α(E'(w)ᵀp + E'(w + αp)ᵀp)/2 = α(μ + r₊ᵀp)/2,

    exact on a quadratic. Where the difference is resolved, Møller's measured value is used unchanged; so is a measured
    increase, however small, so that an accepted step never raises the loss the closure reports. A trial that
    reproduced E(w) and E'(w) exactly (``unchanged``: αp is below the weights' resolution) carries no slope either;
    its measured difference, 0, stands.
    """
    measured = loss - trial_loss
    if unchanged or not (0.0 <= measured <= UNRESOLVED_DECREASE_ULPS * epsilon * abs(loss)):
        return measured
    return alpha * (mu + trial_residual_dot_direction) / 2.0


def finite_difference_from_residual(
    shifted_gradients: list[torch.Tensor], residual: list[torch.Tensor], sigma_k: float
) -> list[torch.Tensor]:
    """Møller's s = (E'(w + σₖp) − E'(w))/σₖ from r = −E'(w), formed as (E'(w + σₖp) + r)/σₖ.

    Bit for bit :func:`~moller_scg.curvature.finite_difference_hvp` of E'(w + σₖp) and −r: a − (−b) and a + b are
    the same IEEE operation. It spares the parameter-sized copy −r, and the quotient is taken in place of the sum.
    """
    return [torch.add(shifted, r).div_(sigma_k) for shifted, r in zip(shifted_gradients, residual)]


def all_finite_given_squared_norm(xs: list[torch.Tensor], squared_norm: float) -> bool:
    """Whether every element of x is finite, given |x|² (summed in float64 from x·x in x's dtype).

    A non-finite element makes |x|² inf or NaN, so a finite |x|² settles it without another reduction. A non-finite
    |x|² may also be an overflow of finite elements (in float16 beyond |x| = 256): only then are they checked.
    """
    return math.isfinite(squared_norm) or vec.all_finite(xs)


def require_finite_loss(loss: float, where: str) -> None:
    """Raise ``FloatingPointError`` if the loss is not finite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the loss {where} is not finite ({loss}): check the data and the weights for NaN or inf, and the loss "
            f"for operations that overflow there (torch.autograd.set_detect_anomaly(True) names the operation)"
        )


def require_finite_gradient(gradients: list[torch.Tensor], where: str, squared_norm: float) -> None:
    """Raise ``FloatingPointError`` if an element of the gradient is not finite (read only when |E'|², given as
    ``squared_norm``, is not finite: :func:`all_finite_given_squared_norm`)."""
    if not all_finite_given_squared_norm(gradients, squared_norm):
        raise FloatingPointError(
            f"the gradient {where} is not finite although the loss is: look for an operation whose derivative is "
            f"infinite there (sqrt or abs at 0, log near 0); torch.autograd.set_detect_anomaly(True) names it"
        )


def non_finite_trials_error(trials: int, trial_loss: float) -> FloatingPointError:
    """The error for ``trials`` non-finite trial points in a row (the last one's loss ``trial_loss``)."""
    return FloatingPointError(
        f"the loss or gradient at the trial point was not finite {trials} times in a row "
        f"(last trial loss: {trial_loss}), although each trial step was 4× shorter than the one before; "
        f"the weights were kept at the last accepted point. The loss is probably not finite arbitrarily "
        f"close to these weights: look for NaN in the data or an operation that fails there (log of 0, sqrt "
        f"of a negative number); torch.autograd.set_detect_anomaly(True) names the operation"
    )
