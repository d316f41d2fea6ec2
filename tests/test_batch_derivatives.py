"""Tests for moller_scg/batch_derivatives.py: one batch's E_b'(w) and E_b''(w)v, and the choice of HVP method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moller_scg.batch_derivatives import BatchDerivatives, batch_hvp_double_backward
from moller_scg.curvature import functional_hvp_and_loss
from moller_scg.loss_weighting import BatchLoss

FUNCTORCH_WARNING = "ignore:`torch.jit.script` is deprecated:FutureWarning"  # torch.func's own, on first jvp


def problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    targets = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = list(model.parameters())
    vectors = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in params]
    return model, BatchLoss(nn.SmoothL1Loss(reduction="sum"), "sum"), params, inputs, targets, vectors


def failing(*args):
    raise RuntimeError("ZeroTensors are immutable")


@pytest.mark.filterwarnings(FUNCTORCH_WARNING)
def test_forward_over_reverse_equals_double_backward():
    model, batch_loss, params, inputs, targets, vectors = problem()
    derivatives = BatchDerivatives(model, batch_loss, params, "forward-over-reverse")
    term, products = derivatives.hvp(inputs, targets, vectors, functional_hvp_and_loss)
    expected_term, expected = batch_hvp_double_backward(model, batch_loss, params, inputs, targets, vectors)
    assert derivatives.method == "forward-over-reverse"
    assert torch.allclose(term, expected_term, rtol=1e-14, atol=0)
    for product, reference in zip(products, expected):
        assert torch.allclose(product, reference, rtol=1e-12, atol=1e-14)


def test_failure_on_the_first_batch_switches_to_double_backward_for_good(caplog):
    model, batch_loss, params, inputs, targets, vectors = problem()
    derivatives = BatchDerivatives(model, batch_loss, params, "forward-over-reverse")
    calls = []

    def counting_failure(*args):
        calls.append(1)
        failing(*args)

    term, products = derivatives.hvp(inputs, targets, vectors, counting_failure)
    derivatives.hvp(inputs, targets, vectors, counting_failure)
    expected_term, expected = batch_hvp_double_backward(model, batch_loss, params, inputs, targets, vectors)
    assert derivatives.method == "double-backward" and len(calls) == 1  # torch.func is not tried again
    assert torch.equal(term, expected_term) and all(torch.equal(a, b) for a, b in zip(products, expected))
    assert "failed on the first batch (RuntimeError: ZeroTensors are immutable)" in caplog.text


@pytest.mark.filterwarnings(FUNCTORCH_WARNING)
def test_failure_after_torch_func_has_worked_is_raised_not_hidden():
    model, batch_loss, params, inputs, targets, vectors = problem()
    derivatives = BatchDerivatives(model, batch_loss, params, "forward-over-reverse")
    derivatives.hvp(inputs, targets, vectors, functional_hvp_and_loss)
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        derivatives.hvp(inputs, targets, vectors, failing)
    assert derivatives.method == "forward-over-reverse"


def test_forward_over_reverse_refuses_parameters_outside_the_model():
    model, batch_loss, _, _, _, _ = problem()
    stranger = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[0\] are not among model.named_parameters"):
        BatchDerivatives(model, batch_loss, [stranger], "forward-over-reverse")
