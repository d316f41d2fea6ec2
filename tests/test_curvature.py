"""The curvature helpers on their own, and what SCG says when double-backward is impossible."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moller_scg import SCG
from moller_scg.curvature import finite_difference_hvp, functional_hvp, functional_hvp_and_loss, graph_hvp


def cubic_loss(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    w = weights["w"]
    return (w**3).sum() + w[0] * w[1]


def exact_hessian_product(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E = Σ wᵢ³ + w₀w₁: E'' = diag(6w) + the symmetric coupling of w₀ and w₁."""
    product = 6 * w * v
    product[0] += v[1]
    product[1] += v[0]
    return product


def test_the_three_curvature_helpers_agree_with_the_closed_form():
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    expected = exact_hessian_product(w, v)

    leaf = w.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(cubic_loss({"w": leaf}), [leaf], create_graph=True)
    (by_graph,) = graph_hvp([gradient], [leaf], [v])
    by_function = functional_hvp(cubic_loss, {"w": w}, {"w": v})["w"]
    loss, by_function_with_loss = functional_hvp_and_loss(cubic_loss, {"w": w}, {"w": v})

    sigma = 1e-7
    shifted = (w + sigma * v).requires_grad_()
    (shifted_gradient,) = torch.autograd.grad(cubic_loss({"w": shifted}), [shifted])
    (by_difference,) = finite_difference_hvp([shifted_gradient], [gradient.detach()], sigma)

    torch.testing.assert_close(by_graph, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(by_function, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(by_function_with_loss["w"], expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(loss, cubic_loss({"w": w}), rtol=0, atol=0)
    torch.testing.assert_close(by_difference, expected, rtol=1e-6, atol=1e-6)


def attention_problem():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    y = torch.randn(4, 5, 8, dtype=torch.float64)
    return layer, x, y


def test_an_operation_without_second_derivative_gets_a_message_that_says_what_to_do():
    # On CPU, scaled_dot_product_attention's fused kernel has no double backward in PyTorch 2.x.
    layer, x, y = attention_problem()
    optimizer = SCG(layer.parameters())

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward(create_graph=True)
        return loss

    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(RuntimeError, match="no second derivative") as error:
        optimizer.step(closure)
    message = str(error.value)
    assert "hvp='finite-difference'" in message and "SDPBackend.MATH" in message
    assert "is not implemented" in message  # PyTorch's own reason is kept
    for p, b in zip(layer.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("workaround", ["finite-difference", "math kernel"])
def test_both_workarounds_for_fused_attention_train(workaround):
    layer, x, y = attention_problem()
    exact = workaround == "math kernel"
    optimizer = SCG(layer.parameters(), hvp="double-backward" if exact else "finite-difference")

    def closure():
        optimizer.zero_grad()
        with sdpa_kernel(SDPBackend.MATH) if exact else contextlib.nullcontext():
            loss = F.mse_loss(layer(x), y)
        loss.backward(create_graph=exact)
        return loss

    first = float(optimizer.step(closure))
    for _ in range(10):
        loss = float(optimizer.step(closure))
    assert loss < first


def test_other_autograd_errors_are_not_rewritten():
    leaf = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad((leaf**3).sum(), [leaf], create_graph=True)
    vector = torch.ones(2, dtype=torch.float64)
    graph_hvp([gradient], [leaf], [vector])  # frees the graph of the gradient
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as error:
        graph_hvp([gradient], [leaf], [vector])
    assert "no second derivative" not in str(error.value)
