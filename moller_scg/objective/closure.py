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

from moller_scg.curvature import graph_hvp
from moller_scg.objective.finite_difference import shifted_gradient_product
from moller_scg.objective.protocol import (
    DEFAULT_SIGMA,
    EvaluationCounts,
    ValueThenGrad,
    check_vectors,
    load_counts,
    read_gradients,
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
        raw_loss, _ = self._call_closure()
        return raw_loss

    def _call_closure(self) -> tuple[Any, list[torch.Tensor | None]]:
        """One closure call: its raw loss and the ``.grad`` tensors it set (kept with the versions for :meth:`hvp`)."""
        # The last evaluation's gradients (and graph) are let go first, so that two graphs are never held at once:
        # a closure that starts with zero_grad() frees the old one before its forward pass builds the new one.
        self._last_gradients = None
        with torch.enable_grad():
            raw_loss = self.closure()
        self._counts.nfev += 1
        self._counts.ngev += 1
        # A closure without create_graph=True is named when a product is asked for (graph_hvp), not here: at a zero
        # gradient, or in a step that needs no product, no graph is needed (torch.optim's tests step such closures).
        gradients = [p.grad for p in self._params]
        self._last_gradients = gradients
        self._last_versions = [p._version for p in self._params]
        return raw_loss, gradients

    def _value_then_grad(
        self, loss: float | torch.Tensor, form_gradients: Callable[[], Sequence[torch.Tensor | None]]
    ) -> ValueThenGrad:
        """The bookkeeping of a subclass's ``value_then_grad``: ``loss``, E(w) of an evaluation just made (counted in
        nfev), and a function that forms E'(w) once with ``form_gradients`` (counted in ngev; kept, with the
        parameters' versions, for :meth:`hvp`) and returns it as ``copy=False`` gradients, the same ones if called
        again. The subclass lets go of the last evaluation (``_last_gradients = None``) before it evaluates."""
        self._counts.nfev += 1
        formed: list[list[torch.Tensor]] = []

        def gradient() -> list[torch.Tensor]:
            if not formed:
                gradients = list(form_gradients())
                self._counts.ngev += 1
                self._last_gradients = gradients
                self._last_versions = [p._version for p in self._params]
                formed.append(read_gradients(self._params, gradients, copy=False))
            return formed[0]

        return loss, gradient

    def value_and_grad(self, *, copy: bool = True) -> tuple[float | torch.Tensor, list[torch.Tensor]]:
        """E(w) (detached) and E'(w) from one closure call at the values the parameters hold: new tensors, or with
        ``copy=False`` the ``.grad`` tensors the closure set (valid until the next evaluation)."""
        raw_loss, gradients = self._call_closure()
        return scalar_loss(raw_loss, "the closure"), read_gradients(self._params, gradients, copy=copy)

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


class ClosureWithHvpObjective(ClosureObjective):
    """E(w) evaluated by a closure that has its own ``hvp(vectors)`` method, asked for s = E''(w)v.

    Such a closure (a wrapper around a :class:`~moller_scg.GradientAccumulator` that times or meters its passes, a
    ``torch.func`` objective) computes E''(w)v itself, so it needs no ``create_graph=True``; the closure is called as
    :class:`ClosureObjective` calls it, and ``closure.hvp`` gets v, one detached tensor per parameter.

    Args:
        closure: sets each parameter's ``.grad`` to E'(w) and returns E(w); ``closure.hvp(vectors)`` returns
            E''(w)v at the weights of its last call, one tensor per parameter.
        params: w, in the order ``closure.hvp`` takes and returns its tensors.

    Counts: a closure call counts in nfev and ngev, a ``closure.hvp`` call in nhev.
    """

    def __init__(self, closure: Callable[[], Any], params: Iterable[torch.Tensor]) -> None:
        if not callable(getattr(closure, "hvp", None)):
            raise TypeError(
                f"closure has no hvp(vectors) method: wrap it in a ClosureObjective instead, got {closure!r:.80}"
            )
        super().__init__(closure, params)
        self._require_graph = False  # closure.hvp forms the product: the gradients need no graph

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s = ``closure.hvp(v)``: one call, counted in nhev.

        Raises:
            ValueError: ``closure.hvp`` returned another number of tensors than there are parameters.
        """
        checked = check_vectors(vectors, self._params)
        self._counts.nhev += 1
        with torch.enable_grad():
            products = list(self.closure.hvp(checked))  # type: ignore[attr-defined]
        if len(products) != len(self._params):
            raise ValueError(
                f"closure.hvp returned {len(products)} tensors for {len(self._params)} parameters: it must return "
                f"one tensor per parameter, in the order of the optimizer's parameters"
            )
        return products
