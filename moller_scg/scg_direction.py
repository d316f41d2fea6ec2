"""Step 7 of Møller's SCG after an accepted trial: the next search direction p₊, in p's storage.

Three rules, by the iteration count and SCG's ``memory``:

- a restart, every N iterations (:func:`restart_period`): p₊ = r₊, the steepest descent (and the secant pairs are
  forgotten);
- with memory m ≥ 1, the quasi-Newton direction p₊ = H r₊ from the last m secant pairs, this step's pair
  (s, y) = (αp, r − r₊) kept first (:meth:`moller_scg.scg_storage._StateVectors.quasi_newton_direction`);
- otherwise Møller's conjugate direction p₊ = r₊ + βp with β = (|r₊|² − r₊ᵀr)/μ (Polak–Ribière's form with μ = pᵀr
  in place of |r|², as in the paper).

:class:`moller_scg.SCG` calls :func:`next_direction` in step 7; λ, λ̄ and the acceptance test stay there.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
"""

from __future__ import annotations

import torch

from moller_scg import _vectors as vec
from moller_scg.quasi_newton import SecantPairs
from moller_scg.scg_storage import _StateVectors
from moller_scg.scg_trial import Trial


def restart_period(restart: int | None, params: list[torch.Tensor], storage: _StateVectors) -> int:
    """N: the user's restart period ``restart``, or the number of real scalars in w (the paper's default): the length
    of the storage's flat buffers when it has them (counted once, not at every step), else counted here."""
    if restart is not None:
        return restart
    if storage.flat is not None:
        return storage.flat.layout.size
    return sum(vec.as_real(p).numel() for p in params)


def next_direction(
    direction: list[torch.Tensor],
    residual: list[torch.Tensor],
    trial: Trial,
    restart: bool,
    secant_pairs: SecantPairs | None,
    storage: _StateVectors,
    alpha: float,
    mu: float,
) -> tuple[float, float]:
    """p₊ written over p (step 7, after a success), and (|p₊|², p₊ᵀr₊): the next trace's |p|² and the next μ.

    Args:
        direction: p, in its storage (as :meth:`~moller_scg.scg_storage._StateVectors.residual_and_direction` hands
            it out); overwritten with p₊.
        residual: r, the residual of the accepted weights before the step.
        trial: step 6's :class:`~moller_scg.scg_trial.Trial`, with r₊ = −E'(w + αp), |r₊|² and r₊ᵀr.
        restart: whether this iteration restarts (k mod N = 0): p₊ = r₊.
        secant_pairs: the quasi-Newton memory (m ≥ 1), or ``None`` for Møller's conjugate direction.
        storage: where r and p live, which forms H r₊ in p's storage.
        alpha: α, the accepted step length (s = αp); ``mu``: μ = pᵀr.
    """
    new_residual, new_residual_sq = trial.accepted_residual(), trial.new_residual_sq
    if restart:
        vec.copy_(direction, new_residual)  # p ← r₊
        if secant_pairs is not None:
            secant_pairs.clear()
            storage.observe_gradient(secant_pairs, new_residual)  # the gradients' second moment outlives the pairs
        return new_residual_sq, new_residual_sq
    if secant_pairs is not None:
        # p ← H r₊, with the pair (s, y) = (αp, r − r₊) of this step kept
        return storage.quasi_newton_direction(secant_pairs, direction, alpha, residual, new_residual)
    beta = (new_residual_sq - trial.new_dot_old) / mu
    vec.scale_add_(direction, beta, new_residual)  # p ← r₊ + βp
    # |p₊|² for the trace, and p₊ᵀr₊, the next iteration's μ (step 5), together.
    new_direction_sq, new_mu = vec.dots([(direction, direction), (direction, new_residual)])
    return new_direction_sq, new_mu
