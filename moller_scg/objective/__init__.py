"""The objective E(w) an optimizer minimizes: its value, gradient and Hessian-vector products, and their counts.

- :class:`Objective` — the protocol: :meth:`~Objective.value_and_grad`, :meth:`~Objective.hvp`,
  :meth:`~Objective.loss`, :attr:`~Objective.counts` (:class:`EvaluationCounts`), :attr:`~Objective.params`,
  ``state_dict``/``load_state_dict``.
- :class:`ClosureObjective` — a ``torch.optim`` closure (``loss.backward(create_graph=True)`` for exact curvature).
- :class:`AccumulatorObjective` — a :class:`~moller_scg.GradientAccumulator`: the exact full-batch loss, streamed.
- :class:`FunctionObjective` — ``fun(x)`` of a tensor or of a pytree of tensors (what :func:`moller_scg.minimize`
  uses).
- :func:`as_objective` — whichever of these fits what an optimizer was given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moller_scg.accumulate import GradientAccumulator
from moller_scg.objective.accumulator import AccumulatorObjective
from moller_scg.objective.closure import ClosureObjective
from moller_scg.objective.function import FunctionObjective
from moller_scg.objective.protocol import (
    DEFAULT_SIGMA,
    HVP_MODES,
    EvaluationCounts,
    Objective,
    same_tensors,
    validate_params,
)

__all__ = [
    "Objective",
    "EvaluationCounts",
    "ClosureObjective",
    "AccumulatorObjective",
    "FunctionObjective",
    "as_objective",
    "HVP_MODES",
    "DEFAULT_SIGMA",
]


def as_objective(
    closure_or_objective: Any,
    params: Iterable[torch.Tensor],
    hvp_mode: str = "double-backward",
    sigma: float = DEFAULT_SIGMA,
) -> Objective:
    """The :class:`Objective` for what an optimizer's ``step`` was given, over the optimizer's parameters.

    Args:
        closure_or_objective: an :class:`Objective` (returned as it is), a :class:`~moller_scg.GradientAccumulator`
            (wrapped in an :class:`AccumulatorObjective`) or a closure (wrapped in a :class:`ClosureObjective`).
        params: w, the optimizer's parameters; an objective or accumulator must differentiate with respect to the
            very same tensors, in the same order.
        hvp_mode: ``"double-backward"`` or ``"finite-difference"``, for the wrappers made here.
        sigma: σ of the finite difference, for the wrappers made here.

    Raises:
        TypeError: ``closure_or_objective`` is none of these.
        ValueError: its parameters are not ``params`` (other tensors, or another order).
    """
    params = validate_params(params)
    if isinstance(closure_or_objective, Objective):
        objective = closure_or_objective
    elif isinstance(closure_or_objective, GradientAccumulator):
        objective = AccumulatorObjective(closure_or_objective, hvp_mode, sigma)
    elif callable(closure_or_objective):
        return ClosureObjective(closure_or_objective, params, hvp_mode, sigma)
    else:
        raise TypeError(
            f"expected a closure, a GradientAccumulator or an Objective, got {type(closure_or_objective).__name__}"
        )
    if not same_tensors(objective.params, params):
        raise ValueError(
            f"the {type(closure_or_objective).__name__} differentiates other tensors, or in another order, than the "
            f"optimizer's {len(params)} parameters: build it with params= the same list as the optimizer's"
        )
    return objective
