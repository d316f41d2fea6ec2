"""The objective E(w) an optimizer minimizes: its value, gradient and Hessian-vector products, and their counts.

- :class:`Objective` — the protocol: :meth:`~Objective.value_and_grad`, :meth:`~Objective.hvp`,
  :meth:`~Objective.loss`, :attr:`~Objective.counts` (:class:`EvaluationCounts`), :attr:`~Objective.params`,
  ``state_dict``/``load_state_dict``.
- :class:`ClosureObjective` — a ``torch.optim`` closure (``loss.backward(create_graph=True)`` for exact curvature).
- :class:`AccumulatorObjective` — a :class:`~moller_scg.GradientAccumulator`: the exact full-batch loss, streamed.
- :class:`FunctionObjective` — ``fun(x)`` of a tensor or of a pytree of tensors (what :func:`moller_scg.minimize`
  uses).
- :class:`ClosureWithHvpObjective` — a closure with its own ``hvp(vectors)`` method (what SCG has always asked for
  the product).
- :func:`as_objective` — whichever of these fits what an optimizer was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

import torch

from moller_scg.accumulate import GradientAccumulator
from moller_scg.objective.accumulator import AccumulatorObjective
from moller_scg.objective.closure import ClosureObjective, ClosureWithHvpObjective
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
    "ClosureWithHvpObjective",
    "as_objective",
    "is_plain_closure",
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
            (wrapped in an :class:`AccumulatorObjective`), a closure with an ``hvp(vectors)`` method (wrapped in a
            :class:`ClosureWithHvpObjective`) or a plain closure (wrapped in a :class:`ClosureObjective`).
        params: w, the optimizer's parameters; an objective, accumulator or closure with ``params`` must
            differentiate with respect to the very same tensors, in the same order.
        hvp_mode: ``"double-backward"`` or ``"finite-difference"``, for the accumulator and plain-closure wrappers.
        sigma: σ of the finite difference, for the accumulator and plain-closure wrappers.

    Raises:
        TypeError: ``closure_or_objective`` is none of these.
        ValueError: its parameters are not ``params`` (other tensors, or another order).
    """
    params = validate_params(params)
    # A plain closure first, and cheaply: without an hvp method it is neither an Objective nor an accumulator (the
    # runtime Protocol check costs some 10 µs, which an optimizer given a new closure at every step would pay).
    if is_plain_closure(closure_or_objective):
        return ClosureObjective(closure_or_objective, params, hvp_mode, sigma)
    objective: Objective
    differentiated: Sequence[torch.Tensor] | None
    if _is_objective(closure_or_objective):
        objective = closure_or_objective
        differentiated = objective.params
    elif isinstance(closure_or_objective, GradientAccumulator):
        objective = AccumulatorObjective(closure_or_objective, hvp_mode, sigma)
        differentiated = objective.params
    elif callable(closure_or_objective):
        objective = ClosureWithHvpObjective(closure_or_objective, params)
        differentiated = getattr(closure_or_objective, "params", None)  # checked when the closure names them
    else:
        raise TypeError(
            f"expected a closure, a GradientAccumulator or an Objective, got {type(closure_or_objective).__name__}"
        )
    if differentiated is not None and not same_tensors(list(differentiated), params):
        raise ValueError(
            f"the {type(closure_or_objective).__name__} differentiates other tensors, or in another order, than the "
            f"optimizer's {len(params)} parameters: build it with params= the same list as the optimizer's"
        )
    return objective


_LIBRARY_OBJECTIVES = (ClosureObjective, AccumulatorObjective)
"""The library's own objective classes (FunctionObjective and ClosureWithHvpObjective derive from ClosureObjective):
each is an :class:`Objective` by construction."""


def _is_objective(candidate: Any) -> bool:
    """Whether ``candidate`` is an :class:`Objective`, as ``isinstance(candidate, Objective)`` says of any object that
    does not set a protocol member to ``None``, without paying the runtime Protocol check where the answer is known:
    it cost 24–33 µs of SCG's first step, cold (Python 3.11), and
    :func:`moller_scg.minimize`, ``fit`` and the benchmarks hand SCG the library's objectives. An instance of one of
    them is one; an object without ``value_and_grad`` (a :class:`~moller_scg.GradientAccumulator`, a closure) is
    not, since the Protocol check requires that method; anything else is asked."""
    if isinstance(candidate, _LIBRARY_OBJECTIVES):
        return True
    if getattr(candidate, "value_and_grad", None) is None:
        return False
    return isinstance(candidate, Objective)


def is_plain_closure(closure_or_objective: Any) -> TypeGuard[Callable[[], Any]]:
    """Whether :func:`as_objective` wraps this in a plain :class:`ClosureObjective`: a callable without an
    ``hvp(vectors)`` method (every :class:`Objective` and :class:`~moller_scg.GradientAccumulator` has one)."""
    return callable(closure_or_objective) and not callable(getattr(closure_or_objective, "hvp", None))
