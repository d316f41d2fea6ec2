"""One batch's derivatives: the gradient E_b'(w) and the Hessian-vector product E_b''(w) v of its loss term.

The pass engine (:class:`moller_scg.GradientAccumulator`) adds these into its float64 sums batch by batch; here
each is computed for one batch, knowing nothing of sums, passes or SCG. The products use the two exact methods of
:mod:`moller_scg.curvature`:

* double-backward: g = ∂E_b/∂w with ``create_graph=True``, then ∂(gᵀv)/∂w (Pearlmutter 1994);
* forward-over-reverse: the forward-mode derivative of ∂E_b/∂w along v, through ``torch.func.functional_call``.

Each function returns the batch's loss term E_b and its vectors, or ``None`` for the vectors when no parameter
reaches the batch's loss (its gradient and curvature are 0, and nothing needs to be added).

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from moller_scg.curvature import graph_hvp
from moller_scg.loss_weighting import BatchLoss

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
        return batch_loss.term(torch.func.functional_call(model, weights, (inputs,)), targets)

    weights = {name: p.detach() for name, p in zip(names, params)}
    directions = dict(zip(names, vectors))
    with torch.enable_grad():
        term, products = hvp_and_loss(loss_of_weights, weights, directions)
    return term, [products[name] for name in names]
