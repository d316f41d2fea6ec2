"""Weight decay as part of the full-batch objective: E(w) = L(w) + (ν/2) |w|², ν = ``weight_decay``.

``torch.optim`` optimizers take ``weight_decay`` as a change to their update (g ← g + ν w). SCG cannot: its Δ test
compares the decrease of the loss the closure reports with the decrease its model predicts, so a term that enters
the gradient must enter the loss too. Here the penalty is a term of the objective itself, so that E, E' = L' + ν w
and E''v = L''v + ν v agree, whatever the optimizer and whichever Hessian-vector product is taken.

The accumulator adds the penalty to every batch's term in proportion to the batch's share of the full-batch
division, so that it is counted exactly once per pass whatever the batch size (:class:`WeightDecay`): a mean over
samples weights batch b by n_b / N, and the penalty enters each batch's mean whole; a class-weighted mean
(``nn.CrossEntropyLoss``, ``nn.NLLLoss``) divides the summed loss by the total weight D = Σ_b D_b, and batch b
carries D_b · P. A summed loss has no such division, and is refused.

Why the main job uses it: cross-entropy on data the network can separate has no finite minimiser, so a run that
drives the loss to zero ends wherever its path and the float rounding take it; with ν > 0 the objective has
minimisers at finite weights (``moller_scg.mnist``, :data:`~moller_scg.mnist.DEFAULT_WEIGHT_DECAY`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch


def validate_weight_decay(value: Any) -> float:
    """ν as a float: a real number, finite and ≥ 0.

    Raises:
        TypeError: not a real number (a bool is not one).
        ValueError: negative, infinite or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"weight_decay must be a real number ≥ 0, got {value!r:.80} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid weight_decay value: {value} (it must be finite and ≥ 0; 0 turns it off)")
    return float(value)


def squared_norm(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """|w|² = Σ_p Σ_i |p_i|², twice differentiable; a complex p counts its real and imaginary parts."""
    total = sum((torch.view_as_real(p) if p.is_complex() else p).square().sum() for p in weights)
    return torch.as_tensor(total)


class WeightDecay:
    """The penalty P(w) = (ν/2) |w|² over the accumulator's parameters w.

    Args:
        weight_decay: ν > 0.
        params: w, the parameters the accumulator differentiates.
    """

    def __init__(self, weight_decay: float, params: Sequence[torch.Tensor]) -> None:
        self.weight_decay = weight_decay
        self.params = params

    def penalty(self, weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """P at ``weights`` (default: the parameters themselves; ``torch.func`` passes its own copies of them)."""
        return 0.5 * self.weight_decay * squared_norm(self.params if weights is None else weights)

    def __repr__(self) -> str:
        return f"WeightDecay({self.weight_decay})"
