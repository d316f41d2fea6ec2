"""One batch's derivatives: the gradient E_b'(w) and the Hessian-vector product E_b''(w) v of its loss term.

The pass engine (:class:`moller_scg.GradientAccumulator`) adds these into its float64 sums batch by batch; here
each is computed for one batch, knowing nothing of sums, passes or SCG. The products use the two exact methods of
:mod:`moller_scg.curvature`:

* double-backward: g = ∂E_b/∂w with ``create_graph=True``, then ∂(gᵀv)/∂w (Pearlmutter 1994);
* forward-over-reverse: the forward-mode derivative of ∂E_b/∂w along v, through ``torch.func.functional_call``.

and, in place of E_b''v, the Gauss–Newton product G_b v = J_bᵀ H_L J_b v (+ the weight-decay penalty's ν v share,
which is exact), positive semi-definite when the loss is convex in the model's outputs
(:func:`moller_scg.curvature.functional_gauss_newton_product`).

Each function returns the batch's loss term E_b and its vectors, or ``None`` for the vectors when no parameter
reaches the batch's loss (its gradient and curvature are 0, and nothing needs to be added).
:class:`BatchDerivatives` is what the pass engine calls: it holds the accumulator's choice of method and falls
back from forward-over-reverse to double-backward, once and for good, when ``torch.func`` fails on the first batch
(a Gauss–Newton product has no such fallback: another method would give another matrix).

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from moller_scg.curvature import dual_forward, gauss_newton_from_forward, graph_hvp
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


GAUSS_NEWTON_FAILED_MESSAGE = (
    "hvp_method='gauss-newton' runs the model once with forward-mode dual weights (torch.autograd.forward_ad), and "
    "that forward failed ({kind}: {error}); an operation without a forward-mode derivative does this: use "
    "hvp_method='double-backward' (the exact E''v) instead"
)
ZERO_GAUSS_NEWTON_MESSAGE = (
    "hvp_method='gauss-newton': over the first product's batches the loss has no curvature in the model's outputs "
    "(H_L J v = 0 while J v ≠ 0), so the Gauss–Newton matrix is 0 (+ the weight decay's νI). A loss linear in the "
    "outputs does this — NLLLoss after a log_softmax inside the model, KLDivLoss on log-probabilities: compute the "
    "loss from the logits instead (CrossEntropyLoss, with class indices or probabilities), so that the softmax and "
    "its curvature are in the loss, or use hvp_method='double-backward'"
)


def batch_gauss_newton_product(
    model: nn.Module,
    batch_loss: BatchLoss,
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    vectors: list[torch.Tensor],
    measure_curvature: bool = False,
) -> tuple[torch.Tensor, BatchVectors, tuple[torch.Tensor, torch.Tensor] | None]:
    """E_b, G_b v = J_bᵀ H_L J_b v of the batch's loss term (plus the penalty's share × ν v), and, with
    ``measure_curvature``, |J_b v|² and |J_bᵀ H_L J_b v|² as device scalars (for :class:`BatchDerivatives`' check
    that the loss has curvature; ``None`` without, so a pass after the check adds no reductions).

    Raises:
        TypeError: the model returns something other than one tensor.
        RuntimeError: the model's forward failed under forward mode (:data:`GAUSS_NEWTON_FAILED_MESSAGE`).
    """
    weights = {name: p.detach() for name, p in zip(names, params)}

    def outputs_of(w: dict[str, torch.Tensor]) -> object:
        return torch.func.functional_call(model, w, (inputs,))

    try:
        outputs, jacobian_v, leaves = dual_forward(outputs_of, weights, dict(zip(names, vectors)))
    except torch.OutOfMemoryError:
        raise  # not a forward-mode limitation: the caller's handler of OutOfMemoryError must still see it
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise RuntimeError(GAUSS_NEWTON_FAILED_MESSAGE.format(kind=type(error).__name__, error=first_line)) from error
    products = gauss_newton_from_forward(outputs, jacobian_v, leaves, lambda y: batch_loss.data_term(y, targets))
    with torch.no_grad():
        term = batch_loss.term(outputs.detach(), targets)
        squares = None
        if measure_curvature:
            squares = (
                jacobian_v.square().sum(dtype=torch.float64),
                sum((s.square().sum(dtype=torch.float64) for s in products), torch.zeros((), dtype=torch.float64)),
            )
    result = list(products)
    penalty = batch_loss.weight_decay
    if penalty is not None:  # P = (ν/2)|w|² is quadratic: its Hessian νI is its Gauss–Newton matrix too
        share = batch_loss.penalty_share(targets)
        # v · ν first: D_b may be an integer tensor, and an integer tensor times a Python float is float32
        result = [s + (v * penalty.weight_decay) * share for s, v in zip(result, vectors)]
    return term, result, squares


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
        functional = method in ("forward-over-reverse", "gauss-newton")
        self._names = param_names(model, list(params), method) if functional else None
        if method == "gauss-newton" and any(p.is_complex() for p in params):
            raise ValueError(
                "hvp_method='gauss-newton' supports real parameters only (its Jacobian products run in forward "
                "mode over real weights); use hvp_method='double-backward' for complex ones"
            )
        self._functional_works = False  # whether torch.func has evaluated one batch (then its errors are real)
        self._curvature_checked = False  # gauss-newton: whether a pass with J v ≠ 0 has been checked for H_L = 0
        self._curvature_sums: tuple[torch.Tensor, torch.Tensor] | None = None  # Σ|J v|², Σ|G v|² of this pass

    def gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, BatchVectors]:
        """E_b and ∂E_b/∂w (:func:`batch_gradient`)."""
        return batch_gradient(self.model, self.batch_loss, self.params, inputs, targets)

    def hvp(
        self, inputs: torch.Tensor, targets: torch.Tensor, vectors: list[torch.Tensor], hvp_and_loss: HvpAndLoss
    ) -> tuple[torch.Tensor, BatchVectors]:
        """E_b and E_b''v by :attr:`method` (``hvp_and_loss``: :func:`moller_scg.curvature.functional_hvp_and_loss`)."""
        if self.method == "double-backward":
            return batch_hvp_double_backward(self.model, self.batch_loss, self.params, inputs, targets, vectors)
        names = cast(list[str], self._names)  # set when the method given was a functional one
        if self.method == "gauss-newton":
            return self._gauss_newton(names, inputs, targets, vectors)
        try:
            result = batch_hvp_forward_over_reverse(
                self.model, self.batch_loss, self.params, names, inputs, targets, vectors, hvp_and_loss
            )
        except RuntimeError as error:
            if self._functional_works or isinstance(error, torch.OutOfMemoryError):
                raise  # an out-of-memory error says nothing of whether forward-over-reverse works here
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

    def _gauss_newton(
        self, names: list[str], inputs: torch.Tensor, targets: torch.Tensor, vectors: list[torch.Tensor]
    ) -> tuple[torch.Tensor, BatchVectors]:
        """E_b and G_b v (:func:`batch_gauss_newton_product`); until the curvature check has concluded, |J v|² and
        |G v|² are added up on the device (no host synchronisation) for :meth:`end_product_pass`."""
        term, products, squares = batch_gauss_newton_product(
            self.model, self.batch_loss, self.params, names, inputs, targets, vectors, not self._curvature_checked
        )
        if squares is not None:
            previous = self._curvature_sums
            self._curvature_sums = squares if previous is None else (previous[0] + squares[0], previous[1] + squares[1])
        return term, products

    def end_product_pass(self) -> None:
        """After a product pass: with ``"gauss-newton"``, until it has seen J v ≠ 0, check once per pass (one host
        synchronisation) whether the loss gave curvature anywhere; if J v ≠ 0 somewhere and G v = 0 everywhere,
        log :data:`ZERO_GAUSS_NEWTON_MESSAGE` — a loss linear in the model's outputs."""
        if self.method != "gauss-newton" or self._curvature_checked or self._curvature_sums is None:
            return
        jv_squared, gv_squared = (float(total) for total in self._curvature_sums)
        self._curvature_sums = None
        if jv_squared > 0:
            self._curvature_checked = True
            if gv_squared == 0:
                logger.warning(ZERO_GAUSS_NEWTON_MESSAGE)
