"""``moller_scg.flat_vector``: the layout of the parameters in one flat buffer (which parameters fit it, gathering
into it, per-parameter views of it) and SCG's flat r, p and accepted w with their cached views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moller_scg import _vectors as vec
from moller_scg.flat_vector import FUSED_PRODUCTS_MAX, FlatBuffers, FlatLayout

SHAPES = [(2, 3), (4,), ()]


def params(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Three tensors of different shapes holding 1, 2, …, 11 in order (so their flat layout is 1, …, 11)."""
    values = torch.arange(1, 12, dtype=dtype)
    return [piece.reshape(shape).clone() for piece, shape in zip(values.split([6, 4, 1]), SHAPES)]


def test_one_dtype_on_one_device_fits():
    assert FlatLayout.fits(params())
    assert FlatLayout.fits([torch.zeros(3, dtype=torch.float32)])


@pytest.mark.parametrize(
    "tensors",
    [
        [],
        [torch.zeros(2, dtype=torch.complex64)],
        [torch.zeros(2), torch.zeros(2, dtype=torch.complex64)],
        [torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)],
    ],
    ids=["empty", "complex", "real-and-complex", "two-dtypes"],
)
def test_what_does_not_fit_one_buffer(tensors):
    assert not FlatLayout.fits(tensors)


def test_a_layout_refuses_parameters_that_do_not_fit():
    with pytest.raises(ValueError, match="one device and dtype"):
        FlatLayout([torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)])


def test_matches_the_same_shapes_dtype_and_order_only():
    layout = FlatLayout(params())
    assert layout.matches(params())
    assert layout.matches([torch.zeros(shape, dtype=torch.float64) for shape in SHAPES])
    assert not layout.matches(params(torch.float32))
    assert not layout.matches(params()[::-1])
    assert not layout.matches(params()[:2])
    assert not layout.matches([torch.zeros(3, 2, dtype=torch.float64), *params()[1:]])
    assert not layout.matches([])


def test_empty_is_a_flat_buffer_of_n_numbers_in_the_layouts_dtype():
    buffer = FlatLayout(params(torch.float32)).empty()
    assert buffer.shape == (11,) and buffer.dtype == torch.float32


def test_gather_lays_the_tensors_out_one_after_the_other():
    layout = FlatLayout(params())
    expected = torch.arange(1, 12, dtype=torch.float64)
    assert torch.equal(layout.gather(params()), expected)
    out = layout.empty()
    returned = layout.gather(params(), out=out)
    assert torch.equal(out, expected)
    assert returned.data_ptr() == out.data_ptr()


def test_views_have_the_parameters_shapes_and_write_through_to_the_flat_buffer():
    layout = FlatLayout(params())
    flat = torch.arange(1, 12, dtype=torch.float64)
    views = layout.views(flat)
    assert [v.shape for v in views] == [torch.Size(shape) for shape in SHAPES]
    assert all(torch.equal(v, p) for v, p in zip(views, params()))
    views[1][2] = -7.0
    views[2].fill_(-11.0)
    assert flat[6 + 2] == -7.0 and flat[10] == -11.0
    flat[0] = 100.0
    assert views[0][0, 0] == 100.0


@pytest.mark.parametrize("shapes", [SHAPES, [(3, 0, 2), (5,), (), (0,), (2, 1, 3)]], ids=["three", "empty-ones"])
def test_views_of_a_row_of_a_matrix_are_the_split_views_with_contiguous_strides(shapes):
    # SCG's r, p and r₊ are rows of one (4, n) buffer: their views start at the row's offset in the storage, and have
    # the strides torch gives a contiguous tensor of the parameter's shape (also for a parameter with no numbers).
    tensors = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    layout = FlatLayout(tensors)
    rows = torch.arange(4.0 * sum(t.numel() for t in tensors), dtype=torch.float64).reshape(4, -1)
    for row in rows.unbind(0):
        views = layout.views(row)
        split = [piece.view(shape) for piece, shape in zip(row.split(layout.numels), shapes)]
        for view, expected in zip(views, split):
            assert view.shape == expected.shape and view.stride() == torch.zeros(view.shape).stride()
            assert view.data_ptr() == expected.data_ptr() and torch.equal(view, expected)
        views[0].add_(1.0)  # writes through to the row
        assert torch.equal(split[0], views[0])


def test_views_of_a_strided_flat_vector_are_its_pieces():
    layout = FlatLayout(params())
    flat = torch.arange(1, 23, dtype=torch.float64)[::2]  # 1, 3, …, 21: not contiguous
    views = layout.views(flat)
    assert all(torch.equal(v, 2 * p - 1) for v, p in zip(views, params()))
    views[2].fill_(-1.0)
    assert flat[10] == -1.0


def test_row_views_are_each_rows_views_for_every_parameter():
    layout = FlatLayout(params())
    block = torch.arange(3 * 11, dtype=torch.float64).reshape(3, 11)
    per_parameter = layout.row_views(block)
    assert len(per_parameter) == len(params())
    for row in range(3):
        expected = layout.views(block[row])
        got = [views[row] for views in per_parameter]
        assert all(torch.equal(a, b) and a.shape == b.shape and a.stride() == b.stride() for a, b in zip(got, expected))
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(got, expected))
    per_parameter[2][1].fill_(-1.0)  # the third parameter's view in the second row writes into the block
    assert block[1, 10] == -1.0 and block[0, 10] == 10.0
    offset_block = torch.arange(4 * 11, dtype=torch.float64).reshape(4, 11)[1:]  # a block not at its storage's start
    assert torch.equal(layout.row_views(offset_block)[0][0], offset_block[0, :6].view(2, 3))
    transposed = torch.arange(3 * 11, dtype=torch.float64).reshape(11, 3).T  # not contiguous: row by row
    for row in range(3):
        expected = layout.views(transposed[row])
        assert all(torch.equal(views[row], e) for views, e in zip(layout.row_views(transposed), expected))


def test_the_copy_of_w_before_a_trial_leaves_r_and_p_unwritten():
    """SCG reuses |r|², μ and |p|² while r and p keep their versions: the accepted w must not share their storage (a
    view shares its base's version counter)."""
    weights = params()
    buffers = FlatBuffers(FlatLayout(weights))
    versions = [t._version for t in (buffers.residual, buffers.direction)]
    vec.copy_(buffers.accepted_views, weights)
    assert [t._version for t in (buffers.residual, buffers.direction)] == versions


def test_per_parameter_returns_the_cached_views_of_residual_and_direction():
    buffers = FlatBuffers(FlatLayout(params()))
    assert buffers.per_parameter(buffers.residual) is buffers.residual_views
    assert buffers.per_parameter(buffers.direction) is buffers.direction_views
    buffers.residual.copy_(torch.arange(1, 12, dtype=torch.float64))
    assert all(torch.equal(v, p) for v, p in zip(buffers.residual_views, params()))


def test_per_parameter_of_another_flat_vector_gives_its_own_views():
    buffers = FlatBuffers(FlatLayout(params()))
    other = torch.arange(1, 12, dtype=torch.float64)
    views = buffers.per_parameter(other)
    assert views is not buffers.residual_views and views is not buffers.direction_views
    views[0][0, 0] = -1.0
    assert other[0] == -1.0


def test_the_buffers_are_distinct_and_r_p_r_plus_y_are_the_rows_of_one():
    buffers = FlatBuffers(FlatLayout(params()))
    vectors = [buffers.change, buffers.direction, buffers.new_residual, buffers.residual, buffers.accepted]
    assert len({v.data_ptr() for v in vectors}) == 5
    buffers.accepted_views[2].fill_(5.0)
    assert buffers.accepted[10] == 5.0
    buffers.rows.copy_(torch.arange(44, dtype=torch.float64).reshape(4, 11))
    assert torch.equal(buffers.residual, torch.arange(33, 44, dtype=torch.float64))
    assert torch.equal(buffers.pair_rows, buffers.rows[:3])
    assert buffers.new_residual_views[1].tolist() == [28.0, 29.0, 30.0, 31.0]


@pytest.mark.parametrize("n", [11, 501, FUSED_PRODUCTS_MAX])
def test_the_fused_float32_products_have_the_bits_of_one_product_at_a_time(n):
    generator = torch.Generator().manual_seed(n)
    buffers = FlatBuffers(FlatLayout([torch.zeros(n, dtype=torch.float32)]))
    assert buffers.fuses_products and buffers.host_rows is None
    buffers.rows.copy_(torch.randn(4, n, generator=generator, dtype=torch.float32) * 1e3)
    r, p, r_plus = [buffers.residual], [buffers.direction], [buffers.new_residual]
    assert buffers.products_with_new_residual() == vec.dots([(r_plus, p), (r_plus, r_plus), (r_plus, r)])
    assert buffers.products_with_direction() == vec.dots([(p, p), (p, r_plus)])


@pytest.mark.parametrize("n", [11, 501, FUSED_PRODUCTS_MAX])
def test_the_fused_float64_products_are_numpys_through_a_view_of_the_rows(n):
    generator = torch.Generator().manual_seed(n)
    buffers = FlatBuffers(FlatLayout([torch.zeros(n, dtype=torch.float64)]))
    assert buffers.host_rows is not None and np.shares_memory(buffers.host_rows, buffers.rows.numpy())
    buffers.rows.copy_(torch.randn(4, n, generator=generator, dtype=torch.float64) * 1e3)
    r, p, r_plus = [buffers.residual], [buffers.direction], [buffers.new_residual]
    expected_new = vec.dots([(r_plus, p), (r_plus, r_plus), (r_plus, r)])
    expected_direction = vec.dots([(p, p), (p, r_plus)])
    # BLAS adds in another order than torch's sum: equal to rounding (|x||y| bounds each product's error).
    scale = 1e-13 * 1e6 * n
    assert buffers.products_with_new_residual() == pytest.approx(expected_new, rel=0, abs=scale)
    assert buffers.products_with_direction() == pytest.approx(expected_direction, rel=0, abs=scale)
    assert buffers.products_with_direction() == (buffers.rows[1:3].numpy() @ buffers.rows[1].numpy()).tolist()


def test_longer_vectors_take_their_products_one_at_a_time():
    assert not FlatBuffers(FlatLayout([torch.zeros(FUSED_PRODUCTS_MAX + 1)])).fuses_products


def test_is_held_by_a_state_of_its_own_views_and_not_once_a_state_tensor_is_replaced():
    weights = params()
    buffers = FlatBuffers(FlatLayout(weights))
    views = zip(weights, buffers.residual_views, buffers.direction_views)
    state = {p: {"residual": r, "direction": d} for p, r, d in views}
    assert buffers.is_held_by(state, weights)
    # An equal tensor that is not the view (as after load_state_dict or by hand) does not count.
    for name in ("residual", "direction"):
        replaced = {p: dict(entries) for p, entries in state.items()}
        replaced[weights[1]][name] = state[weights[1]][name].clone()
        assert not buffers.is_held_by(replaced, weights)
    swapped = {p: {"residual": e["direction"], "direction": e["residual"]} for p, e in state.items()}
    assert not buffers.is_held_by(swapped, weights)
    assert not buffers.is_held_by({p: e for p, e in state.items() if p is not weights[0]}, weights)
    # Parameters of another layout: fewer, another shape, another dtype.
    assert not buffers.is_held_by(state, weights[:2])
    reshaped = [weights[0].reshape(-1), *weights[1:]]
    assert not buffers.is_held_by({q: state[p] for q, p in zip(reshaped, weights)}, reshaped)
    single = [p.float() for p in weights]
    assert not buffers.is_held_by({q: state[p] for q, p in zip(single, weights)}, single)
    complex_weights = [torch.complex(p, p) for p in weights]
    assert not buffers.is_held_by({q: state[p] for q, p in zip(complex_weights, weights)}, complex_weights)
