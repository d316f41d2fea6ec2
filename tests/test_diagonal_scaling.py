"""SCG(memory=m, diagonal_scaling=True): H₀ = γ_D Λ, Λ from the accepted gradients' second moments (issue #14).

The trajectory is checked against ``reference_scg(..., diagonal_scaling=True)``, an independent float64
transcription that forms H r by the two-loop recursion with H₀ = γ_D Λ.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from problems import rosenbrock
from reference_scg import problem_from_function, reference_scg, two_loop
from test_quasi_newton import SHAPES, flat, spd, split
from test_scg import assert_trajectories_equal, make_mlp, mlp_data
from test_scg import flat as flat_params
from test_scg_memory import _per_tensor_path, mse_closure, run
from torch import nn

from moller_scg import SCG, pair_arithmetic
from moller_scg.diagonal_scaling import BETA, EPSILON, POWER, DiagonalScaling, _mean
from moller_scg.quasi_newton import SecantPairs


def expected_diagonal(second_moment: torch.Tensor) -> torch.Tensor:
    root = second_moment**POWER
    return 1.0 / (root + EPSILON * root.mean())


def _scaling_on(path, sizes, dtypes):
    """A DiagonalScaling of CPU blocks worked on in NumPy or in torch, and the gradients as it takes them."""
    host = path == "numpy"
    scaling = DiagonalScaling(sizes, dtypes, [torch.device("cpu")] * len(sizes), on_host=host)
    return scaling, lambda gradients: pair_arithmetic.working(gradients, host)


def test_second_moment_and_diagonal_follow_their_formulas(arithmetic_path):
    generator = torch.Generator().manual_seed(0)
    g1, g2, g3 = (torch.randn(7, generator=generator, dtype=torch.float64) for _ in range(3))
    scaling, taken = _scaling_on(arithmetic_path, [7], [torch.float64])
    scaling.start(taken([g1]))
    scaling.observe(taken([g2]))
    scaling.observe(taken([-g3]))
    v = BETA**2 * (1 - BETA) * g1**2 + BETA * (1 - BETA) * g2**2 + (1 - BETA) * g3**2
    torch.testing.assert_close(scaling.second_moment[0], v, rtol=1e-14, atol=0)
    torch.testing.assert_close(scaling.diagonal[0], expected_diagonal(v), rtol=1e-14, atol=0)


def test_weights_whose_gradient_was_always_zero_keep_a_finite_scale(arithmetic_path):
    scaling, taken = _scaling_on(arithmetic_path, [3], [torch.float64])
    scaling.start(taken([torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)]))
    assert torch.isfinite(scaling.diagonal[0]).all()
    assert scaling.diagonal[0][0] > 1e6 * scaling.diagonal[0][1]  # 1 / (ε mean v^κ) where v = 0
    scaling.start(taken([torch.zeros(3, dtype=torch.float64)]))  # no gradient at all: Λ ∝ I, finite
    assert torch.isfinite(scaling.diagonal[0]).all() and len(set(scaling.diagonal[0].tolist())) == 1
    two_blocks, taken = _scaling_on(arithmetic_path, [2, 1], [torch.float64, torch.float32])
    two_blocks.start(taken([torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float32)]))
    assert all(torch.isfinite(d).all() for d in two_blocks.diagonal)
    two_blocks.start(taken([torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0])]))
    v = torch.tensor([0.0, 4.0, 1.0], dtype=torch.float64) * (1 - BETA)
    expected = expected_diagonal(v)
    torch.testing.assert_close(two_blocks.diagonal[0], expected[:2], rtol=1e-6, atol=0)  # the mean has a float32 part
    torch.testing.assert_close(two_blocks.diagonal[1], expected[2:].float(), rtol=1e-6, atol=0)


def test_advance_observes_the_new_gradient_then_keeps_the_pair_then_applies_h(arithmetic_path):
    n = sum(torch.Size(s).numel() for s in SHAPES)
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    hessian = spd(n, seed=1)
    generator = torch.Generator().manual_seed(5)
    advanced = SecantPairs(params, 3, diagonal_scaling=True)
    by_parts = SecantPairs(params, 3, diagonal_scaling=True)
    start = split(torch.randn(n, generator=generator, dtype=torch.float64))
    advanced.start_scaling(start)
    by_parts.start_scaling(start)
    residual = torch.randn(n, generator=generator, dtype=torch.float64)
    for _ in range(6):
        direction = torch.randn(n, generator=generator, dtype=torch.float64)
        alpha = 0.5
        new_residual = residual - hessian @ (alpha * direction)
        result = advanced.advance(split(direction), alpha, split(residual), split(new_residual))
        by_parts.observe(split(new_residual))
        by_parts.push(split(alpha * direction), split(residual - new_residual))
        expected = flat(by_parts.inverse_product(split(new_residual)))
        torch.testing.assert_close(flat(result), expected, rtol=1e-12, atol=0)
        residual = new_residual


@pytest.mark.parametrize("memory", [1, 3, 10])
def test_trajectory_matches_reference_on_rosenbrock(memory):
    w1 = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    _, trajectory, _ = run([w], lambda: rosenbrock(w), 40, memory=memory, diagonal_scaling=True)
    expected = reference_scg(
        problem_from_function(rosenbrock), w1, 40, memory=memory, secant=True, diagonal_scaling=True
    )
    assert_trajectories_equal(trajectory, expected, rtol=1e-8)
    scalar_mode = reference_scg(problem_from_function(rosenbrock), w1, 40, memory=memory, secant=True)
    assert not torch.allclose(trajectory[-1], scalar_mode[-1], rtol=1e-6)


def test_the_second_moment_goes_on_across_a_restart():
    """A restart (k mod N = 0) forgets the pairs, not v: the reference keeps v and restarts every 5 steps too."""
    w1 = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    _, trajectory, _ = run([w], lambda: rosenbrock(w), 25, memory=3, diagonal_scaling=True, restart=5)
    expected = reference_scg(
        problem_from_function(rosenbrock), w1, 25, memory=3, secant=True, diagonal_scaling=True, restart=5
    )
    assert_trajectories_equal(trajectory, expected, rtol=1e-8)


def _mlp_run(seed=0, **options):
    model = make_mlp(seed)
    x, y = mlp_data()
    optimizer = SCG(model.parameters(), memory=4, diagonal_scaling=True, **options)
    return model, optimizer, mse_closure(optimizer, model, x, y)


def _after_steps(steps, seed=0):
    """``_mlp_run``'s model and optimizer after ``steps`` steps."""
    model, optimizer, closure = _mlp_run(seed)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer


def _assert_same_weights(model, other):
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trip_with_weights_only_continues_bit_identically():
    reference_model, _ = _after_steps(20)
    model, optimizer = _after_steps(9)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "diagonal_scaling" in saved["optimizer"]["scg"]["secant_pairs"]
    fresh_model, fresh_optimizer, fresh_closure = _mlp_run(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    for _ in range(11):
        fresh_optimizer.step(fresh_closure)
    _assert_same_weights(fresh_model, reference_model)


def test_loading_a_state_takes_the_scaling_it_was_saved_with():
    """As torch.optim optimizers take their saved hyperparameters: the run goes on as it was saved."""
    reference_model, _ = _after_steps(12)
    model, diagonal = _after_steps(5)
    x, y = mlp_data()
    scalar = SCG(model.parameters(), memory=4)  # built without the option, as an older script would
    scalar.load_state_dict(diagonal.state_dict())
    assert scalar.param_groups[0]["diagonal_scaling"] is True
    for _ in range(7):
        scalar.step(mse_closure(scalar, model, x, y))
    _assert_same_weights(model, reference_model)


def test_a_state_whose_groups_and_pairs_disagree_is_refused():
    _, diagonal = _after_steps(3)
    state = diagonal.state_dict()
    state["param_groups"][0]["diagonal_scaling"] = False
    with pytest.raises(ValueError, match="diagonal_scaling=True"):
        SCG(make_mlp().parameters(), memory=4, diagonal_scaling=True).load_state_dict(state)


def _weights_after_each_step(steps, **options):
    model, optimizer, closure = _mlp_run(**options)
    weights = []
    for _ in range(steps):
        optimizer.step(closure)
        weights.append(flat_params(model.parameters()))
    return weights, optimizer


def test_the_per_tensor_path_follows_the_flat_path(monkeypatch):
    """Through restarts too (every 7 steps), where r₊ reaches v without forming a pair."""
    fast, optimizer = _weights_after_each_step(25, restart=7)
    assert optimizer._storage.flat is not None
    _per_tensor_path(monkeypatch)
    per_tensor, optimizer = _weights_after_each_step(25, restart=7)
    assert optimizer._storage.flat is None
    for weights, expected in zip(per_tensor, fast):
        torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"memory": 3, "diagonal_scaling": 1}, "diagonal_scaling"),
        ({"memory": 3, "diagonal_scaling": "yes"}, "diagonal_scaling"),
        ({"diagonal_scaling": True}, "memory=0"),
    ],
)
def test_bad_diagonal_scaling_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        SCG([nn.Parameter(torch.zeros(2))], **options)


def test_the_option_is_a_group_hyperparameter_and_repr_shows_it():
    p = nn.Parameter(torch.zeros(2))
    optimizer = SCG([p], memory=2, diagonal_scaling=True)
    assert optimizer.param_groups[0]["diagonal_scaling"] is True
    assert "diagonal_scaling: True" in repr(optimizer)
    with pytest.raises(ValueError, match="diagonal_scaling"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "diagonal_scaling": False})


def test_a_state_saved_before_the_option_existed_loads_as_the_scalar_mode():
    model = make_mlp()
    x, y = mlp_data()
    optimizer = SCG(model.parameters(), memory=4)
    closure = mse_closure(optimizer, model, x, y)
    for _ in range(4):
        optimizer.step(closure)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        del group["diagonal_scaling"]
    fresh = SCG(model.parameters(), memory=4, diagonal_scaling=True)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["diagonal_scaling"] is False
    fresh.step(mse_closure(fresh, model, x, y))
    assert fresh.trace.k == 5 and fresh._secant_pairs.scaling is None


def test_vectors_longer_than_a_piece_give_the_same_h_v_through_the_piecewise_products(monkeypatch):
    """Above PRODUCT_PIECE numbers the products with Y are formed a piece at a time (no k × n temporary)."""
    from moller_scg import _vectors, pair_arithmetic

    n = sum(torch.Size(s).numel() for s in SHAPES)
    hessian = spd(n, seed=15)

    def run_pairs():
        params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        generator = torch.Generator().manual_seed(10)
        pairs, kept, results = SecantPairs(params, 3, diagonal_scaling=True), [], []
        pairs.start_scaling(split(torch.randn(n, generator=generator, dtype=torch.float64)))
        for _ in range(5):
            direction = torch.randn(n, generator=generator, dtype=torch.float64)
            residual = torch.randn(n, generator=generator, dtype=torch.float64)
            new_residual = residual - hessian @ (0.5 * direction)
            results.append(flat(pairs.advance(split(direction), 0.5, split(residual), split(new_residual))))
            kept = (kept + [(0.5 * direction, residual - new_residual)])[-3:]
            expected = two_loop(kept, new_residual, pairs.scaling.diagonal[0])
            torch.testing.assert_close(results[-1], expected, rtol=1e-12, atol=1e-14)
        return results

    whole = run_pairs()
    monkeypatch.setattr(_vectors, "DOT_CHUNK", 5)
    monkeypatch.setattr(pair_arithmetic, "PRODUCT_PIECE", 3)  # the diagonal of YᵀΛY in pieces too
    monkeypatch.setattr(pair_arithmetic, "HOST_ARITHMETIC_MAX", 0)  # the pieces are torch's
    for piecewise, expected in zip(run_pairs(), whole):
        torch.testing.assert_close(piecewise, expected, rtol=1e-12, atol=1e-14)


def _compact_form_with_the_scaled_gram(kept, v, diagonal):
    """H v by Byrd, Nocedal & Schnabel's compact form with H₀ = γ_D Λ, YᵀΛY formed whole: the formula the library
    applies without it."""
    steps = torch.stack([s for s, _ in kept], dim=1)
    changes = torch.stack([y for _, y in kept], dim=1)
    scaled_changes = diagonal[:, None] * changes
    sy = steps.T @ changes
    upper, d = torch.triu(sy), torch.diag(torch.diag(sy))
    gamma = max(float(s @ y) / float(y @ (diagonal * y)) for s, y in kept)
    r_inv = torch.linalg.inv(upper)
    top_left = r_inv.T @ (d + gamma * changes.T @ scaled_changes) @ r_inv
    middle = torch.cat([torch.cat([top_left, -r_inv.T], 1), torch.cat([-r_inv, torch.zeros_like(r_inv)], 1)])
    left = torch.cat([steps, gamma * scaled_changes], 1)
    return gamma * diagonal * v + left @ (middle @ torch.cat([steps.T @ v, gamma * scaled_changes.T @ v]))


def test_h_v_is_the_compact_form_with_the_scaled_gram_which_is_never_formed(arithmetic_path):
    """H v = γ_D Λq + S R⁻ᵀ(D R⁻¹u − γ_D YᵀΛq), q = v − Y R⁻¹u: the compact form, whose YᵀΛY R⁻¹u and YᵀΛv terms
    it merges, to rounding, while the pairs fill their slots and after they wrap around."""
    n = sum(torch.Size(s).numel() for s in SHAPES)
    hessian = spd(n, seed=21)
    generator = torch.Generator().manual_seed(22)
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    pairs, kept = SecantPairs(params, 4, diagonal_scaling=True), []
    pairs.start_scaling(split(torch.randn(n, generator=generator, dtype=torch.float64)))
    for _ in range(7):
        direction = torch.randn(n, generator=generator, dtype=torch.float64)
        residual = torch.randn(n, generator=generator, dtype=torch.float64)
        new_residual = residual - hessian @ (0.5 * direction)
        result = flat(pairs.advance(split(direction), 0.5, split(residual), split(new_residual)))
        kept = (kept + [(0.5 * direction, residual - new_residual)])[-4:]
        expected = _compact_form_with_the_scaled_gram(kept, new_residual, pairs.scaling.diagonal[0])
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def _rosenbrock_run(diagonal_scaling=True):
    """w (19 Rosenbrock pairs, n = 38), ``SCG([w], memory=3, diagonal_scaling=…)`` and a closure that keeps every
    gradient it makes in ``closure.gradients`` (for the buffer counts of ``tests/test_scg.py``)."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0] * 19, dtype=torch.float64))
    optimizer = SCG([w], memory=3, diagonal_scaling=diagonal_scaling)

    def closure():
        optimizer.zero_grad()
        x, y = w[0::2], w[1::2]
        loss = torch.sum(100 * (y - x**2) ** 2 + (1 - x) ** 2)
        loss.backward()
        closure.gradients.append(w.grad)
        return loss

    closure.gradients = []
    return w, optimizer, closure


def test_the_diagonal_mode_holds_two_more_parameter_sized_buffers_than_the_scalar_one():
    """v and Λ; q = v − Y R⁻¹u is formed in p's storage and Λq in y's row, which the pair has been copied out of."""
    from test_scg import _parameter_sized_buffers_during_steps

    def peak(diagonal_scaling):
        w, optimizer, closure = _rosenbrock_run(diagonal_scaling)
        buffers = _parameter_sized_buffers_during_steps(optimizer, w, closure, 12)
        assert len(optimizer._secant_pairs) == 3
        return buffers

    assert peak(True) <= peak(False) + 2


def test_applying_h_holds_no_weight_sized_tensor_but_the_steps_rows_and_lambda():
    """Within the diagonal mode's H v (``_apply_scaled``, on the flat path of SCG's step), the only tensors of n numbers
    its frame holds are views of the step's (4, n) rows — q in p's row, Λq in y's row, H v in p's row — and Λ. (The
    whole step's count above does not see a q formed in a new tensor: its peak is elsewhere.)"""
    from test_scg import _parameter_sized_buffers_during_steps

    w, optimizer, closure = _rosenbrock_run()
    for _ in range(4):
        optimizer.step(closure)
    assert optimizer._storage.flat is not None
    assert len(optimizer._secant_pairs) >= 2  # so that Y's rows in use are no vector of n numbers
    assert _parameter_sized_buffers_during_steps(optimizer, w, closure, 8, only_in="_apply_scaled") == 2


def test_blocks_of_several_dtypes_give_the_h_v_of_one_float64_block(arithmetic_path):
    """Parameters of two dtypes are two blocks; YᵀΛq and the diagonal of YᵀΛY are summed over both."""
    generator = torch.Generator().manual_seed(3)
    shapes = [((3, 4), torch.float64), ((5,), torch.float32), ((2, 3), torch.float64)]
    n = sum(torch.Size(shape).numel() for shape, _ in shapes)
    hessian = spd(n, seed=4)

    def pieces(x, dtypes=True):
        out, offset = [], 0
        for shape, dtype in shapes:
            size = torch.Size(shape).numel()
            out.append(x[offset : offset + size].reshape(shape).to(dtype if dtypes else torch.float64))
            offset += size
        return out

    def run_pairs(dtypes):
        params = [torch.zeros(shape, dtype=dtype if dtypes else torch.float64) for shape, dtype in shapes]
        pairs = SecantPairs(params, 3, diagonal_scaling=True)
        assert len(pairs.blocks) == (2 if dtypes else 1)
        generator.manual_seed(3)
        results = []
        pairs.start_scaling(pieces(torch.randn(n, generator=generator, dtype=torch.float64), dtypes))
        for _ in range(5):
            direction = torch.randn(n, generator=generator, dtype=torch.float64)
            residual = torch.randn(n, generator=generator, dtype=torch.float64)
            new_residual = residual - hessian @ (0.5 * direction)
            parts = [pieces(x, dtypes) for x in (direction, residual, new_residual)]
            result = pairs.advance(parts[0], 0.5, parts[1], parts[2])
            results.append(torch.cat([r.reshape(-1).double() for r in result]))
        return results

    for result, expected in zip(run_pairs(True), run_pairs(False)):
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 7, 501, 131_072])
def test_the_mean_of_a_numpy_diagonal_has_the_bits_and_the_dtype_of_np_mean(dtype, size):
    # Λ's floor ε·mean(v^¼) takes the mean through _mean on the NumPy path; a different bit would change Λ.
    d = (np.random.default_rng(size).random(size) * 1e3).astype(dtype)
    mean = _mean(d)
    assert mean.dtype == d.mean().dtype == dtype
    assert mean.tobytes() == d.mean().tobytes()
