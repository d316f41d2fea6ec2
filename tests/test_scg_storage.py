"""``moller_scg.scg_storage``: where SCG keeps r and p (per parameter, or flat buffers whose views
``optimizer.state`` holds) and the inner products it remembers of them."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from moller_scg import _vectors as vec
from moller_scg.scg_storage import _StateVectors


@pytest.mark.parametrize("memory", [0, 1], ids=["per-parameter", "flat"])
def test_remembered_products_serve_until_r_or_p_is_written_to(memory):
    params = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    gradients = [
        torch.tensor([[0.5, -2.0], [6.0, 1.0]], dtype=torch.float64),
        torch.tensor([-15.0], dtype=torch.float64),
    ]
    state: defaultdict = defaultdict(dict)
    storage = _StateVectors()
    storage.start(state, params, gradients, memory)  # r₁ = −E'(w₁), p₁ = r₁
    assert (storage.flat is not None) == (memory > 0)
    residual, direction = storage.residual_and_direction(state, params)
    storage.remember_products(state, params, (1.0, 2.0, 3.0))
    assert storage.products(residual, direction) == (1.0, 2.0, 3.0)  # not formed again

    state[params[1]]["direction"].mul_(2.0)  # through optimizer.state's tensor: a view of p on the flat path
    r = torch.cat([-g.reshape(-1) for g in gradients])
    p = r.clone()
    p[-1] *= 2.0
    expected = (float(r @ r), float(p @ r), float(p @ p))
    assert storage.products(residual, direction) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("memory", [0, 1], ids=["per-parameter", "flat"])
@pytest.mark.parametrize("along", ["direction", "residual"], ids=["along-p", "steepest-descent-fallback"])
def test_trial_products_are_those_of_r_plus_with_r_plus_r_and_the_search_direction(memory, along):
    """|r₊|², r₊ᵀr and r₊ᵀd for d the direction searched: p, or r itself (SCG's fallback when pᵀr = 0): the flat
    path's fused product must not read the stored p then."""
    generator = torch.Generator().manual_seed(3)
    params = [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    state: defaultdict = defaultdict(dict)
    storage = _StateVectors()
    storage.start(state, params, [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params], memory)
    residual, direction = storage.residual_and_direction(state, params)
    for d in direction:
        d.copy_(torch.randn(d.shape, generator=generator, dtype=d.dtype))
    new_residual = storage.negated([torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params])
    searched = direction if along == "direction" else residual
    products = storage.trial_products(new_residual, residual, searched)
    r, p, r_plus = (torch.cat([t.reshape(-1) for t in ts]) for ts in (residual, direction, new_residual))
    along_searched = float(r_plus @ (p if along == "direction" else r))
    assert products == pytest.approx((float(r_plus @ r_plus), float(r_plus @ r), along_searched), rel=1e-14)
    assert float(r_plus @ p) != pytest.approx(float(r_plus @ r))  # reading the other vector would fail the test


def test_negated_gradients_land_in_the_flat_buffer_of_r_plus():
    params = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    gradients = [
        torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=torch.float64),
        torch.tensor([5.0, 6.0, -7.0], dtype=torch.float64),
    ]
    state: defaultdict = defaultdict(dict)
    storage = _StateVectors()
    storage.start(state, params, gradients, memory=1)
    (new_residual,) = storage.negated(gradients)
    assert new_residual is storage.flat.new_residual
    assert new_residual.tolist() == [-1.0, 2.0, -3.0, -4.0, -5.0, -6.0, 7.0]
    assert gradients[0].tolist() == [[1.0, -2.0], [3.0, 4.0]]  # the gradients themselves are left as they are


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_squared_norms_of_r_and_p_are_taken_through_numpy_in_float64_and_equal_the_torch_ones(dtype):
    generator = torch.Generator().manual_seed(3)
    params = [torch.zeros(3, 4, dtype=dtype), torch.zeros(5, dtype=dtype)]
    state: dict = {p: {} for p in params}
    storage = _StateVectors()
    gradients = [torch.randn(p.shape, generator=generator, dtype=dtype) for p in params]
    storage.start(state, params, gradients, memory=2)
    residual, direction = storage.residual_and_direction(state, params)
    assert (storage.flat.host_rows is not None) == (dtype == torch.float64)
    for vector in (residual, direction):
        assert storage.squared_norm(vector) == pytest.approx(vec.squared_norm(vector), rel=1e-14)
    assert storage.squared_norm(gradients) == vec.squared_norm(gradients)  # not r or p: torch's
