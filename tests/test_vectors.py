"""The tensor-list vector helpers of ``moller_scg._vectors`` against float64 NumPy and against the per-tensor torch
ops they promise to reproduce bit for bit; complex tensors count as their real and imaginary parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moller_scg import _vectors


def vector(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A vector of three tensors of different shapes (a matrix, a vector, a scalar), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in [(3, 4), (5,), ()]]


def as_numpy(xs: list[torch.Tensor]) -> np.ndarray:
    """The real numbers of a tensor-list vector, flat, in float64 (complex as real and imaginary parts)."""
    return np.concatenate([np.asarray(torch.view_as_real(x) if x.is_complex() else x).ravel() for x in xs]).astype(
        np.float64
    )


def test_dots_equals_separate_dot_calls_bit_for_bit():
    x, y, u, v = (vector(seed) for seed in range(4))
    assert _vectors.dots([(x, y), (u, v), (x, x)]) == [_vectors.dot(x, y), _vectors.dot(u, v), _vectors.dot(x, x)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_dots_of_one_tensor_vectors_take_the_generic_paths_bits(dtype):
    """SCG's flat buffers are one-tensor vectors: their shortcut gives the bits of the per-device reduction."""
    generator = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(1000, generator=generator, dtype=dtype) for _ in range(3))
    pairs = [([x], [y]), ([x], [x]), ([z], [y])]
    generic = _vectors._totals([_vectors._partial_dots(xs, ys) for xs, ys in pairs])
    shortcut = _vectors.dots(pairs)
    assert shortcut == generic
    assert _vectors.dots([]) == []  # no products: no reduction, as before the shortcut
    assert shortcut[1] == pytest.approx(float(np.sum(as_numpy([x]) ** 2)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_one_sum_of_one_tensor_has_the_bits_of_the_per_device_reduction(dtype):
    """|r|₁ or one product of SCG's flat buffers is read with ``item()``: the bits of stacking and summing it."""
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1000, generator=generator, dtype=dtype) for _ in range(2))
    for partial in (_vectors._float64_sum_in_pieces(torch.abs, x), _vectors._float64_dot(x, y)):
        assert _vectors._totals([[partial]]) == torch.stack([torch.stack([partial]).sum()]).tolist()
    assert _vectors.l1_norm([x]) == float(torch.sum(torch.abs(_vectors.as_real(x)), dtype=torch.float64))


def test_dot_is_the_float64_sum_of_the_elementwise_products():
    x, y = vector(0, torch.float64), vector(1, torch.float64)
    assert _vectors.dot(x, y) == pytest.approx(float(np.dot(as_numpy(x), as_numpy(y))), rel=1e-14)


@pytest.mark.parametrize("one_tensor", [True, False])
def test_a_tensor_larger_than_the_chunk_is_summed_piece_by_piece(monkeypatch, one_tensor):
    # Above DOT_CHUNK numbers the product is formed and summed in pieces (float64 sums of the pieces, then their
    # float64 sum): exactly the pieces' sum as written out here (a lost or doubled piece shows), and within float64
    # rounding of the whole sum.
    generator = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 25, generator=generator) for _ in range(2))
    monkeypatch.setattr(_vectors, "DOT_CHUNK", 7)
    vectors = ([x], [y]) if one_tensor else ([x, y[0]], [y, x[0]])
    (result,) = _vectors.dots([vectors])

    def piecewise(a, b):
        a, b = a.reshape(-1), b.reshape(-1)
        return torch.stack([torch.sum(p * q, dtype=torch.float64) for p, q in zip(a.split(7), b.split(7))]).sum()

    expected = torch.stack([piecewise(a, b) for a, b in zip(*vectors)]).sum()
    assert result == float(expected)
    whole = sum(float(torch.sum(a * b, dtype=torch.float64)) for a, b in zip(*vectors))
    assert result == pytest.approx(whole, rel=1e-12, abs=1e-12)


def test_l1_norm_and_all_finite_of_a_tensor_larger_than_the_chunk_work_piece_by_piece(monkeypatch):
    # Above DOT_CHUNK numbers |x| and the finiteness test are formed and summed in pieces (no temporary of the whole
    # tensor): the pieces' float64 sums, then their sum, exactly; a non-finite number in the last piece is seen.
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 25, generator=generator)
    monkeypatch.setattr(_vectors, "DOT_CHUNK", 7)
    pieces = torch.stack([torch.sum(piece.abs(), dtype=torch.float64) for piece in x.reshape(-1).split(7)])
    assert _vectors.l1_norm([x]) == float(pieces.sum())
    assert _vectors.l1_norm([x]) == pytest.approx(float(torch.sum(x.abs(), dtype=torch.float64)), rel=1e-12)
    assert _vectors.all_finite([x])
    x[-1, -1] = float("nan")
    assert not _vectors.all_finite([x])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_norm_against_numpy(dtype):
    x = vector(0, dtype)
    # The elementwise squares are rounded to the tensors' dtype before the float64 sum.
    rel = 1e-6 if dtype == torch.float32 else 1e-14
    assert _vectors.squared_norm(x) == pytest.approx(float(np.sum(as_numpy(x) ** 2)), rel=rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_norm_against_numpy(dtype):
    x = vector(0, dtype)
    # |xᵢ| is exact in any dtype, so only the float64 summation order differs from NumPy's.
    assert _vectors.l1_norm(x) == pytest.approx(float(np.sum(np.abs(as_numpy(x)))), rel=1e-14)


def test_complex_tensors_count_as_their_real_and_imaginary_parts():
    x = [torch.tensor([3 + 4j, -1 - 2j], dtype=torch.complex128), torch.tensor([-0.5], dtype=torch.float64)]
    y = [torch.tensor([1 + 1j, 2 - 1j], dtype=torch.complex128), torch.tensor([2.0], dtype=torch.float64)]
    # ℂ² as ℝ⁴: (3, 4, −1, −2)·(1, 1, 2, −1) = 3 + 4 − 2 + 2 = 7, plus −0.5·2.
    assert _vectors.dot(x, y) == 6.0
    assert _vectors.squared_norm(x) == 9 + 16 + 1 + 4 + 0.25
    # |x|₁ over the real numbers (|3| + |4| + |−1| + |−2| + |−0.5|), not the complex moduli (5 + √5 + 0.5).
    assert _vectors.l1_norm(x) == 10.5


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_all_finite_sees_a_non_finite_element_in_any_of_several_tensors(bad, where):
    x = vector(0)
    assert _vectors.all_finite(x)
    x[where].view(-1)[-1] = bad
    assert not _vectors.all_finite(x)


@pytest.mark.parametrize("part", ["real", "imag"])
def test_all_finite_sees_a_non_finite_imaginary_or_real_part(part):
    x = [torch.zeros(3, dtype=torch.complex64)]
    assert _vectors.all_finite(x)
    getattr(x[0], part)[1] = float("nan")
    assert not _vectors.all_finite(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 1 / 3, -2.7182818])
def test_scale_add_equals_y_plus_beta_x_bit_for_bit(dtype, beta):
    x, y = vector(0, dtype), vector(1, dtype)
    expected = [yi + beta * xi for xi, yi in zip(x, y)]
    _vectors.scale_add_(x, beta, y)
    for actual, wanted in zip(x, expected):
        assert actual.dtype == dtype
        assert torch.equal(actual, wanted)


def test_add_is_x_plus_alpha_y_in_place():
    x, y = vector(0, torch.float64), vector(1, torch.float64)
    expected = [xi + 0.25 * yi for xi, yi in zip(x, y)]
    storage = [xi.data_ptr() for xi in x]
    _vectors.add_(x, y, 0.25)
    assert [xi.data_ptr() for xi in x] == storage
    assert all(torch.equal(a, e) for a, e in zip(x, expected))


def test_copy_writes_the_sources_bits_into_the_targets_in_place():
    targets, sources = vector(0), vector(1)
    storage = [t.data_ptr() for t in targets]
    _vectors.copy_(targets, sources)
    assert [t.data_ptr() for t in targets] == storage
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))


def test_clone_is_a_detached_copy_with_the_same_dtype_and_device():
    x = [torch.randn(3, requires_grad=True), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.complex64)]
    copies = _vectors.clone(x)
    for original, copy in zip(x, copies):
        assert torch.equal(copy, original.detach())
        assert copy.dtype == original.dtype and copy.device == original.device and copy.shape == original.shape
        assert not copy.requires_grad and copy.grad_fn is None
        assert copy.data_ptr() != original.data_ptr()
    copies[1].add_(1.0)
    assert torch.equal(x[1], torch.ones(2, dtype=torch.float64))


def test_negated_is_minus_x_as_new_tensors():
    x = vector(0, torch.float64) + [torch.tensor([1 - 2j], dtype=torch.complex128)]
    original = _vectors.clone(x)
    negatives = _vectors.negated(x)
    for value, negative, before in zip(x, negatives, original):
        assert torch.equal(negative, -before)
        assert torch.equal(value, before)
        assert negative.data_ptr() != value.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_l1_norm_of_one_tensor_has_the_bits_of_the_sum_over_several(dtype):
    # One tensor (SCG's flat buffer) skips the per-device totals; an empty second tensor adds an exact zero there.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    assert _vectors.l1_norm([x]) == _vectors.l1_norm([x, x.new_zeros(0)])
