"""What an :class:`~moller_scg.SCG` step evaluates: the objective E made from the closure, and its counted calls.

- :class:`_StepObjective` — the :class:`~moller_scg.objective.Objective` a step evaluates, made from what ``step``
  is given and kept while the same one comes, so that the graph of the accepted trial's evaluation serves the next
  step's product s = E''(w)p (step 2);
- :func:`evaluate` — E(w) and E'(w) by one evaluation, counted in ``SCGScalars.closure_calls`` (steps 1 and
  6, and step 2 with Møller's finite difference).

Neither outlives the optimizer object: a pickled, copied or loaded SCG makes its objective again at the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moller_scg.objective import ClosureObjective, Objective, as_objective, is_plain_closure, same_tensors
from moller_scg.scg_state import SCGScalars


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


def evaluate(objective: Objective, scalars: SCGScalars) -> tuple[float, list[torch.Tensor]]:
    """E(w) and E'(w) at the weights the parameters hold, by one evaluation of the objective (one closure call).

    The gradients are the objective's ``copy=False`` ones (the ``.grad`` tensors, a ``None`` one as zero): SCG
    is done with them before it evaluates again, and never writes into them.
    """
    with torch.enable_grad():
        loss, gradients = objective.value_and_grad(copy=False)
    scalars.closure_calls += 1
    return float(loss), gradients
