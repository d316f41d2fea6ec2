"""moller_scg.pair_arithmetic: each operation gives the same numbers on NumPy views of a small CPU block as on its
torch tensors (to rounding: two BLAS libraries may sum in other orders), and writes where it is told to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moller_scg import pair_arithmetic as arithmetic

TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def as_torch(result) -> torch.Tensor:
    return torch.from_numpy(np.asarray(result)) if not isinstance(result, torch.Tensor) else result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_views_and_torch_tensors_give_the_same_numbers(dtype):
    generator = torch.Generator().manual_seed(0)
    rows, stack = (
        torch.randn(3, 37, generator=generator, dtype=dtype),
        torch.randn(5, 37, generator=generator, dtype=dtype),
    )
    diagonal = torch.rand(37, generator=generator, dtype=dtype)
    coefficients = np.random.default_rng(1).standard_normal(5)
    results = {}
    for path in ("numpy", "torch"):
        r, s, d = arithmetic.working([rows.clone(), stack.clone(), diagonal.clone()], path == "numpy")
        out = arithmetic.working([torch.empty(37, dtype=dtype)], path == "numpy")[0]
        products = arithmetic.row_products(r, s)
        squares = arithmetic.scaled_squares(s, d)
        added = arithmetic.add_product(r[0], s, coefficients, 0.5, out=out)
        assert added is out or np.shares_memory(added, out)
        in_place = arithmetic.add_product(r[1], s, coefficients, out=r[1])  # out may be the vector itself
        assert in_place is r[1] or np.shares_memory(in_place, r[1])
        results[path] = [as_torch(x).clone() for x in (products, squares, added, r[1])]
        assert results[path][0].dtype == results[path][1].dtype == torch.float64  # sums come back in float64
    expected_added = 0.5 * rows[0] + torch.from_numpy(coefficients).to(dtype) @ stack
    torch.testing.assert_close(results["torch"][2], expected_added, **TOLERANCE[dtype])
    for numpy_result, torch_result in zip(results["numpy"], results["torch"]):
        torch.testing.assert_close(numpy_result, torch_result, **TOLERANCE[dtype])


def test_the_blocks_numpy_takes():
    assert arithmetic.on_host(torch.zeros(2, 4, arithmetic.HOST_ARITHMETIC_MAX // 8, dtype=torch.float32))
    assert not arithmetic.on_host(torch.zeros(2, 4, arithmetic.HOST_ARITHMETIC_MAX // 8 + 1))
    assert not arithmetic.on_host(torch.zeros(2, 3, 4, dtype=torch.float16))


def test_working_views_share_the_tensors_memory():
    t = torch.zeros(2, 4, dtype=torch.float64)
    (view,) = arithmetic.working([t], host=True)
    arithmetic.multiply(view[1], 0.0, out=view[0])
    view[1, 2] = 3.0
    assert t[1, 2] == 3.0
    assert arithmetic.working([t], host=False)[0] is t
    assert arithmetic.summed_on_host([np.ones(3), np.ones(3)]).tolist() == [2.0, 2.0, 2.0]
    assert arithmetic.summed_on_host([torch.ones(3, dtype=torch.float64)] * 2).tolist() == [2.0, 2.0, 2.0]


def test_a_product_into_a_strided_vector_lands_there():
    """BLAS writes in place only into a contiguous vector: a strided ``out`` gets the result all the same."""
    rows, coefficients = np.arange(12.0).reshape(3, 4), np.array([1.0, -2.0, 0.5])
    vector = np.ones(4)
    storage = np.zeros((4, 2))
    out = storage[:, 1]
    assert arithmetic.add_product(vector, rows, coefficients, 2.0, out=out) is out
    np.testing.assert_allclose(storage[:, 1], 2.0 * vector + coefficients @ rows)
    assert not storage[:, 0].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_are_formed_in_float32_a_piece_at_a_time(monkeypatch, dtype):
    """Pieces of PRODUCT_PIECE columns (4 here): the float32 copies hold pieces, not the stack of rows; entries
    beyond 256 square past float16's 65504."""
    monkeypatch.setattr(arithmetic, "PRODUCT_PIECE", 4)
    monkeypatch.setattr(arithmetic.vec, "DOT_CHUNK", 4)
    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(3, 10, generator=generator) * 300).to(dtype)
    other = (torch.randn(2, 10, generator=generator) * 300).to(dtype)
    diagonal = torch.rand(10, generator=generator).to(dtype)
    torch.testing.assert_close(
        arithmetic.row_products(rows, other), rows.double() @ other.double().T, rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        arithmetic.scaled_squares(rows, diagonal), (rows.double() ** 2) @ diagonal.double(), rtol=1e-6, atol=0
    )
    vector = (torch.randn(10, generator=generator) * 300).to(dtype)
    small_rows = (torch.randn(3, 10, generator=generator) * 0.01).to(dtype)
    coefficients = np.array([1.0e5, -7.0e4, 9.0e4])  # beyond 65504 themselves: float16 would make them inf
    c = torch.tensor(coefficients, dtype=torch.float32)
    expected = (0.5 * vector.float() + small_rows.float().T @ c).to(dtype)
    result = arithmetic.add_product(vector, small_rows, coefficients, 0.5)
    assert result.dtype == dtype and torch.isfinite(result).all()
    torch.testing.assert_close(result.float(), expected.float(), rtol=1e-2, atol=0)
    into_itself = vector.clone()
    assert arithmetic.add_product(into_itself, small_rows, coefficients, 0.5, out=into_itself) is into_itself
    assert torch.equal(into_itself, result)
