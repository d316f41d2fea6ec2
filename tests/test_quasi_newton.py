"""moller_scg.quasi_newton: the compact L-BFGS inverse against the two-loop recursion, written independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_scg import two_loop

from moller_scg.quasi_newton import SecantPairs, _solve_upper

SHAPES = [(3, 4), (5,), (2, 1, 3)]
N = sum(torch.Size(shape).numel() for shape in SHAPES)


def split(x: torch.Tensor, shapes=SHAPES) -> list[torch.Tensor]:
    pieces, offset = [], 0
    for shape in shapes:
        size = torch.Size(shape).numel()
        pieces.append(x[offset : offset + size].reshape(shape).clone())
        offset += size
    return pieces


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def spd(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("diagonal_scaling", [False, True])
@pytest.mark.parametrize("memory, pushes", [(1, 1), (3, 2), (4, 4), (4, 11)])
def test_inverse_product_equals_the_two_loop_recursion(memory, pushes, diagonal_scaling, arithmetic_path):
    """H₀ = γI, or with diagonal scaling H₀ = γ_D Λ from the gradients observed between the pushes."""
    n = sum(torch.Size(s).numel() for s in SHAPES)
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(n, seed=memory + pushes)
    generator = torch.Generator().manual_seed(7)
    pairs, kept = SecantPairs(params, memory, diagonal_scaling=diagonal_scaling), []
    pairs.start_scaling(split(torch.randn(n, generator=generator, dtype=torch.float64)))
    for _ in range(pushes):
        s = torch.randn(n, generator=generator, dtype=torch.float64)
        y = hessian @ s
        pairs.observe(split(torch.randn(n, generator=generator, dtype=torch.float64) * 10))
        assert pairs.push(split(s), split(y))
        kept = (kept + [(s, y)])[-memory:]
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    result = pairs.inverse_product(split(v))
    assert pairs.on_host == (arithmetic_path == "numpy")
    assert [t.shape for t in result] == [torch.Size(s) for s in SHAPES]
    scale = pairs.scaling.diagonal[0] if diagonal_scaling else None
    torch.testing.assert_close(flat(result), two_loop(kept, v, scale), rtol=1e-12, atol=1e-14)
    if diagonal_scaling:  # and not the scalar H₀'s
        assert not torch.allclose(flat(result), two_loop(kept, v), rtol=1e-3)
    assert len(pairs) == min(memory, pushes)


def test_no_pair_means_identity_and_a_copy():
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    pairs = SecantPairs(params, 3)
    v = split(torch.arange(N, dtype=torch.float64))
    result = pairs.inverse_product(v)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(result, v))


def test_a_pair_without_positive_curvature_is_not_kept():
    params = [torch.zeros(4, dtype=torch.float64)]
    pairs = SecantPairs(params, 2)
    s = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert not pairs.push([s], [-s])  # sᵀy < 0
    assert not pairs.push([s], [torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)])  # sᵀy = 0
    assert not pairs.push([s], [torch.zeros(4, dtype=torch.float64)])  # y = 0
    assert len(pairs) == 0
    assert pairs.push([s], [2 * s]) and len(pairs) == 1


def test_inverse_satisfies_the_newest_secant_equation():
    """H y = s for the newest pair: what makes H a quasi-Newton inverse."""
    n = N
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(n, seed=3)
    pairs = SecantPairs(params, 5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        s = torch.randn(n, generator=generator, dtype=torch.float64)
        y = hessian @ s
        pairs.push(split(s), split(y))
    torch.testing.assert_close(flat(pairs.inverse_product(split(y))), s, rtol=1e-10, atol=1e-12)


def test_complex_and_mixed_dtype_parameters(arithmetic_path):
    """Complex parameters count as real pairs; float32 and float64 parameters form separate blocks."""
    params = [
        torch.zeros(3, dtype=torch.complex128),
        torch.zeros(2, 2, dtype=torch.float32),
        torch.zeros(4, dtype=torch.float64),
    ]
    pairs = SecantPairs(params, 3)
    assert len(pairs.blocks) == 2
    n = 6 + 4 + 4
    hessian = spd(n, seed=5)
    generator = torch.Generator().manual_seed(2)

    def as_params(x: torch.Tensor) -> list[torch.Tensor]:
        return [
            torch.view_as_complex(x[:6].reshape(3, 2).clone()),
            x[6:10].reshape(2, 2).float(),
            x[10:].clone(),
        ]

    kept = []
    for _ in range(4):
        s = torch.randn(n, generator=generator, dtype=torch.float64)
        s[6:10] = s[6:10].float().double()  # exactly representable in float32, so the pairs agree
        y = hessian @ s
        y[6:10] = y[6:10].float().double()
        assert pairs.push(as_params(s), as_params(y))
        kept = (kept + [(s, y)])[-3:]
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    v[6:10] = v[6:10].float().double()
    result = pairs.inverse_product(as_params(v))
    assert result[0].dtype == torch.complex128 and result[1].dtype == torch.float32
    got = torch.cat([torch.view_as_real(result[0]).reshape(-1), result[1].double().reshape(-1), result[2]])
    torch.testing.assert_close(got, two_loop(kept, v), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_gives_the_same_products(arithmetic_path):
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    pairs = SecantPairs(params, 3)
    hessian = spd(N, seed=9)
    generator = torch.Generator().manual_seed(4)
    for _ in range(5):
        s = torch.randn(N, generator=generator, dtype=torch.float64)
        pairs.push(split(s), split(hessian @ s))
    state = pairs.state_dict()
    copy = SecantPairs(params, 3)
    copy.load_state_dict(state)
    v = split(torch.randn(N, generator=generator, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(pairs.inverse_product(v), copy.inverse_product(v)))
    with pytest.raises(ValueError, match="memory=4"):
        SecantPairs(params, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="memory=3"):
        SecantPairs([torch.zeros(5, dtype=torch.float64)], 3).load_state_dict(state)


def test_advance_equals_push_then_inverse_product(arithmetic_path):
    """SCG's one-synchronisation step: the same pairs and the same H r₊ as push followed by inverse_product, also
    when the pair fails the curvature condition and when the memory wraps around."""
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(N, seed=11)
    generator = torch.Generator().manual_seed(5)
    fused, separate = SecantPairs(params, 3), SecantPairs(params, 3)
    for k in range(7):
        direction = torch.randn(N, generator=generator, dtype=torch.float64)
        residual = torch.randn(N, generator=generator, dtype=torch.float64)
        alpha = 0.5
        change = hessian @ (alpha * direction) if k != 2 else -(alpha * direction)  # k = 2: negative curvature
        new_residual = residual - change
        result = fused.advance(split(direction), alpha, split(residual), split(new_residual))
        kept = separate.push(split(alpha * direction), split(residual - new_residual))
        expected = separate.inverse_product(split(new_residual))
        assert kept == (k != 2)
        assert fused.slots == separate.slots
        torch.testing.assert_close(flat(result), flat(expected), rtol=1e-12, atol=1e-14)


def test_gamma_is_the_largest_curvature_ratio_of_the_pairs_held():
    """γ = maxᵢ sᵢᵀyᵢ / yᵢᵀyᵢ over the held pairs (not the newest pair's, L-BFGS's usual choice), also after the
    oldest pair was dropped."""
    params = [torch.zeros(2, dtype=torch.float64)]
    pairs = SecantPairs(params, 2)
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert pairs.push([e1], [4.0 * e1])  # sᵀy / yᵀy = 1/4
    assert pairs.push([e2], [0.5 * e2])  # 2, the largest
    assert pairs.push([e1], [8.0 * e1])  # 1/8, the newest; drops the first pair
    assert pairs.gamma == pytest.approx(2.0, rel=1e-15)
    assert pairs.push([e1], [16.0 * e1])  # drops the pair of ratio 2
    assert pairs.gamma == pytest.approx(1 / 8, rel=1e-15)


def test_the_pairs_in_their_order_are_the_slots_reordered_after_every_push():
    # The ordered R and YᵀY (and γ's ratios) are kept up to date as pairs come and go: after every push, with the
    # oldest pair dropped 4 times, and after a clear, they equal what reordering sy and yy by the slots gives.
    n = sum(torch.Size(s).numel() for s in SHAPES)
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(n, seed=3)
    generator = torch.Generator().manual_seed(11)
    pairs, reloaded = SecantPairs(params, 4), SecantPairs(params, 4)
    for push in range(12):
        if push == 7:
            pairs.clear()
        step = torch.randn(n, generator=generator, dtype=torch.float64)
        assert pairs.push(split(step), split(hessian @ step))
        reloaded.load_state_dict(pairs.state_dict())  # orders the pairs from sy, yy and the slots afresh
        held = len(pairs.slots)
        assert held == min(4, push + 1 if push < 7 else push - 6)
        assert (pairs._order == reloaded._order).all() and list(pairs._order) == pairs.slots
        assert (pairs._ordered_r[:held, :held] == reloaded._ordered_r[:held, :held]).all()
        assert (pairs._ordered_yy[:held, :held] == reloaded._ordered_yy[:held, :held]).all()
        assert pairs._ratios == reloaded._ratios and pairs.gamma == reloaded.gamma


def test_while_the_stacks_fill_the_products_read_only_the_pairs_held(arithmetic_path):
    # The empty rows of the stacks hold NaN here: a product over all m rows (a zero coefficient times NaN) would
    # spread it into H v and the inner products. Also after a clear, when rows 1 … m − 1 hold stale pairs.
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(N, seed=13)
    generator = torch.Generator().manual_seed(8)
    memory = 5
    pairs, kept = SecantPairs(params, memory), []
    for push in range(7):
        if push == 4:
            pairs.clear()
            kept = []
        (block,) = pairs.blocks
        block[:, len(pairs.slots) :] = float("nan")
        direction = torch.randn(N, generator=generator, dtype=torch.float64)
        residual = torch.randn(N, generator=generator, dtype=torch.float64)
        new_residual = residual - hessian @ (0.5 * direction)
        result = pairs.advance(split(direction), 0.5, split(residual), split(new_residual))
        kept = (kept + [(0.5 * direction, residual - new_residual)])[-memory:]
        torch.testing.assert_close(flat(result), two_loop(kept, new_residual), rtol=1e-12, atol=1e-14)
        held = len(pairs.slots)
        assert np.isfinite(pairs.sy[:held, :held]).all() and np.isfinite(pairs.yy[:held, :held]).all()


def test_pairs_loaded_out_of_slot_order_before_the_stacks_are_full_still_give_h_v():
    # A state_dict whose slots are not 0, 1, … in order (not one SecantPairs writes, but valid): the products then
    # read all m rows, whose empty ones are zero.
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(N, seed=14)
    generator = torch.Generator().manual_seed(9)
    steps = [torch.randn(N, generator=generator, dtype=torch.float64) for _ in range(2)]
    state = SecantPairs(params, 4).state_dict()
    for slot, step in zip((2, 0), steps):
        state["blocks"][0][0, slot], state["blocks"][0][1, slot] = step, hessian @ step
    stacked_s = torch.stack([steps[1], torch.zeros(N), steps[0], torch.zeros(N)]).double()
    stacked_y = stacked_s @ hessian.T
    state["slots"] = [2, 0]
    state["sy"], state["yy"] = stacked_s @ stacked_y.T, stacked_y @ stacked_y.T
    pairs = SecantPairs(params, 4)
    pairs.load_state_dict(state)
    v = torch.randn(N, generator=generator, dtype=torch.float64)
    expected = two_loop([(step, hessian @ step) for step in steps], v)
    torch.testing.assert_close(flat(pairs.inverse_product(split(v))), expected, rtol=1e-12, atol=1e-14)


def test_products_with_vectors_longer_than_the_chunk_are_summed_in_pieces(monkeypatch):
    # Above DOT_CHUNK numbers [S; Y] [y, p, r₊]ᵀ is formed PRODUCT_PIECE columns at a time (on 50 M weights a
    # whole product was slower): the same pairs and H r₊ as the two-loop recursion, through the piecewise sums.
    from moller_scg import _vectors, pair_arithmetic

    monkeypatch.setattr(_vectors, "DOT_CHUNK", 5)
    monkeypatch.setattr(pair_arithmetic, "PRODUCT_PIECE", 3)
    monkeypatch.setattr(pair_arithmetic, "HOST_ARITHMETIC_MAX", 0)  # the pieces are torch's (a GPU's, a large block's)
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(N, seed=15)
    generator = torch.Generator().manual_seed(10)
    pairs, kept = SecantPairs(params, 3), []
    for _ in range(5):
        direction = torch.randn(N, generator=generator, dtype=torch.float64)
        residual = torch.randn(N, generator=generator, dtype=torch.float64)
        new_residual = residual - hessian @ (0.5 * direction)
        result = pairs.advance(split(direction), 0.5, split(residual), split(new_residual))
        kept = (kept + [(0.5 * direction, residual - new_residual)])[-3:]
        torch.testing.assert_close(flat(result), two_loop(kept, new_residual), rtol=1e-12, atol=1e-14)
    a, b = torch.randn(4, N, generator=generator), torch.randn(3, N, generator=generator)
    pieces = zip(a.split(3, dim=-1), b.split(3, dim=-1))
    piecewise = torch.stack([(a_piece @ b_piece.T).double() for a_piece, b_piece in pieces]).sum(0)
    torch.testing.assert_close(pair_arithmetic.row_products(a, b), piecewise, rtol=1e-15, atol=1e-12)
    torch.testing.assert_close(pair_arithmetic.row_products(a, b), (a @ b.T).double(), rtol=1e-5, atol=1e-5)


def test_state_dict_saves_zeros_in_the_rows_no_pair_was_written_into():
    # The stacks are made uninitialised; what state_dict saves is deterministic all the same.
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    pairs = SecantPairs(params, 4)
    (block,) = pairs.blocks
    block.fill_(float("nan"))  # as uninitialised memory may hold
    generator = torch.Generator().manual_seed(11)
    step = torch.randn(N, generator=generator, dtype=torch.float64)
    assert pairs.push(split(step), split(2.0 * step))
    (saved,) = pairs.state_dict()["blocks"]
    assert torch.equal(saved[0, 0], step) and torch.equal(saved[1, 0], 2.0 * step)
    assert (saved[:, 1:] == 0).all()


def test_the_triangular_solves_give_the_general_solves_numbers_and_refuse_a_singular_r():
    rng = np.random.default_rng(0)
    upper = np.triu(rng.random((7, 7))) + np.eye(7)
    b = rng.random(7)
    # LU of an upper triangle with a positive diagonal pivots nowhere: the same back substitution, the same bits.
    assert np.array_equal(_solve_upper(upper, b), np.linalg.solve(upper, b))
    np.testing.assert_allclose(_solve_upper(upper, b, transposed=True), np.linalg.solve(upper.T, b), rtol=1e-13)
    upper[3, 3] = 0.0
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        _solve_upper(upper, b)


def test_small_cpu_blocks_are_worked_on_in_numpy_and_others_in_torch():
    """Every block in NumPy (float32 or float64 on the CPU, at most HOST_ARITHMETIC_MAX numbers in its 2m vectors),
    or none."""
    from moller_scg.pair_arithmetic import HOST_ARITHMETIC_MAX

    def on_host(*tensors, memory=2):
        return SecantPairs(list(tensors), memory).on_host

    assert on_host(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float32))
    assert on_host(torch.zeros(HOST_ARITHMETIC_MAX // 4))  # 2m = 4 vectors
    assert not on_host(torch.zeros(HOST_ARITHMETIC_MAX // 4 + 1))
    assert not on_host(torch.zeros(HOST_ARITHMETIC_MAX // 4), memory=3)
    assert not on_host(torch.zeros(3, dtype=torch.bfloat16))
    assert not on_host(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_a_copy_of_the_pairs_works_on_its_own_blocks(diagonal_scaling):
    """pickle and deepcopy keep the blocks, not their NumPy views, which the copy makes anew over its own blocks: it
    goes on as the original does, and the original's blocks are left as they were."""
    import copy
    import pickle

    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(N, seed=12)
    generator = torch.Generator().manual_seed(6)
    pairs = SecantPairs(params, 3, diagonal_scaling=diagonal_scaling)
    pairs.start_scaling(split(torch.randn(N, generator=generator, dtype=torch.float64)))

    def advance(target, seed):
        g = torch.Generator().manual_seed(seed)
        direction, residual = (torch.randn(N, generator=g, dtype=torch.float64) for _ in range(2))
        new_residual = residual - hessian @ (0.5 * direction)
        return flat(target.advance(split(direction), 0.5, split(residual), split(new_residual)))

    for seed in range(4):
        advance(pairs, seed)
    twins = [copy.deepcopy(pairs), pickle.loads(pickle.dumps(pairs))]
    before = [block.clone() for block in pairs.blocks]
    results = [advance(twin, 10) for twin in twins]
    assert all(torch.equal(a, b) for a, b in zip(pairs.blocks, before))  # the copies wrote into their own blocks
    expected = advance(pairs, 10)
    for twin, result in zip(twins, results):
        assert torch.equal(result, expected)
        # What state_dict saves (the tensors, not views of stale copies) moved with the arithmetic.
        assert all(torch.equal(a, b) for a, b in zip(twin.blocks, pairs.blocks))
        if diagonal_scaling:
            assert torch.equal(twin.scaling.second_moment[0], pairs.scaling.second_moment[0])
            assert torch.equal(twin.scaling.diagonal[0], pairs.scaling.diagonal[0])


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_advance_flat_works_on_the_buffers_it_is_given_each_time(diagonal_scaling):
    """advance_flat keeps its NumPy views of SCG's flat buffers between steps: given other buffers (SCG makes new
    ones after a load_state_dict) it works on those, as pairs given new buffers at every step do."""
    hessian = spd(N, seed=3)
    generator = torch.Generator().manual_seed(8)
    steps = [[torch.randn(N, generator=generator, dtype=torch.float64) for _ in range(2)] for _ in range(6)]
    kept_rows, kept_residual = torch.empty(3, N, dtype=torch.float64), torch.empty(N, dtype=torch.float64)

    def run(new_buffers_every_step):
        pairs = SecantPairs([torch.zeros(N, dtype=torch.float64)], 3, diagonal_scaling=diagonal_scaling)
        pairs.start_scaling([steps[0][1]])
        directions = []
        for direction, residual in steps:
            rows, flat_residual = (
                (torch.empty(3, N, dtype=torch.float64), torch.empty(N, dtype=torch.float64))
                if new_buffers_every_step
                else (kept_rows, kept_residual)
            )
            rows[1], rows[2] = direction, residual - hessian @ (0.5 * direction)
            flat_residual.copy_(residual)
            pairs.advance_flat(rows, 0.5, flat_residual)
            directions.append(rows[1].clone())  # p₊ = H r₊
        return directions

    for kept, fresh in zip(run(False), run(True)):
        assert torch.equal(kept, fresh)
