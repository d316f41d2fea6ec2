"""``moller_scg.scg_storage``: where SCG keeps r and p (per parameter, or flat buffers whose views
``optimizer.state`` holds) and the inner products it remembers of them."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

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
