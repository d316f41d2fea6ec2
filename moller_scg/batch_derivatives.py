"""One batch's derivatives: the gradient E_b'(w) and the Hessian-vector product E_b''(w) v of its loss term.

The pass engine (:class:`moller_scg.GradientAccumulator`) adds these into its float64 sums batch by batch; here
each is computed for one batch, knowing nothing of sums, passes or SCG. The products use the two exact methods of
:mod:`moller_scg.curvature`:

* double-backward: g = ∂E_b/∂w with ``create_graph=True``, then ∂(gᵀv)/∂w (Pearlmutter 1994);
* forward-over-reverse: the forward-mode derivative of ∂E_b/∂w along v, through ``torch.func.functional_call``.

Each function returns the batch's loss term E_b and its vectors, or ``None`` for the vectors when no parameter
reaches the batch's loss (its gradient and curvature are 0, and nothing needs to be added).
:class:`BatchDerivatives` is what the pass engine calls: it holds the accumulator's choice of method and falls
back from forward-over-reverse to double-backward, once and for good, when ``torch.func`` fails on the first batch.

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from moller_scg.curvature import graph_hvp
from moller_scg.input_checks import param_names
from moller_scg.loss_weighting import BatchLoss

logger = logging.getLogger(__name__)

HvpAndLoss = Callable[
    [Callable[[dict[str, torch.Tensor]], torch.Tensor], Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]
"""The signature of :func:`moller_scg.curvature.functional_hvp_and_loss`: (E_b as a function of w, w, v) → (E_b, s)."""
BatchVectors = Sequence[torch.Tensor | None] | None
"""One vector per parameter (``None`` for a parameter the loss does not reach), or ``None`` when none reaches it."""


def batch_gradient(
    model: nn.Module, batch_loss: BatchLoss, params: Sequence[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, BatchVectors]:
    """E_b and ∂E_b/∂w per parameter (``None`` for a parameter the loss does not reach)."""
    with torch.enable_grad():
        term = batch_loss.term(model(inputs), targets)
        if not term.requires_grad:
            return term, None
        gradients = torch.autograd.grad(term, list(params), allow_unused=True)
    return term, gradients


def batch_hvp_double_backward(
    model: nn.Module,
    batch_loss: BatchLoss,
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    vectors: list[torch.Tensor],
) -> tuple[torch.Tensor, BatchVectors]:
    """E_b and E_b''v as ∂(gᵀv)/∂w, with g = ∂E_b/∂w kept differentiable (Pearlmutter 1994)."""
    with torch.enable_grad():
        term = batch_loss.term(model(inputs), targets)
        if not term.requires_grad:
            return term, None
        gradients = torch.autograd.grad(term, list(params), create_graph=True, allow_unused=True)
    return term, graph_hvp(gradients, params, vectors, require_graph=False)


def batch_hvp_forward_over_reverse(
    model: nn.Module,
    batch_loss: BatchLoss,
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    vectors: list[torch.Tensor],
    hvp_and_loss: HvpAndLoss,
) -> tuple[torch.Tensor, BatchVectors]:
    """E_b and E_b''v as the forward-mode derivative of ∂E_b/∂w along v (``torch.func``).

    Args:
        names: the parameters' names in ``model`` (:func:`moller_scg.input_checks.param_names`).
        hvp_and_loss: :func:`moller_scg.curvature.functional_hvp_and_loss`, passed in by the caller.

    Raises:
        RuntimeError: ``torch.func`` does not support an operator of the model or the loss.
    """

    def loss_of_weights(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = torch.func.functional_call(model, weights, (inputs,))
        return batch_loss.term(outputs, targets, [weights[name] for name in names])  # a penalty at these weights

    weights = {name: p.detach() for name, p in zip(names, params)}
    directions = dict(zip(names, vectors))
    with torch.enable_grad():
        term, products = hvp_and_loss(loss_of_weights, weights, directions)
    return term, [products[name] for name in names]


class BatchDerivatives:
    """E_b with E_b'(w) or E_b''(w) v for one batch at a time, by the accumulator's Hessian-vector product method.

    ``torch.func`` does not support every operator (e.g. ``F.mse_loss`` with ``reduction="mean"`` under jvp of grad,
    pytorch/pytorch#123996). If a forward-over-reverse product fails on the first batch it is ever tried on, nothing
    has been added to the pass's sums yet, so that batch is redone by double-backward, a warning is logged and
    :attr:`method` becomes ``"double-backward"`` from then on. Once ``torch.func`` has evaluated one batch, its
    errors are real and propagate.

    Args:
        model: the network; called as ``model(inputs)``.
        batch_loss: the loss term of a batch (:class:`moller_scg.loss_weighting.BatchLoss`).
        params: w, in the order vectors are taken and returned.
        method: ``"double-backward"`` or ``"forward-over-reverse"`` (the accumulator has checked it).

    Raises:
        ValueError: ``method="forward-over-reverse"`` with a parameter that is not among the model's own.
    """

    def __init__(self, model: nn.Module, batch_loss: BatchLoss, params: Sequence[torch.Tensor], method: str) -> None:
        self.model = model
        self.batch_loss = batch_loss
        self.params = params
        self.method = method
        self._names = param_names(model, list(params)) if method == "forward-over-reverse" else None
        self._functional_works = False  # whether torch.func has evaluated one batch (then its errors are real)

    def gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, BatchVectors]:
        """E_b and ∂E_b/∂w (:func:`batch_gradient`)."""
        return batch_gradient(self.model, self.batch_loss, self.params, inputs, targets)

    def hvp(
        self, inputs: torch.Tensor, targets: torch.Tensor, vectors: list[torch.Tensor], hvp_and_loss: HvpAndLoss
    ) -> tuple[torch.Tensor, BatchVectors]:
        """E_b and E_b''v by :attr:`method` (``hvp_and_loss``: :func:`moller_scg.curvature.functional_hvp_and_loss`)."""
        if self.method == "double-backward":
            return batch_hvp_double_backward(self.model, self.batch_loss, self.params, inputs, targets, vectors)
        names = cast(list[str], self._names)  # set when the method given was "forward-over-reverse"
        try:
            result = batch_hvp_forward_over_reverse(
                self.model, self.batch_loss, self.params, names, inputs, targets, vectors, hvp_and_loss
            )
        except RuntimeError as error:
            if self._functional_works:
                raise
            logger.warning(
                "hvp_method='forward-over-reverse' failed on the first batch (%s: %s); using 'double-backward' "
                "from now on",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.method = "double-backward"
            return batch_hvp_double_backward(self.model, self.batch_loss, self.params, inputs, targets, vectors)
        self._functional_works = True
        return result
