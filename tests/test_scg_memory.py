"""SCG(memory=m): Møller's SCG with a limited-memory quasi-Newton preconditioned direction (issue #14).

The trajectory is checked against ``reference_scg(memory=m)``, an independent float64 transcription that forms
H r by the two-loop recursion; m = 0 stays Møller's SCG (tests/test_scg.py checks that trajectory bit for bit).
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from problems import mean_squared_error_closure, rosenbrock
from reference_scg import problem_from_function, reference_scg
from test_scg import (
    assert_trajectories_equal,
    flat,
    make_mlp,
    mlp_data,
    mlp_flat_function,
    spd_quadratic,
)
from torch import nn

from moller_scg import SCG


def run(params, loss_of_params, iterations, create_graph=False, **options):
    optimizer = SCG(params, **options)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = loss_of_params()
        loss.backward(create_graph=create_graph)
        return loss

    trajectory = []
    for _ in range(iterations):
        optimizer.step(closure)
        trajectory.append(flat(params))
    return optimizer, trajectory, calls


def mse_closure(optimizer, model, x, y):
    """The closure an LBFGS user writes: zero_grad, the mean squared error of ``model`` on (x, y), backward."""

    def closure():
        optimizer.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("memory", [1, 3, 10])
def test_secant_mode_trajectory_matches_reference_on_rosenbrock(memory):
    # 40 iterations: the rounding differences between the compact form and the reference's two-loop recursion grow
    # along Rosenbrock's valley, beyond 1e-8 relative by iteration 45 with m = 3 and 10. Møller's λ ÷ 4 in place of
    # the secant mode's ÷ 2 departs beyond 1e-8 by iteration 15.
    w1 = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    _, trajectory, _ = run([w], lambda: rosenbrock(w), 40, memory=memory)
    expected = reference_scg(problem_from_function(rosenbrock), w1, 40, memory=memory, secant=True)
    assert_trajectories_equal(trajectory, expected, rtol=1e-8)


@pytest.mark.parametrize("hvp", ["double-backward", "finite-difference"])
def test_measured_curvature_along_the_preconditioned_direction_matches_reference(hvp):
    model = make_mlp()
    w1 = flat(model.parameters())
    x, y = mlp_data()
    params = list(model.parameters())
    _, trajectory, _ = run(
        params,
        lambda: torch.mean((model(x) - y) ** 2),
        30,
        create_graph=(hvp == "double-backward"),
        memory=4,
        hvp=hvp,
    )
    expected = reference_scg(
        problem_from_function(mlp_flat_function(make_mlp())),
        w1,
        30,
        memory=4,
        finite_difference=(hvp == "finite-difference"),
    )
    assert_trajectories_equal(trajectory, expected, rtol=1e-8)


def test_spd_quadratic_loss_never_increases_and_reaches_rounding_level():
    """Unit quasi-Newton steps do not terminate in n steps as Møller's conjugate directions do (exact α), but the
    accepted loss never increases and reaches the minimum to rounding within a few n."""
    a, b = spd_quadratic(6, seed=2)
    solution = torch.linalg.solve(a, b)
    minimum = float(0.5 * solution @ a @ solution - b @ solution)
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = SCG([w], memory=6)
    closure = _closure(optimizer, lambda: 0.5 * w @ a @ w - b @ w)
    losses = []
    for _ in range(30):
        optimizer.step(closure)
        losses.append(optimizer.trace.loss)
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] - minimum <= 1e-13 * abs(minimum)


def _closure(optimizer, loss_of_params):
    def closure():
        optimizer.zero_grad()
        loss = loss_of_params()
        loss.backward()
        return loss

    return closure


def test_secant_mode_costs_one_closure_call_per_step():
    """Step 1 evaluates w₁; the first iteration adds only its trial (LBFGS's first step length, no finite
    difference); then 1 call a step."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer, _, calls = run([w], lambda: rosenbrock(w), 1, memory=5, restart=100)  # no restart: N = 100 > 11
    assert len(calls) == 2 and optimizer.trace.hvp_calls == 0
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(rosenbrock(start), start)
    # α = μ/(μ/α₀ + λ₁|r|²) with α₀ = min(1, 1/|r₁|₁): α₀ up to λ₁'s share (λ₁α₀ ≈ 2e-9)
    assert optimizer.trace.alpha == pytest.approx(min(1.0, 1.0 / float(gradient.abs().sum())), rel=1e-8)
    closure_calls = optimizer.trace.closure_calls

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        return loss

    for _ in range(10):
        optimizer.step(closure)
        assert optimizer.trace.closure_calls == closure_calls + 1
        closure_calls += 1
    assert optimizer.trace.hvp_calls == 0  # δ from the secant model (or α₀ at the first step): no curvature pass


def test_a_plain_closure_works_as_for_lbfgs():
    """The secant mode needs no create_graph: the closure LBFGS users already have."""
    model = make_mlp()
    x, y = mlp_data()
    optimizer = SCG(model.parameters(), memory=10)

    closure = mse_closure(optimizer, model, x, y)

    first = float(closure().detach())
    for _ in range(60):
        loss = optimizer.step(closure)
    assert float(loss) < 0.05 * first


def test_state_dict_round_trip_with_weights_only_continues_bit_identically():
    def setup(seed=0):
        model = make_mlp(seed)
        x, y = mlp_data()
        optimizer = SCG(model.parameters(), memory=4)
        return model, optimizer, mean_squared_error_closure(optimizer, model, x, y)

    reference_model, reference_optimizer, reference_closure = setup()
    for _ in range(20):
        reference_optimizer.step(reference_closure)
    model, optimizer, closure = setup()
    for _ in range(9):
        optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model, fresh_optimizer, fresh_closure = setup(seed=5)
    fresh_model.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    for _ in range(11):
        fresh_optimizer.step(fresh_closure)
    for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)

    copied = copy.deepcopy(optimizer)  # a deep copy keeps the pairs too
    assert copied.state_dict()["scg"]["secant_pairs"]["slots"] == optimizer.state_dict()["scg"]["secant_pairs"]["slots"]


def test_a_saved_or_pickled_state_holds_r_and_p_once_not_the_buffers_they_live_in():
    # On the fast path r and p are rows of a (4, n) buffer (beside r₊ and y); torch.save and pickle keep a view's whole
    # storage, so the state gives r and p as copies: the pairs (2m n), r and p (2 n) and a little more.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 200), nn.Tanh(), nn.Linear(200, 2)).double()  # n = 4,602: the format's
    x = torch.randn(64, 20, dtype=torch.float64)  # own bytes are small beside the numbers
    y = torch.sin(x[:, :2])
    optimizer = SCG(model.parameters(), memory=3)

    closure = mse_closure(optimizer, model, x, y)

    for _ in range(5):
        optimizer.step(closure)
    n = sum(p.numel() for p in model.parameters())
    numbers = (2 * 3 + 2) * n * 8  # float64 bytes of the pairs, r and p
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    assert numbers <= len(buffer.getbuffer()) < numbers + 4 * n * 8 / 2  # not 2n more for the buffer's other rows
    pickled = len(pickle.dumps(optimizer))
    assert pickled < numbers + 4 * n * 8 / 2 + n * 8  # plus the pairs' own storage of the live object: no 2n more
    state = optimizer.state[next(iter(model.parameters()))]
    assert optimizer.state_dict()["state"][0]["direction"] is not state["direction"]
    assert torch.equal(optimizer.state_dict()["state"][0]["direction"], state["direction"])


def test_states_of_other_memories_are_refused():
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    with_memory = SCG([w], memory=3)
    run_closure = _rosenbrock_closure(with_memory, w)
    for _ in range(3):
        with_memory.step(run_closure)
    state = with_memory.state_dict()
    with pytest.raises(ValueError, match="memory=0"):
        SCG([w]).load_state_dict(state)
    with pytest.raises(ValueError, match="memory=5"):
        SCG([w], memory=5).load_state_dict(state)
    plain = SCG([w], hvp="finite-difference")
    plain.step(_rosenbrock_closure(plain, w))
    with pytest.raises(ValueError, match="memory=0"):
        SCG([w], memory=3).load_state_dict(plain.state_dict())
    # A state saved before the first step holds no pairs, but its memory is refused all the same (it was taken over
    # with the saved parameter groups before).
    for saved, loading in ((0, 3), (3, 0), (3, 5)):
        optimizer = SCG([w], memory=loading)
        with pytest.raises(ValueError, match=f"saved by an SCG with memory={saved}"):
            optimizer.load_state_dict(SCG([w], memory=saved).state_dict())
        assert optimizer.param_groups[0]["memory"] == loading


def _rosenbrock_closure(optimizer, w):
    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_non_finite_trial_keeps_weights_and_pairs(diagonal_scaling):
    """And, with diagonal scaling, the gradients' second moment v: a rejected trial adds nothing to it."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w], memory=3, diagonal_scaling=diagonal_scaling)
    poison = {"on": False}

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w) + (torch.tensor(float("nan"), dtype=torch.float64) if poison["on"] else 0.0)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    before = w.detach().clone()
    pairs_before = copy.deepcopy(optimizer.state_dict()["scg"]["secant_pairs"])
    poison["on"] = True
    optimizer.step(closure)
    assert torch.equal(w.detach(), before) and not optimizer.trace.success
    after = optimizer.state_dict()["scg"]["secant_pairs"]
    assert after["slots"] == pairs_before["slots"]
    assert all(torch.equal(a, b) for a, b in zip(after["blocks"], pairs_before["blocks"]))
    if diagonal_scaling:
        (v_after,), (v_before,) = after["diagonal_scaling"].values(), pairs_before["diagonal_scaling"].values()
        assert torch.equal(v_after[0], v_before[0])
    poison["on"] = False
    optimizer.step(closure)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("diagonal_scaling", [False, True])
@pytest.mark.parametrize("with_float32", [False, True], ids=["float16", "float16+float32"])
def test_float16_parameters_with_gradients_beyond_256_train(diagonal_scaling, with_float32):
    """Their inner products, pair products and second moment v overflow float16 if formed in it (300² > 65504):
    the direction was NaN from the first step and every trial was rejected until SCG gave up."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(50, generator=generator) * 300
    half = nn.Parameter(torch.zeros(50, dtype=torch.float16))
    single = nn.Parameter(torch.zeros(5))
    params = [half, single] if with_float32 else [half]
    optimizer = SCG(params, memory=3, diagonal_scaling=diagonal_scaling)

    def closure():
        optimizer.zero_grad()
        loss = ((half.float() - target) ** 2).sum() + (1e3 * ((single - 1) ** 2).sum() if with_float32 else 0.0)
        loss.backward()
        return loss

    first = float(closure())
    for _ in range(30):
        optimizer.step(closure)
    assert optimizer.trace.loss < 1e-3 * first and optimizer.trace.direction_norm > 0
    assert all(torch.isfinite(p).all() for p in params)
    if diagonal_scaling:
        moments = optimizer._secant_pairs.scaling.second_moment
        assert moments[0].dtype == torch.float32 and all(torch.isfinite(v).all() for v in moments)


def test_a_direction_that_is_not_finite_is_dropped_for_steepest_descent():
    """p = H r is not a descent direction when it is NaN: the pairs go and SCG searches along r, as for μ < 0."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w], memory=3)

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    before = optimizer.trace.loss
    optimizer.state[w]["direction"].fill_(float("nan"))  # as an overflow in H r would leave it
    optimizer.step(closure)
    assert optimizer.trace.success and optimizer.trace.loss < before and torch.isfinite(w).all()
    assert len(optimizer.state_dict()["scg"]["secant_pairs"]["slots"]) <= 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"memory": -1}, "memory"),
        ({"memory": 2.0}, "memory"),
        ({"memory": True}, "memory"),
        ({"hvp": "secant"}, "memory=0"),
    ],
)
def test_bad_memory_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        SCG([nn.Parameter(torch.zeros(2))], **options)


def test_default_hvp_follows_memory():
    p = nn.Parameter(torch.zeros(2))
    assert SCG([p]).param_groups[0]["hvp"] == "double-backward"
    assert SCG([p], memory=4).param_groups[0]["hvp"] == "secant"
    assert SCG([p], memory=4, hvp="finite-difference").param_groups[0]["hvp"] == "finite-difference"


@pytest.mark.parametrize("hvp", ["double-backward", "finite-difference", "secant"])
def test_uses_exact_curvature_says_whether_steps_ask_for_hessian_vector_products(hvp):
    """fit trusts this property to decide whether curvature_fraction < 1 would be used."""
    a, b = spd_quadratic(4, seed=0)
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = SCG([w], hvp=hvp, memory=2 if hvp == "secant" else 0)
    products = []

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * w @ (a @ w) - b @ w
        loss.backward()
        return loss

    def hvp_method(vectors):
        products.append(1)
        return [a @ vectors[0]]

    closure.hvp = hvp_method
    for _ in range(3):
        optimizer.step(closure)
    assert optimizer.uses_exact_curvature == (hvp == "double-backward")
    assert bool(products) == optimizer.uses_exact_curvature


@pytest.mark.parametrize("diagonal_scaling", [False, True])
def test_complex_parameters_with_memory_follow_their_real_view(diagonal_scaling):
    """A complex parameter optimizes like the real parameter of its real and imaginary parts."""
    target = torch.tensor([1.0 + 2.0j, -0.5 + 0.25j], dtype=torch.complex128)
    z = nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    real = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    target_real = torch.view_as_real(target)

    def loss_complex():
        return torch.sum(torch.abs(z - target) ** 4) + torch.sum(torch.abs(z - target) ** 2)

    def loss_real():
        squared = torch.sum((real - target_real) ** 2, dim=-1)
        return torch.sum(squared**2) + torch.sum(squared)

    _, complex_trajectory, _ = run([z], loss_complex, 15, memory=3, diagonal_scaling=diagonal_scaling)
    _, real_trajectory, _ = run([real], loss_real, 15, memory=3, diagonal_scaling=diagonal_scaling)
    for c, r in zip(complex_trajectory, real_trajectory):
        torch.testing.assert_close(torch.view_as_real(c.reshape(2)).reshape(-1), r, rtol=1e-10, atol=1e-12)


def test_a_complex_parameter_after_a_real_one_of_odd_size_follows_its_real_view():
    """The pairs hold a real parameter of 3 numbers and a complex one in one flat block of float64: the complex
    parameter's part starts at an odd offset, which a complex view of the block cannot take (it raised)."""
    target = torch.tensor([1.0 + 2.0j, -0.5 + 0.25j], dtype=torch.complex128)
    a, z = nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    b, real = nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))

    def loss_complex():
        return torch.sum(torch.abs(z - target) ** 4) + torch.sum((a - 1) ** 2) * (1 + torch.sum(torch.abs(z) ** 2))

    def loss_real():
        squared = torch.sum((real - torch.view_as_real(target)) ** 2, dim=-1)
        return torch.sum(squared**2) + torch.sum((b - 1) ** 2) * (1 + torch.sum(real**2))

    _, complex_trajectory, _ = run([a, z], loss_complex, 15, memory=3)
    _, real_trajectory, _ = run([b, real], loss_real, 15, memory=3)
    for c, r in zip(complex_trajectory, real_trajectory):  # c: a and z as one complex vector of 5
        as_reals = torch.cat([c[:3].real, torch.view_as_real(c[3:]).reshape(-1)])
        torch.testing.assert_close(as_reals, r, rtol=1e-10, atol=1e-12)
    assert float(loss_complex()) < 0.01 * float(torch.sum(torch.abs(target) ** 4) + 3)  # it trains


# ---------------------------------------------------------------------------------------------------------------
# The flat fast path (moller_scg/flat_vector.py): r, p and the accepted w in one buffer each


def _mlp_closure(model, optimizer):
    x, y = mlp_data()

    closure = mse_closure(optimizer, model, x, y)

    return closure


def _per_tensor_path(monkeypatch):
    """Make SCG take its per-parameter-tensor path, as it does for mixed dtypes or complex parameters."""
    from moller_scg import flat_vector

    monkeypatch.setattr(flat_vector.FlatLayout, "fits", staticmethod(lambda params: False))


def test_fast_path_holds_r_and_p_as_views_of_one_buffer_and_follows_the_per_tensor_path(monkeypatch):
    model = make_mlp()
    optimizer = SCG(model.parameters(), memory=5)
    closure = _mlp_closure(model, optimizer)
    fast = []
    for _ in range(30):
        optimizer.step(closure)
        fast.append(flat(model.parameters()))
    for key in ("residual", "direction"):
        storages = {optimizer.state[p][key].untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) == 1, f"{key}: one flat buffer for all parameters"

    _per_tensor_path(monkeypatch)
    model = make_mlp()
    optimizer = SCG(model.parameters(), memory=5)
    closure = _mlp_closure(model, optimizer)
    for expected in fast:
        optimizer.step(closure)
        # Only the order of the sums in the inner products differs between the two paths.
        torch.testing.assert_close(flat(model.parameters()), expected, rtol=1e-10, atol=1e-12)
    storages = {optimizer.state[p]["direction"].untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))


def test_fast_path_uses_a_direction_assigned_by_hand(monkeypatch):
    """Replacing optimizer.state's p (not writing into it) is seen by the next step on both paths alike."""

    def run_with_reset_direction():
        model = make_mlp()
        optimizer = SCG(model.parameters(), memory=3)
        closure = _mlp_closure(model, optimizer)
        for _ in range(6):
            optimizer.step(closure)
        for p in model.parameters():
            optimizer.state[p]["direction"] = optimizer.state[p]["residual"].clone()  # p ← r: steepest descent
        for _ in range(6):
            optimizer.step(closure)
        return flat(model.parameters())

    fast = run_with_reset_direction()
    _per_tensor_path(monkeypatch)
    torch.testing.assert_close(run_with_reset_direction(), fast, rtol=1e-10, atol=1e-12)


def test_parameters_of_two_dtypes_take_the_per_tensor_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.Tanh(), nn.Linear(4, 1).double())
    model[2].float()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.sin(x[:, :1])
    optimizer = SCG(model.parameters(), memory=3)

    def closure():
        optimizer.zero_grad()
        loss = torch.mean((model[2](model[1](model[0](x)).float()).double() - y) ** 2)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(10):
        optimizer.step(closure)
    assert optimizer._storage.flat is None
    assert optimizer.trace.loss < first


def test_only_the_very_first_step_skips_the_finite_difference():
    """After a restart (or when the pairs were dropped) the step without pairs takes Møller's finite difference."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer, _, calls = run([w], lambda: rosenbrock(w), 5, memory=3, restart=100)
    assert optimizer.trace.hvp_calls == 0 and len(calls) == 6
    optimizer.restart()

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        return loss

    optimizer.step(closure)  # step 1 again (one call), then the finite difference and the trial
    assert optimizer.trace.hvp_calls == 1 and optimizer.trace.closure_calls == 6 + 3


def test_scipy_is_imported_when_a_preconditioned_scg_is_built_not_in_its_first_step():
    """SCG(memory ≥ 1) imports SciPy's LAPACK and BLAS wrappers (tens of milliseconds, once per process) when it is
    built, so that a user who times the steps does not time the import; ``import moller_scg`` and Møller's SCG
    (memory 0) do not import SciPy at all. A fresh interpreter, since this one has imported SciPy long ago."""
    code = (
        "import sys, torch, moller_scg\n"
        "p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))\n"
        "assert 'scipy.linalg' not in sys.modules, 'import moller_scg imported SciPy'\n"
        "moller_scg.SCG([p])\n"
        "assert 'scipy.linalg' not in sys.modules, 'SCG(memory=0) imported SciPy'\n"
        "moller_scg.SCG([{'params': [p], 'memory': 3}])\n"
        "assert 'scipy.linalg' in sys.modules, 'a group with memory=3 left the import to the first step'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
