"""Hessian-vector products s = E''(w) v: the curvature SCG needs along its search direction.

Three ways to get s, each knowing nothing of SCG or of data:

* :func:`graph_hvp` — exact, by ``torch.autograd`` double-backward through gradients that were computed with
  ``create_graph=True`` (Pearlmutter 1994). It reuses the graph of the evaluation that produced the gradient,
  so it costs one backward pass and no forward pass.
* :func:`functional_hvp` — exact, by forward-over-reverse differentiation with ``torch.func`` (``jvp`` of
  ``grad``), for a loss written as a function of the parameters (:func:`functional_hvp_and_loss` also returns
  the loss of the same evaluation).
* :func:`functional_gauss_newton_product` — not E''v but the Gauss–Newton product G v = Jᵀ H_L J v (J the
  Jacobian of the model's outputs, H_L the loss's Hessian with respect to them; Schraudolph 2002, Martens 2010):
  positive semi-definite when the loss is convex in the outputs; one forward with forward-mode dual weights and
  one backward.
* :func:`finite_difference_hvp` — Møller's original approximation s = (E'(w + σₖ v) − E'(w)) / σₖ, from
  two gradients (Møller 1993, step 2).

References:
    Møller, M. F. (1993). A scaled conjugate gradient algorithm for fast supervised learning.
    Neural Networks 6(4), 525–533.
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation 6(1), 147–160.
    Schraudolph, N. N. (2002). Fast curvature matrix-vector products for second-order gradient descent.
    Neural Computation 14(7), 1723–1738.
    Martens, J. (2010). Deep learning via Hessian-free optimization. ICML.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch.autograd import forward_ad

from moller_scg._vectors import TensorList, as_real

MISSING_GRAPH_MESSAGE = (
    "double-backward curvature needs gradients that carry their autograd graph, but no gradient does. "
    "Call loss.backward(create_graph=True) in the closure (in PyTorch Lightning: override "
    "LightningModule.backward to pass create_graph=True), pass a closure with an hvp() method (such as "
    "moller_scg.GradientAccumulator), or use SCG(..., hvp='finite-difference'), which needs only gradients. (If "
    "the closure does call backward(create_graph=True), the loss is at most linear in the weights, E'' = 0: "
    "hvp='finite-difference' gives that too)"
)
NO_SECOND_DERIVATIVE_MESSAGE = (
    "double-backward curvature failed: an operation in the model or its loss has no second derivative in PyTorch "
    "({error}). Use SCG(..., hvp='finite-difference'), which needs only gradients. Or switch the operation to a twice "
    "differentiable kernel in the closure's forward pass: for scaled_dot_product_attention (which the "
    "nn.Transformer layers use) run the forward under "
    "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH); for cuDNN RNNs, under "
    "torch.backends.cudnn.flags(enabled=False)"
)
"""What :func:`graph_hvp` raises when autograd cannot differentiate a backward pass (``{error}``: its message)."""
LOSS_WITHOUT_SECOND_DERIVATIVE_MESSAGE = (
    "Gauss–Newton curvature failed: the loss has no second derivative with respect to the model's outputs in "
    "PyTorch ({error}; CTC loss, for one). Use SCG(..., hvp='finite-difference'), which needs only gradients, or "
    "SCG(..., memory=m), whose curvature comes from its secant pairs"
)
"""What :func:`gauss_newton_from_forward` raises when autograd cannot differentiate the loss twice."""
# How autograd says that a backward function is not differentiable once more.
_NO_SECOND_DERIVATIVE_SIGNS = ("is not implemented", "not supported", "once_differentiable")


def graph_hvp(
    gradients: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    require_graph: bool = True,
) -> TensorList:
    """s = E''(w) v by double-backward: the gradient of gᵀv with respect to w, where g = E'(w) carries its graph.

    Args:
        gradients: g = E'(w) per parameter, computed with ``create_graph=True``. A gradient without a graph
            (``None``, or one that does not require grad) does not depend on w and contributes nothing.
        params: the parameters w the gradients were taken with respect to.
        vectors: v, one tensor per parameter (no graph).
        require_graph: raise when no gradient carries a graph (a closure that forgot ``create_graph=True``);
            with ``False`` that case is E'' = 0 (a loss at most linear in w) and gives zeros.

    Returns:
        s = E''(w) v, detached, one tensor per parameter.

    Raises:
        RuntimeError: when no gradient carries a graph (the loss was not differentiated with
            ``create_graph=True``), or when the graph holds an operation without a second derivative (fused
            attention kernels, cuDNN RNNs, ``EmbeddingBag``, ``ctc_loss``, …); the message says what to do.
    """
    pairs = [(g, v) for g, v in zip(gradients, vectors) if g is not None and g.requires_grad]
    if not pairs:
        if require_graph:
            raise RuntimeError(MISSING_GRAPH_MESSAGE)
        return [torch.zeros_like(p) for p in params]  # the gradient does not depend on w: E'' = 0
    # A frozen parameter (requires_grad=False) has a zero gradient, as in torch.optim, and so a zero product:
    # autograd is asked only for the others (it refuses to differentiate with respect to a frozen tensor).
    trained = [p for p in params if p.requires_grad]
    with torch.enable_grad():
        directional = cast(torch.Tensor, sum(torch.sum(as_real(g) * as_real(v)) for g, v in pairs))  # pairs ≠ []
        try:
            products = iter(torch.autograd.grad(directional, trained, allow_unused=True))
        except RuntimeError as error:  # NotImplementedError is a RuntimeError too
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if not any(sign in first_line for sign in _NO_SECOND_DERIVATIVE_SIGNS):
                raise
            raise RuntimeError(NO_SECOND_DERIVATIVE_MESSAGE.format(error=first_line)) from error
    by_param = [next(products) if p.requires_grad else None for p in params]
    return [torch.zeros_like(p) if s is None else s.detach() for p, s in zip(params, by_param)]


def functional_hvp(
    loss_of_params: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """s = E''(w) v by forward-over-reverse differentiation (``torch.func.jvp`` of ``torch.func.grad``).

    Args:
        loss_of_params: E as a pure function of a name → tensor mapping of parameters (for example built on
            ``torch.func.functional_call``).
        params: w, by name.
        vectors: v, by the same names.

    Returns:
        s = E''(w) v, by name.
    """
    # jvp's stub does not tell its results with and without has_aux apart: (outputs, tangents) here
    _, products = cast(
        "tuple[torch.Tensor, dict[str, torch.Tensor]]",
        torch.func.jvp(torch.func.grad(loss_of_params), (dict(params),), (dict(vectors),)),
    )
    return products


def functional_hvp_and_loss(
    loss_of_params: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """E(w) and s = E''(w) v from one forward-over-reverse evaluation (see :func:`functional_hvp`).

    Returns:
        E(w), detached, and s = E''(w) v by name.
    """

    def loss_and_value(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_of_params(weights)
        return loss, loss.detach()

    gradient_and_value = torch.func.grad(loss_and_value, has_aux=True)
    # (gradient, its tangent s, aux = the loss); jvp's stub does not tell this from the 2-tuple without has_aux
    _, products, loss = cast(
        "tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]",
        torch.func.jvp(gradient_and_value, (dict(params),), (dict(vectors),), has_aux=True),
    )
    return loss, products


def dual_forward(
    outputs_of_params: Callable[[dict[str, torch.Tensor]], object],
    params: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """y(w) and J v from **one** forward, with forward-mode dual weights w + εv (``torch.autograd.forward_ad``) while
    autograd records: so the model runs once — a training-mode batch norm updates its statistics once, a dropout
    draws one mask, and the Jᵀ of :func:`gauss_newton_from_forward` belongs to the same J.

    Args:
        outputs_of_params: y as a function of a name → tensor mapping of parameters (``torch.func.functional_call``).
        params: w, by name.
        vectors: v, by the same names.

    Returns:
        y with its autograd graph to the returned leaves (detached copies of w, in ``params``' order), and J v.

    Raises:
        TypeError: the model returns something other than one tensor.
        RuntimeError: an operation of the model has no forward-mode derivative.
    """
    with torch.enable_grad(), forward_ad.dual_level():
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        duals = {name: forward_ad.make_dual(leaf, vectors[name]) for name, leaf in zip(params, leaves)}
        outputs = outputs_of_params(duals)
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"hvp_method='gauss-newton' needs a model that returns one tensor (the loss's Hessian is taken in "
                f"it), got {type(outputs).__name__}; use hvp_method='double-backward'"
            )
        primal, tangent = forward_ad.unpack_dual(outputs)
    if tangent is None:  # no parameter reaches the outputs: J = 0
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach(), leaves


def gauss_newton_from_forward(
    outputs: torch.Tensor,
    jacobian_v: torch.Tensor,
    leaves: Sequence[torch.Tensor],
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Jᵀ H_L (J v) from :func:`dual_forward`'s y, J v and leaves: H_L (J v) by double-backward through the loss alone
    (the outputs are small, and not every loss runs under forward mode), Jᵀ(·) by one backward through y's graph.
    A parameter y does not reach gets zeros."""
    if not outputs.requires_grad:  # no parameter reaches y: J = 0
        return [torch.zeros_like(leaf) for leaf in leaves]
    free_outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (loss_gradient,) = torch.autograd.grad(loss_of_outputs(free_outputs), free_outputs, create_graph=True)
        curvature_jv = None
        if loss_gradient.requires_grad:
            try:
                (curvature_jv,) = torch.autograd.grad(loss_gradient, free_outputs, jacobian_v, allow_unused=True)
            except RuntimeError as error:  # NotImplementedError is a RuntimeError too
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if not any(sign in first_line for sign in _NO_SECOND_DERIVATIVE_SIGNS):
                    raise
                raise RuntimeError(LOSS_WITHOUT_SECOND_DERIVATIVE_MESSAGE.format(error=first_line)) from error
        if curvature_jv is None:  # L is linear in y: H_L = 0
            curvature_jv = torch.zeros_like(free_outputs)
        products = torch.autograd.grad(outputs, list(leaves), curvature_jv, allow_unused=True)
    return [torch.zeros_like(leaf) if s is None else s for leaf, s in zip(leaves, products)]


def functional_gauss_newton_product(
    outputs_of_params: Callable[[dict[str, torch.Tensor]], object],
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """G v = Jᵀ H_L J v for E(w) = L(y(w)), from one forward of the model (:func:`dual_forward`) and one backward
    (:func:`gauss_newton_from_forward`).

    Args:
        outputs_of_params: y as a pure function of a name → tensor mapping of parameters (for example built on
            ``torch.func.functional_call``).
        loss_of_outputs: L as a function of y.
        params: w, by name.
        vectors: v, by the same names.

    Returns:
        y(w) and J v (both detached), and G v by name.
    """
    outputs, jacobian_v, leaves = dual_forward(outputs_of_params, params, vectors)
    products = gauss_newton_from_forward(outputs, jacobian_v, leaves, loss_of_outputs)
    return outputs.detach(), jacobian_v, dict(zip(params, products))


def finite_difference_hvp(
    shifted_gradients: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    sigma_k: float,
) -> TensorList:
    """Møller's s = (E'(w + σₖ p) − E'(w)) / σₖ from the gradient at the shifted point and at w (step 2)."""
    return [(shifted - g) / sigma_k for shifted, g in zip(shifted_gradients, gradients)]
