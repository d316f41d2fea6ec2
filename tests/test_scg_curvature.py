"""``moller_scg.scg_curvature``: step 2's δ = pᵀs, exact or by Møller's finite difference, against the closed form
on a float64 quadratic, with its call counts and the weights it leaves."""

from __future__ import annotations

import pytest
import torch

from moller_scg import _vectors as vec
from moller_scg.objective import as_objective
from moller_scg.scg_curvature import curvature_along
from moller_scg.scg_objective import EvaluationTally
from moller_scg.scg_state import SCGScalars

# E(w) = ½ Σ aᵢ wᵢ² over two parameter tensors: E'(w) = a ⊙ w and E''(w)p = a ⊙ p.
CURVATURES = [torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)]


def quadratic_params() -> list[torch.Tensor]:
    return [
        torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64, requires_grad=True),
        torch.tensor([-3.0], dtype=torch.float64, requires_grad=True),
    ]


def quadratic_closure(params: list[torch.Tensor]):
    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = sum(0.5 * (a * p * p).sum() for a, p in zip(CURVATURES, params))
        loss.backward(create_graph=True)
        return loss

    return closure


@pytest.mark.parametrize("hvp", ["double-backward", "finite-difference"])
def test_curvature_along_is_p_transposed_a_p_and_leaves_the_weights_bit_exact(hvp):
    params = quadratic_params()
    before = [p.detach().clone() for p in params]
    objective = as_objective(quadratic_closure(params), params, hvp)
    _, gradients = objective.value_and_grad()
    direction = [torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)]
    (direction_sq,) = vec.dots([(direction, direction)])
    tally = EvaluationTally(objective)

    with torch.no_grad():  # as in SCG.step
        delta = curvature_along(
            direction,
            direction_sq,
            vec.negated(gradients),
            objective,
            params,
            vec.clone(params),
            {"hvp": hvp, "sigma": 5e-5},
            tally,
        )
    scalars = SCGScalars()
    tally.add_to(scalars, None)  # SCG's totals: what the objective counted, and the finite difference formed

    expected = sum(float((a * d * d).sum()) for a, d in zip(CURVATURES, direction))  # pᵀE''p on the quadratic
    assert delta == pytest.approx(expected, rel=1e-12 if hvp == "double-backward" else 1e-8)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert scalars.hvp_calls == 1
    # The exact product reuses the graph of the evaluation at w; the finite difference evaluates E'(w + σₖp).
    assert scalars.closure_calls == (0 if hvp == "double-backward" else 1)


def test_curvature_along_refuses_a_non_finite_delta():
    params = quadratic_params()
    objective = as_objective(quadratic_closure(params), params, "double-backward")
    _, gradients = objective.value_and_grad()
    direction = [torch.full_like(p, 1e300) for p in params]  # s = a ⊙ p is finite, pᵀs overflows
    with (
        torch.no_grad(),
        pytest.raises(FloatingPointError, match="curvature δ = pᵀs along the search direction is not finite"),
    ):
        curvature_along(
            direction,
            1e300,
            vec.negated(gradients),
            objective,
            params,
            vec.clone(params),
            {"hvp": "double-backward", "sigma": 5e-5},
            EvaluationTally(objective),
        )
