"""An :class:`~moller_scg.objective.Objective` around a ``torch.optim`` closure (what ``SCG.step(closure)`` takes).

The closure sets each parameter's ``.grad`` to E'(w) and returns E(w); in ``"double-backward"`` mode it calls
``loss.backward(create_graph=True)``, so that s = E''(w)v is one more backward pass through the graph of the last
evaluation (Pearlmutter 1994), which this object keeps until the product is taken or the parameters change.

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from moller_scg.curvature import MISSING_GRAPH_MESSAGE, graph_hvp
from moller_scg.objective.finite_difference import shifted_gradient_product
from moller_scg.objective.protocol import (
    DEFAULT_SIGMA,
    EvaluationCounts,
    check_vectors,
    load_counts,
    owned_gradients,
    scalar_loss,
    validate_hvp_mode,
    validate_params,
    validate_sigma,
)


class ClosureObjective:
    """E(w) evaluated by a closure that sets ``.grad`` and returns the loss, as for ``torch.optim.LBFGS``.

    The object is itself such a closure: calling it calls the closure once (counted in nfev and ngev) and returns
    its loss, so ``optimizer.step(objective)`` works with any closure optimizer.

    Args:
        closure: re-evaluates E(w), sets each parameter's ``.grad`` to E'(w) and returns E(w). In
            ``"double-backward"`` mode it must call ``loss.backward(create_graph=True)``.
        params: w, the tensors the closure differentiates with respect to (their ``.grad`` is read).
        hvp_mode: ``"double-backward"``: s = E''(w)v exactly, by one backward pass through the graph of the last
            evaluation at w. ``"finite-difference"``: s ≈ (E'(w + σₖv) − E'(w))/σₖ, one more closure call.
        sigma: σ of the finite difference (σₖ = σ/|v|); unused in ``"double-backward"`` mode.

    Cost of :meth:`hvp`: one backward pass (double-backward) or one closure call (finite-difference), plus one
    closure call when the parameters were written to since the last evaluation, or when a product was already
    taken from that evaluation's graph (the backward pass frees it, as SCG needs one product per point).

    Example:
        >>> import torch
        >>> from moller_scg.objective import ClosureObjective
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> def closure():
        ...     w.grad = None
        ...     loss = (w**4).sum()
        ...     loss.backward(create_graph=True)
        ...     return loss
        >>> objective = ClosureObjective(closure, [w])
        >>> loss, (gradient,) = objective.value_and_grad()
        >>> gradient.tolist()  # 4w³
        [4.0, 32.0]
        >>> objective.hvp([torch.tensor([1.0, 1.0], dtype=torch.float64)])[0].tolist()  # 12w² · v
        [12.0, 48.0]
        >>> objective.counts
        EvaluationCounts(nfev=1, ngev=1, nhev=1)
    """

    def __init__(
        self,
        closure: Callable[[], Any],
        params: Iterable[torch.Tensor],
        hvp_mode: str = "double-backward",
        sigma: float = DEFAULT_SIGMA,
    ) -> None:
        if not callable(closure):
            raise TypeError(f"closure must be callable (it re-evaluates the loss), got {type(closure).__name__}")
        self.closure = closure
        self.hvp_mode = validate_hvp_mode(hvp_mode)
        self.sigma = validate_sigma(sigma)
        self._params = validate_params(params)
        self._counts = EvaluationCounts()
        # The ``.grad`` tensors of the last evaluation (with their graph in double-backward mode) and the
        # parameters' versions then: valid for hvp while the versions are unchanged.
        self._last_gradients: list[torch.Tensor | None] | None = None
        self._last_versions: list[int] | None = None
        self._require_graph = True  # a user's closure without create_graph=True is a mistake worth naming

    @property
    def params(self) -> list[torch.Tensor]:
        """w, in the order of gradients and Hessian-vector products."""
        return self._params

    @property
    def counts(self) -> EvaluationCounts:
        """Closure calls count in nfev and ngev (a call computes both); products in nhev."""
        return self._counts

    def __call__(self) -> Any:
        """One closure call at the values the parameters hold: returns the closure's loss; ``.grad`` as it set it."""
        with torch.enable_grad():
            raw_loss = self.closure()
        self._counts.nfev += 1
        self._counts.ngev += 1
        gradients = [p.grad for p in self._params]
        if (
            self.hvp_mode == "double-backward"
            and self._require_graph
            and not any(g is not None and g.requires_grad for g in gradients)
        ):
            raise RuntimeError(MISSING_GRAPH_MESSAGE)
        self._last_gradients = gradients
        self._last_versions = [p._version for p in self._params]
        return raw_loss

    def value_and_grad(self) -> tuple[float | torch.Tensor, list[torch.Tensor]]:
        """E(w) (detached) and E'(w) as new tensors, from one closure call at the values the parameters hold."""
        loss = scalar_loss(self(), "the closure")
        return loss, owned_gradients(self._params)

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s = E''(w)v at the weights w of the last evaluation (see the cost in the class docstring).

        Args:
            vectors: v, one tensor per parameter, of its shape.

        Returns:
            s, one detached tensor per parameter.
        """
        checked = check_vectors(vectors, self._params)
        self._counts.nhev += 1
        if not self._last_evaluation_is_current():
            self()
        # Not None: the evaluation just checked or made stored them.
        gradients = list(self._last_gradients or [])
        if self.hvp_mode == "double-backward":
            self._last_gradients = None  # the backward pass below frees the graph
            return graph_hvp(gradients, self._params, checked, require_graph=self._require_graph)
        gradient_at_w = [
            torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(self._params, gradients)
        ]
        return shifted_gradient_product(self._params, gradient_at_w, checked, self._gradient_here, self.sigma)

    def loss(self) -> float | torch.Tensor:
        """E(w) by one closure call (which also computes E', so it counts in nfev and ngev)."""
        return scalar_loss(self(), "the closure")

    def state_dict(self) -> dict[str, Any]:
        """``{"counts": {"nfev": …, "ngev": …, "nhev": …}}``."""
        return {"counts": dataclasses.asdict(self._counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counts saved by :meth:`state_dict`."""
        if not isinstance(state_dict, dict) or "counts" not in state_dict:
            raise ValueError(f"not an objective state_dict (no 'counts' entry): {state_dict!r:.120}")
        load_counts(self._counts, state_dict["counts"])

    def _last_evaluation_is_current(self) -> bool:
        return self._last_gradients is not None and self._last_versions == [p._version for p in self._params]

    def _gradient_here(self) -> list[torch.Tensor]:
        self()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self._params]
