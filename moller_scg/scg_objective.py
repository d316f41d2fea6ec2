"""What an :class:`~moller_scg.SCG` step evaluates: the objective E made from the closure, and what it cost.

- :class:`_StepObjective` — the :class:`~moller_scg.objective.Objective` a step evaluates, made from what ``step``
  is given and kept while the same one comes, so that the graph of the accepted trial's evaluation serves the next
  step's product s = E''(w)p (step 2);
- :func:`evaluate` — E(w) and E'(w) by one evaluation (step 1, and step 2 with Møller's finite difference);
- :func:`evaluate_loss_first` — E(w) at step 6's trial point, and E'(w) there only when asked;
- :class:`EvaluationTally` — a step's evaluations as the objective counted them, added to SCG's totals
  ``closure_calls`` and ``hvp_calls``: the objective's :attr:`~moller_scg.objective.Objective.counts` are the only
  counters of evaluations; SCG counts none itself.

None outlives the optimizer object: a pickled, copied or loaded SCG makes its objective again at the next step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from moller_scg.objective import ClosureObjective, Objective, as_objective, is_plain_closure, same_tensors
from moller_scg.scg_state import SCGScalars, SCGTrace


class _StepObjective:
    """The objective of SCG's steps, with the closure and the ``hvp`` mode it was made for."""

    def __init__(self) -> None:
        self.closure: Any = None
        self.objective: Objective | None = None
        self.hvp_mode: str | None = None

    def objective_for(
        self, closure: Callable[[], Any] | Objective, params: list[torch.Tensor], hvp: str, sigma: float
    ) -> Objective:
        """The objective this step evaluates: what ``closure`` is, as :func:`~moller_scg.objective.as_objective` sees
        it; made when a new object comes, kept while the same one does.

        A plain closure is wrapped in SCG's own :class:`~moller_scg.objective.ClosureObjective`, and a new plain
        closure only replaces that wrapper's closure: PyTorch Lightning wraps its training step in a new closure at
        every step, and the graph of the accepted trial's evaluation, which the wrapper keeps, must still serve the
        next step's product E''(w)p.

        Args:
            hvp: SCG's ``hvp`` mode (the objective is asked for exact products in ``"double-backward"`` only).
            sigma: σ, the finite-difference scale, handed to the objective.
        """
        # The exact product, or gradients alone: SCG forms Møller's finite difference itself (also in "secant" mode,
        # before the first pair).
        hvp_mode = "double-backward" if hvp == "double-backward" else "finite-difference"
        objective = self.objective
        if objective is not None and self.hvp_mode == hvp_mode and same_tensors(objective.params, params):
            if closure is self.closure:
                return objective
            if type(objective) is ClosureObjective and objective.closure is self.closure and is_plain_closure(closure):
                objective.closure = closure  # SCG's own wrapper (never an objective the caller passed) goes on
                self.closure = closure
                return objective
        objective = as_objective(closure, params, hvp_mode, sigma)
        self.closure, self.objective, self.hvp_mode = closure, objective, hvp_mode
        return objective


def evaluate(objective: Objective) -> tuple[float, list[torch.Tensor]]:
    """E(w) and E'(w) at the weights the parameters hold, by one evaluation of the objective (one closure call,
    which the objective counts).

    The gradients are the objective's ``copy=False`` ones (the ``.grad`` tensors, a ``None`` one as zero): SCG
    is done with them before it evaluates again, and never writes into them.
    """
    with torch.enable_grad():
        loss, gradients = objective.value_and_grad(copy=False)
    return float(loss), gradients


def evaluate_loss_first(objective: Objective) -> tuple[float, Callable[[], list[torch.Tensor]]]:
    """E(w) at the weights the parameters hold, and a function that returns E'(w) there (step 6's trial point).

    An objective with ``value_then_grad()`` (:class:`~moller_scg.objective.AccumulatorObjective` over one batch,
    :class:`~moller_scg.objective.FunctionObjective`) forms the gradient only when the function is called, so a
    trial that its loss alone rejects costs a forward pass; any other objective is evaluated at once in full
    (:func:`evaluate`), and the function returns what that evaluation gave.
    """
    value_then_grad = getattr(objective, "value_then_grad", None)
    if value_then_grad is None:
        loss, gradients = evaluate(objective)
        return loss, lambda: gradients
    with torch.enable_grad():
        loss, gradient = value_then_grad()
    return float(loss), gradient


class EvaluationTally:
    """What one step cost, as its objective counted it: SCG's ``closure_calls`` and ``hvp_calls`` are sums of these.

    Made at the start of a step, it reads the objective's :attr:`~moller_scg.objective.Objective.counts`;
    :meth:`add_to` adds what they grew by since to SCG's totals (which ``state_dict`` saves, so they go on across a
    checkpoint and across a new closure, or a new objective, at every step):

    - ``closure_calls`` += Δnfev: every evaluation of E(w), whatever it was for — step 1, the trial point of
      step 6 (with its gradient, or without it when the trial's loss alone rejected it:
      :func:`evaluate_loss_first`), the gradient at w + σₖp of Møller's finite difference (step 2), or the
      evaluation an objective makes again to form E''(w)p when the graph of its last one is gone (after
      ``load_state_dict``);
    - ``hvp_calls`` += Δnhev + :attr:`finite_difference_products`: the products E''(w)p the objective formed, and
      Møller's s = (E'(w + σₖp) − E'(w))/σₖ that SCG formed itself in step 2 from the gradient at w + σₖp. That
      gradient is one ngev of the objective (so it is also a closure call) and one curvature evaluation of SCG's;
      the objective cannot tell it from any other gradient, so step 2 says it took that branch.

    Attributes:
        finite_difference_products: Møller's finite differences formed in this step (0 or 1).
    """

    def __init__(self, objective: Objective) -> None:
        self._objective = objective
        counts = objective.counts
        self._nfev_before, self._nhev_before = counts.nfev, counts.nhev
        self.finite_difference_products = 0

    def totals(self, scalars: SCGScalars) -> tuple[int, int]:
        """SCG's (``closure_calls``, ``hvp_calls``) with what this step counted so far; ``scalars`` stay as they are.
        The step's trace, made after its last evaluation, takes them from here."""
        counts = self._objective.counts
        return (
            scalars.closure_calls + counts.nfev - self._nfev_before,
            scalars.hvp_calls + counts.nhev - self._nhev_before + self.finite_difference_products,
        )

    def add_to(self, scalars: SCGScalars, trace: SCGTrace | None) -> SCGTrace | None:
        """Add this step's evaluations to the totals in ``scalars``; returns ``trace`` with those totals (``trace``
        itself when it has them already, as the trace a step made after its last evaluation does; a new one when
        the step raised before making its own)."""
        scalars.closure_calls, scalars.hvp_calls = self.totals(scalars)
        if trace is None or (trace.closure_calls == scalars.closure_calls and trace.hvp_calls == scalars.hvp_calls):
            return trace
        return dataclasses.replace(trace, closure_calls=scalars.closure_calls, hvp_calls=scalars.hvp_calls)
