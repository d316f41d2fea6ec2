"""Møller's finite-difference Hessian-vector product, s ≈ (E'(w + σₖv) − E'(w))/σₖ, for any objective.

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533 (step 2, σₖ = σ/|p|).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from moller_scg import _vectors as vec
from moller_scg.curvature import finite_difference_hvp


def shifted_gradient_product(
    params: Sequence[torch.Tensor],
    gradient_at_w: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    gradient_at_current_values: Callable[[], list[torch.Tensor]],
    sigma: float,
) -> list[torch.Tensor]:
    """s ≈ (E'(w + σₖv) − E'(w))/σₖ with σₖ = σ/|v|: one gradient evaluation at w + σₖv.

    Args:
        params: w, moved to w + σₖv for the evaluation and then copied back bit for bit (also when it raises).
        gradient_at_w: E'(w).
        vectors: v, one tensor per parameter.
        gradient_at_current_values: evaluates E' at the values the parameters hold.
        sigma: σ; σₖ = σ/|v| keeps the shift σ long whatever |v| is (Møller 1993, step 2).

    Returns:
        s, one tensor per parameter (zeros when v = 0).
    """
    v_norm = math.sqrt(vec.squared_norm(vectors))
    if v_norm == 0.0:
        return [torch.zeros_like(p) for p in params]
    sigma_k = sigma / v_norm
    weights = vec.clone(params)
    try:
        with torch.no_grad():
            vec.add_(params, vectors, sigma_k)
        shifted = gradient_at_current_values()
    finally:
        with torch.no_grad():
            vec.copy_(params, weights)
    return finite_difference_hvp(shifted, gradient_at_w, sigma_k)
