"""SCG against ``reference_scg``, a float64 transcription of Møller's steps 1–9 written from the paper (sharing no
code with the library, with the library's rounding-level Δ estimate switchable), and its torch.optim conventions."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import rosenbrock
from reference_scg import problem_from_function, reference_scg
from torch import nn

from moller_scg import SCG, ClosureObjective, SCGStalledWarning, SCGTrace, step_arithmetic
from moller_scg import _vectors as vec
from moller_scg.curvature import finite_difference_hvp
from moller_scg.scg import (
    LAMBDA_MAX,
    MAX_NON_FINITE_TRIALS,
)

MODES = ["double-backward", "finite-difference"]


# ---------------------------------------------------------------------------------------------------------------
# Problems: each a function of one flat float64 vector, and the same function of a model's parameters.


def spd_quadratic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 10.0, n, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return a, b


def quadratic_function(a: torch.Tensor, b: torch.Tensor):
    return lambda w: 0.5 * w @ a @ w - b @ w


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    y = torch.sin(x[:, :2]) + 0.1 * x[:, 2:]
    return x, y


def mlp_flat_function(model: nn.Module):
    """The MLP's mean-squared error as a function of its flattened parameters."""
    x, y = mlp_data()
    shapes = [(name, p.shape) for name, p in model.named_parameters()]

    def function(w: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in shapes:
            size = math.prod(shape)
            params[name] = w[offset : offset + size].reshape(shape)
            offset += size
        return torch.mean((torch.func.functional_call(model, params, (x,)) - y) ** 2)

    return function


def closure_for(optimizer: SCG, params: list[torch.Tensor], loss_of_params, mode: str, calls: list | None = None):
    def closure():
        if calls is not None:
            calls.append(1)
        optimizer.zero_grad()
        loss = loss_of_params()
        loss.backward(create_graph=(mode == "double-backward"))
        return loss

    return closure


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def run_scg(params, loss_of_params, iterations: int, **options) -> list[torch.Tensor]:
    optimizer = SCG(params, **options)
    closure = closure_for(optimizer, params, loss_of_params, options.get("hvp", "double-backward"))
    trajectory = []
    for _ in range(iterations):
        optimizer.step(closure)
        trajectory.append(flat(params))
    return trajectory


def assert_trajectories_equal(actual, expected, rtol=1e-10):
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected), start=1):
        scale = max(float(e.abs().max()), 1e-300)
        error = float((a - e).abs().max()) / scale
        assert error <= rtol, f"iteration {k}: relative difference {error:.3g} > {rtol:g}"


# ---------------------------------------------------------------------------------------------------------------
# The trajectory equals the paper's steps.


@pytest.mark.parametrize("mode", MODES)
def test_rosenbrock_trajectory_matches_reference(mode):
    w1 = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    actual = run_scg([w], lambda: rosenbrock(w), 60, hvp=mode)
    expected = reference_scg(problem_from_function(rosenbrock), w1, 60, finite_difference=(mode == "finite-difference"))
    assert_trajectories_equal(actual, expected)
    assert rosenbrock(expected[-1]) < rosenbrock(w1)


@pytest.mark.parametrize("mode", MODES)
def test_tanh_mlp_trajectory_matches_reference(mode):
    model = make_mlp()
    w1 = flat(model.parameters())
    function = mlp_flat_function(make_mlp())
    x, y = mlp_data()
    params = list(model.parameters())
    actual = run_scg(params, lambda: torch.mean((model(x) - y) ** 2), 40, hvp=mode)
    expected = reference_scg(problem_from_function(function), w1, 40, finite_difference=(mode == "finite-difference"))
    assert_trajectories_equal(actual, expected, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("restart", [None, 3])
def test_quadratic_trajectory_matches_reference_with_restarts(mode, restart):
    a, b = spd_quadratic(6, seed=2)
    function = quadratic_function(a, b)
    w1 = torch.zeros(6, dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    actual = run_scg([w], lambda: function(w), 12, hvp=mode, restart=restart)
    expected = reference_scg(
        problem_from_function(function), w1, 12, restart=restart, finite_difference=(mode == "finite-difference")
    )
    assert_trajectories_equal(actual, expected, rtol=1e-8)


def test_restart_period_sets_direction_to_residual():
    a, b = spd_quadratic(5, seed=3)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = SCG([w], restart=2)
    closure = closure_for(optimizer, [w], lambda: function(w), "double-backward")
    for k in range(1, 5):
        optimizer.step(closure)
        state = optimizer.state[w]
        assert optimizer.trace.success
        if k % 2 == 0:
            assert torch.equal(state["direction"], state["residual"])
        else:
            assert not torch.equal(state["direction"], state["residual"])


@pytest.mark.parametrize("memory", [0, 2])
def test_the_default_restart_period_counts_the_parameters_added_by_add_param_group(memory):
    # N = n, the number of real scalars: 2 at first, then 2 + 8 = 10 once w₂ is added. A period left at 2 would
    # restart (p = r) at k = 2 and 4. With memory, n is the length of the flat buffers, made anew for w₁ and w₂.
    a, b = spd_quadratic(10, seed=5)
    function = quadratic_function(a, b)
    w1 = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    w2 = nn.Parameter(torch.full((8,), 0.5, dtype=torch.float64))
    optimizer = SCG([w1], memory=memory)
    closure = closure_for(optimizer, [w1], lambda: function(torch.cat([w1, w2.detach()])), "double-backward")
    optimizer.step(closure)  # k = 1
    optimizer.add_param_group({"params": [w2]})
    closure = closure_for(optimizer, [w1, w2], lambda: function(torch.cat([w1, w2])), "double-backward")
    for _ in range(4):  # k = 2, …, 5: the first starts again at step 1 from the current weights
        optimizer.step(closure)
        assert optimizer.trace.success
        restarted = all(torch.equal(optimizer.state[w]["direction"], optimizer.state[w]["residual"]) for w in (w1, w2))
        assert restarted == (optimizer.trace.k % 10 == 0), optimizer.trace.k


@pytest.mark.parametrize("n", [5, 12])
def test_finite_termination_on_spd_quadratic(n):
    a, b = spd_quadratic(n, seed=n)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    optimizer = SCG([w])
    closure = closure_for(optimizer, [w], lambda: function(w), "double-backward")
    for _ in range(n + 1):
        optimizer.step(closure)
    solution = torch.linalg.solve(a, b)
    assert torch.allclose(w.detach(), solution, rtol=0, atol=1e-6 * float(solution.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation counts.


@pytest.mark.parametrize("new_closure_each_step", [False, True])
@pytest.mark.parametrize("mode, calls_per_success", [("double-backward", 1), ("finite-difference", 2)])
def test_closure_calls_per_iteration(mode, calls_per_success, new_closure_each_step):
    # With new_closure_each_step, as PyTorch Lightning wraps its training step in a new closure at every step: the
    # graph of the accepted trial, evaluated through the last closure, still gives the next step's exact product.
    a, b = spd_quadratic(8, seed=4)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    optimizer = SCG([w], hvp=mode)
    calls = []
    same_closure = closure_for(optimizer, [w], lambda: function(w), mode, calls)

    def closure():
        return closure_for(optimizer, [w], lambda: function(w), mode, calls) if new_closure_each_step else same_closure

    optimizer.step(closure())
    assert len(calls) == 1 + calls_per_success  # the first step also evaluates w₁
    for _ in range(5):
        before = len(calls)
        optimizer.step(closure())
        assert optimizer.trace.success
        assert len(calls) - before == calls_per_success
    assert optimizer.trace.closure_calls == len(calls)
    assert optimizer.trace.hvp_calls == 6


@pytest.mark.parametrize("memory", [0, 5])
def test_a_step_whose_closure_raises_still_counts_the_calls_it_made_in_its_trace(memory):
    # The trace a step makes after its last evaluation has the step's totals; a step cut short by its closure makes
    # none, and the latest trace is given the totals that now include the call that raised.
    a, b = spd_quadratic(8, seed=4)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    optimizer = SCG([w], memory=memory, hvp="finite-difference")
    calls = []
    closure = closure_for(optimizer, [w], lambda: function(w), "finite-difference", calls)
    for _ in range(3):
        optimizer.step(closure)
    before = optimizer.trace

    made = [0]

    def failing_closure():
        made[0] += 1
        if made[0] == 2:  # the step's first call (the finite difference) goes through, the trial's raises
            raise RuntimeError("the data loader failed")
        return closure()

    with pytest.raises(RuntimeError, match="data loader"):
        optimizer.step(failing_closure)
    totals = optimizer.state_dict()["scg"]["scalars"]
    assert optimizer.trace.closure_calls == totals["closure_calls"] > before.closure_calls
    assert optimizer.trace.hvp_calls == totals["hvp_calls"]
    assert optimizer.trace.k == before.k  # the trace of the last completed iteration, with the new totals


def test_an_objective_passed_by_the_caller_is_used_as_it_is_and_never_rewired():
    a, b = spd_quadratic(6, seed=2)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = SCG([w])
    user_closure = closure_for(optimizer, [w], lambda: function(w), "double-backward")
    objective = ClosureObjective(user_closure, [w])
    optimizer.step(objective)
    optimizer.step(closure_for(optimizer, [w], lambda: function(w), "double-backward"))
    assert objective.closure is user_closure  # SCG wrapped the plain closure in an objective of its own
    assert objective.counts.nhev == 1


class OnlyTheProtocol:
    """An Objective that has the protocol's members only (no ``__call__``), each handed to an inner objective."""

    def __init__(self, inner):
        self.inner = inner

    params = property(lambda self: self.inner.params)
    counts = property(lambda self: self.inner.counts)

    def value_and_grad(self, *, copy=True):
        return self.inner.value_and_grad(copy=copy)

    def hvp(self, vectors):
        return self.inner.hvp(vectors)

    def loss(self):
        return self.inner.loss()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)


def test_an_objective_without_call_is_stepped_on_like_its_closure():
    # The Objective protocol asks for value_and_grad and hvp, not for __call__.
    losses = {}
    for wrap in (False, True):
        w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        optimizer = SCG([w])
        closure = closure_for(optimizer, [w], lambda w=w: rosenbrock(w), "double-backward")
        stepped_on = OnlyTheProtocol(ClosureObjective(closure, [w])) if wrap else closure
        losses[wrap] = [float(optimizer.step(stepped_on)) for _ in range(10)]
    assert losses[True] == losses[False]


@pytest.mark.parametrize("mode", MODES)
def test_failed_trial_costs_one_call_and_skips_curvature(mode):
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w], hvp=mode)
    calls = []
    closure = closure_for(optimizer, [w], lambda: rosenbrock(w), mode, calls)
    failures = 0
    previous_success = True
    for _ in range(40):
        before, hvp_before = len(calls), optimizer.trace.hvp_calls if optimizer.trace else 0
        optimizer.step(closure)
        if before == 0:
            continue
        expected_hvp = 1 if previous_success else 0
        assert optimizer.trace.hvp_calls - hvp_before == expected_hvp
        expected_calls = 1 + (expected_hvp if mode == "finite-difference" else 0)
        assert len(calls) - before == expected_calls
        if not optimizer.trace.success:
            failures += 1
        previous_success = optimizer.trace.success
    assert failures > 0, "the problem should produce failed trials for this test to mean anything"


class EvaluatedTwice(OnlyTheProtocol):
    """An Objective that evaluates every E'(w) and E''(w)p twice and checks that the two agree bit for bit (a
    determinism check): each costs two evaluations, which its inner objective's counts record."""

    def value_and_grad(self, *, copy=True):
        first_loss, first = self.inner.value_and_grad()
        loss, gradients = self.inner.value_and_grad(copy=copy)
        assert first_loss == loss and all(torch.equal(a, b) for a, b in zip(first, gradients))
        return loss, gradients

    def hvp(self, vectors):
        first = self.inner.hvp(vectors)
        products = self.inner.hvp(vectors)  # the first product freed the graph: the inner objective evaluates again
        assert all(torch.equal(a, b) for a, b in zip(first, products))
        return products


@pytest.mark.parametrize("mode", ["double-backward", "finite-difference"])
def test_call_counts_are_what_the_objective_counted(mode):
    # SCG counts no evaluation itself: its totals are the growth of its objective's counts (ngev for closure calls,
    # nhev for exact products), plus the finite differences it formed in step 2 from one of those gradients. An
    # objective that evaluates everything twice costs twice the closure calls of a plain closure on the same
    # trajectory; its counts start above 0 and the totals go on across a state_dict round trip into a new SCG.
    plain_w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    plain = SCG([plain_w], hvp=mode)
    plain_closure = closure_for(plain, [plain_w], lambda: rosenbrock(plain_w), mode)
    plain_losses = [float(plain.step(plain_closure)) for _ in range(12)]

    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w], hvp=mode)
    objective = EvaluatedTwice(ClosureObjective(closure_for(optimizer, [w], lambda: rosenbrock(w), mode), [w], mode))
    objective.value_and_grad()  # an evaluation before SCG's: not SCG's to count
    before = dataclasses.replace(objective.counts)
    losses = [float(optimizer.step(objective)) for _ in range(6)]
    resumed = SCG([w], hvp=mode)
    resumed.load_state_dict(optimizer.state_dict())
    losses += [float(resumed.step(objective)) for _ in range(6)]

    assert losses == plain_losses
    trace, plain_trace = resumed.trace, plain.trace
    assert trace.closure_calls == objective.counts.ngev - before.ngev
    if mode == "double-backward":
        assert trace.hvp_calls == objective.counts.nhev - before.nhev == 2 * plain_trace.hvp_calls
        # The second of each pair of products re-evaluates once: the first product took the graph.
        assert trace.closure_calls == 2 * plain_trace.closure_calls + trace.hvp_calls // 2
    else:
        assert objective.counts.nhev == before.nhev  # SCG forms the finite difference itself
        assert trace.hvp_calls == plain_trace.hvp_calls > 0
        assert trace.closure_calls == 2 * plain_trace.closure_calls
    assert resumed.state_dict()["scg"]["scalars"]["closure_calls"] == trace.closure_calls


# ---------------------------------------------------------------------------------------------------------------
# Nothing is lost.


def test_failed_trial_leaves_weights_at_accepted_point():
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w])
    closure = closure_for(optimizer, [w], lambda: rosenbrock(w), "double-backward")
    seen_failure = False
    for _ in range(40):
        before = w.detach().clone()
        loss = optimizer.step(closure)
        if not optimizer.trace.success:
            seen_failure = True
            assert torch.equal(w.detach(), before)
        assert float(loss) == float(rosenbrock(w.detach()))
    assert seen_failure


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("failing_call", [2, 3, 4, 5])
def test_closure_error_restores_weights_and_run_continues_identically(mode, failing_call):
    w1 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    expected = reference_scg(problem_from_function(rosenbrock), w1, 6, finite_difference=(mode == "finite-difference"))

    w = nn.Parameter(w1.clone())
    optimizer = SCG([w], hvp=mode)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_call:
            raise KeyboardInterrupt("simulated failure inside the closure")
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward(create_graph=(mode == "double-backward"))
        return loss

    trajectory = []
    while len(trajectory) < 6:
        before = w.detach().clone()
        try:
            optimizer.step(closure)
        except KeyboardInterrupt:
            assert torch.equal(w.detach(), before), "weights must be restored to the accepted point"
            continue
        trajectory.append(flat([w]))
    assert_trajectories_equal(trajectory, expected, rtol=1e-12)


def test_non_finite_trial_is_a_failure_and_never_reaches_the_weights():
    # E(w) = (w - 3)² but not finite beyond w = 2: the first trial, w = 3, lands there.
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))

    def function():
        loss = ((w - 3) ** 2).sum()
        return loss * float("nan") if float(w.detach()) > 2 else loss

    optimizer = SCG([w])
    closure = closure_for(optimizer, [w], function, "double-backward")
    optimizer.step(closure)
    assert not optimizer.trace.success and math.isnan(optimizer.trace.comparison)
    assert torch.equal(w.detach(), torch.tensor([0.0], dtype=torch.float64))
    # λ grew as for Δ = −2: the next step is 4× shorter (α = 0.125 instead of 0.5), finite, and accepted.
    assert optimizer.trace.lambd == pytest.approx(6.0, rel=1e-6)
    optimizer.step(closure)
    assert optimizer.trace.success
    assert float(w.detach()) == pytest.approx(0.75, rel=1e-6)


def test_non_finite_loss_at_start_raises():
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        loss = (w**2 * float("nan")).sum()
        loss.backward(create_graph=True)
        return loss

    with pytest.raises(FloatingPointError, match="loss at the starting weights is not finite"):
        optimizer.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0], dtype=torch.float64))


def test_non_finite_gradient_at_start_raises():
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        loss = torch.sqrt(w.abs()).sum()  # finite value, infinite derivative at 0
        loss.backward(create_graph=True)
        return loss

    with pytest.raises(FloatingPointError, match="gradient at the starting weights is not finite"):
        optimizer.step(closure)


@pytest.mark.parametrize("memory", [0, 2])
def test_a_non_finite_gradient_at_a_restart_leaves_a_state_that_starts_again(memory):
    # SCG ran, then the weights were written from outside: the restart's gradient is not finite. The weights stay,
    # and the state (which by then may hold that r₁) says "not started", so a loaded copy starts again, too.
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = SCG([w], memory=memory)

    def closure():
        optimizer.zero_grad()
        loss = torch.sqrt(w.abs()).sum()  # finite value, infinite derivative at 0
        loss.backward(create_graph=memory == 0)
        return loss

    optimizer.step(closure)
    assert optimizer.state_dict()["scg"]["scalars"]["started"]
    with torch.no_grad():
        w.zero_()
    with pytest.raises(FloatingPointError, match="gradient at the starting weights is not finite"):
        optimizer.step(closure)
    assert torch.equal(w.detach(), torch.zeros(2, dtype=torch.float64))
    assert not optimizer.state_dict()["scg"]["scalars"]["started"]


def test_persistent_non_finite_trials_raise_instead_of_looping():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = SCG([w])
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = (w**2).sum() * (1.0 if len(calls) == 1 else float("inf"))
        loss.backward(create_graph=True)
        return loss

    start = w.detach().clone()
    with pytest.raises(FloatingPointError, match=f"{MAX_NON_FINITE_TRIALS} times in a row"):
        for _ in range(MAX_NON_FINITE_TRIALS + 5):
            optimizer.step(closure)
    assert len(calls) == 1 + MAX_NON_FINITE_TRIALS
    assert torch.equal(w.detach(), start)


# ---------------------------------------------------------------------------------------------------------------
# state_dict, copies, pickling.


def _mlp_setup(mode="double-backward", seed=0):
    model = make_mlp(seed)
    x, y = mlp_data()
    optimizer = SCG(model.parameters(), hvp=mode)
    closure = closure_for(optimizer, list(model.parameters()), lambda: torch.mean((model(x) - y) ** 2), mode)
    return model, optimizer, closure


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_with_weights_only_continues_bit_identically(mode):
    reference_model, reference_optimizer, reference_closure = _mlp_setup(mode)
    for _ in range(15):
        reference_optimizer.step(reference_closure)

    model, optimizer, closure = _mlp_setup(mode)
    for _ in range(7):
        optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh_model, fresh_optimizer, fresh_closure = _mlp_setup(mode, seed=123)
    fresh_model.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    assert fresh_optimizer.state_dict()["scg"] == optimizer.state_dict()["scg"]
    for _ in range(8):
        fresh_optimizer.step(fresh_closure)
    for p, q in zip(fresh_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_in_lockstep_after_every_step():
    model, optimizer, closure = _mlp_setup()
    for _ in range(6):
        twin_model = copy.deepcopy(model)
        twin_optimizer = SCG(twin_model.parameters())
        twin_optimizer.load_state_dict(optimizer.state_dict())
        x, y = mlp_data()
        twin_closure = closure_for(
            twin_optimizer,
            list(twin_model.parameters()),
            lambda twin_model=twin_model, x=x, y=y: torch.mean((twin_model(x) - y) ** 2),
            "double-backward",
        )
        optimizer.step(closure)
        twin_optimizer.step(twin_closure)
        for p, q in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(p, q)
        assert twin_optimizer.state_dict()["scg"]["scalars"] | {
            "closure_calls": 0,
            "hvp_calls": 0,
        } == optimizer.state_dict()["scg"]["scalars"] | {"closure_calls": 0, "hvp_calls": 0}


def test_float64_scalars_survive_load_state_dict_with_float32_params():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(16, 4)
    optimizer = SCG(model.parameters())
    closure = closure_for(optimizer, list(model.parameters()), lambda: (model(x) ** 2).mean(), "double-backward")
    for _ in range(3):
        optimizer.step(closure)
    fresh = SCG(nn.Linear(4, 1).parameters())
    fresh.load_state_dict(optimizer.state_dict())
    scalars = fresh.state_dict()["scg"]["scalars"]
    assert scalars == optimizer.state_dict()["scg"]["scalars"]
    assert all(type(scalars[key]) is float for key in ("loss", "lambd", "lambd_bar", "delta"))


def test_load_state_dict_keeps_entries_that_hooks_put_in_the_state():
    """As torch's own test_load_state_dict_pre_post_hook: hooks keep non-tensor entries in optimizer.state."""

    def pre_hook(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"]["ran_pre_hook"] = True
        return state_dict

    def post_hook(optimizer):
        optimizer.state["ran_post_hook"] = True

    reference_model, reference_optimizer, reference_closure = _mlp_setup()
    model, optimizer, closure = _mlp_setup()
    for _ in range(4):
        reference_optimizer.step(reference_closure)
        optimizer.step(closure)
    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state["ran_pre_hook"] is True and optimizer.state["ran_post_hook"] is True
    optimizer.load_state_dict(optimizer.state_dict())  # the entries round-trip through state_dict too
    for _ in range(4):
        reference_optimizer.step(reference_closure)
        optimizer.step(closure)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_a_foreign_state():
    model, optimizer, _ = _mlp_setup()
    adam_state = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not an SCG state_dict"):
        optimizer.load_state_dict(adam_state)


def test_load_state_dict_refuses_scalars_of_the_wrong_type():
    model, optimizer, closure = _mlp_setup()
    optimizer.step(closure)
    state = optimizer.state_dict()
    state["scg"]["scalars"]["k"] = "5"
    fresh = SCG(make_mlp().parameters())
    with pytest.raises(ValueError, match="k = '5'"):
        fresh.load_state_dict(state)
    state["scg"]["scalars"]["k"] = 1
    del state["scg"]["scalars"]["lambd"]
    with pytest.raises(ValueError, match="expected the fields"):
        fresh.load_state_dict(state)


def test_deepcopy_and_pickle_keep_the_state():
    model, optimizer, closure = _mlp_setup()
    for _ in range(4):
        optimizer.step(closure)
    for twin in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert twin.state_dict()["scg"] == optimizer.state_dict()["scg"]
        assert twin.trace == optimizer.trace


def test_deepcopied_model_and_optimizer_continue_identically():
    model, optimizer, closure = _mlp_setup()
    for _ in range(4):
        optimizer.step(closure)
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    x, y = mlp_data()
    twin_closure = closure_for(
        twin_optimizer, list(twin_model.parameters()), lambda: torch.mean((twin_model(x) - y) ** 2), "double-backward"
    )
    for _ in range(4):
        optimizer.step(closure)
        twin_optimizer.step(twin_closure)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------------------------
# torch.optim conventions.


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda loss: loss,  # 0-dim tensor
        lambda loss: loss.reshape(1),  # one-element tensor
        lambda loss: float(loss.detach()),  # Python float
    ],
)
def test_closure_may_return_tensor_or_number(make_loss):
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward(create_graph=True)
        return make_loss(loss)

    for _ in range(3):
        loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float64
    assert float(loss) == float(rosenbrock(w.detach()))


@pytest.mark.parametrize("bad", [torch.ones(2), "1.0", None, True, torch.tensor(True)])
def test_closure_returning_a_non_scalar_raises_type_error(bad):
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        (w**2).sum().backward(create_graph=True)
        return bad

    with pytest.raises(TypeError, match="scalar loss"):
        optimizer.step(closure)


def test_step_without_closure_raises_type_error():
    optimizer = SCG([nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()  # type: ignore[call-arg]


def test_missing_create_graph_raises_a_clear_error():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        optimizer.step(closure)


@pytest.mark.parametrize("gradient", ["zero", "none"])
def test_a_closure_without_a_graph_at_a_zero_gradient_leaves_the_weights(gradient):
    # torch.optim's test_step_is_noop_for_zero_grads and test_step_is_noop_when_params_have_no_grad: a closure that
    # sets zero gradients (or none) without a graph. No curvature product is needed at r = 0, so no graph either.
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = SCG([w])

    def closure():
        w.grad = torch.zeros_like(w) if gradient == "zero" else None
        return torch.tensor(1.0, dtype=torch.float64)

    for _ in range(3):
        assert float(optimizer.step(closure)) == 1.0
    assert w.tolist() == [1.0, -2.0]


@pytest.mark.parametrize("options", [{}, {"hvp": "finite-difference"}, {"memory": 3, "hvp": "double-backward"}])
def test_a_frozen_parameter_has_a_zero_gradient_and_stays(options):
    # Fine-tuning: SCG(model.parameters()) over a model with a frozen layer, as torch.optim.LBFGS takes it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    optimizer = SCG(model.parameters(), **options)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=True)
        return loss

    first = float(closure().detach())
    for _ in range(10):
        optimizer.step(closure)
    assert optimizer.trace.loss < 0.9 * first
    assert torch.equal(model[0].weight, frozen)


def test_weights_replaced_by_vector_to_parameters_restart_scg():
    # vector_to_parameters gives each parameter new storage (p.data = …), which its version counter does not see.
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    optimizer = SCG([w], memory=2)

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(w)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    accepted = optimizer.trace.loss
    nn.utils.vector_to_parameters(torch.tensor([3.0, -2.0], dtype=torch.float64), [w])
    replaced = float(rosenbrock(w.detach()))  # 12,104
    optimizer.step(closure)
    # Restarted from the new weights, whose loss the step's trial is judged against; a stale E(w) (the old run's,
    # below 5) would reject every trial from there on, and the trace would report that stale loss.
    assert accepted < 5 and 1000 < optimizer.trace.loss <= replaced


def test_a_float16_step_longer_than_float16_holds_is_taken_as_a_trial():
    # α = μ/δ ≈ 2·10⁶ and 10⁵ > 65504, the largest float16 (E'' = 10⁻⁵): torch refuses such an alpha; SCG forms αp
    # instead, rejects the overflowing trial point, raises λ and goes on, where before it raised at every step.
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float16))
    optimizer = SCG([w])

    def closure():
        optimizer.zero_grad()
        loss = 5e-6 * ((w - 3) ** 2).sum()
        loss.backward(create_graph=True)
        return loss

    alphas = []
    for _ in range(4):
        optimizer.step(closure)
        alphas.append(optimizer.trace.alpha)
    assert min(alphas) > torch.finfo(torch.float16).max
    assert optimizer.trace.success and torch.isfinite(w).all()
    assert w.tolist() == pytest.approx([3.0, 3.0], abs=0.01)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1e-5}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"lambd": 0.0}, "lambd"),
        ({"lambd": -1.0}, "lambd"),
        ({"hvp": "exact"}, "hvp"),
        ({"restart": 0}, "restart"),
        ({"restart": 2.5}, "restart"),
        ({"lambd": True}, "lambd"),
        ({"sigma": True}, "sigma"),
        ({"sigma": 1e300}, "sigma.*SIGMA_MAX"),
        ({"lambd": 1e300}, "lambd.*LAMBDA_MAX"),
        ({"lambd": 1e100}, "lambd.*LAMBDA_MAX"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        SCG([nn.Parameter(torch.zeros(1))], **options)


@pytest.mark.filterwarnings("ignore::moller_scg.scg.SCGStalledWarning")
def test_largest_accepted_sigma_and_lambd_keep_the_step_finite():
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    for options in ({"sigma": 1.0, "hvp": "finite-difference"}, {"lambd": 1e99}):
        optimizer = SCG([w], **options)
        closure = closure_for(optimizer, [w], lambda: rosenbrock(w), options.get("hvp", "double-backward"))
        for _ in range(3):
            loss = optimizer.step(closure)
        assert math.isfinite(float(loss)) and math.isfinite(optimizer.trace.delta)


def test_a_parameter_listed_twice_in_a_group_is_refused():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="#1 of group 0 appears twice.*also as #0"):
        SCG([w, w])
    with pytest.raises(ValueError, match="'b' appears twice"):
        SCG([("a", w), ("b", w)])


def test_a_parameter_in_two_groups_is_refused_and_the_optimizer_stays_usable():
    w, v = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="#0 of group 1 is already in parameter group 0"):
        SCG([{"params": [w]}, {"params": [w]}])
    optimizer = SCG([w])
    with pytest.raises(ValueError, match="already in parameter group 0"):
        optimizer.add_param_group({"params": [v, w]})
    with pytest.raises(ValueError, match="same 'lambd'"):
        optimizer.add_param_group({"params": [v], "lambd": 1e-3})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_a_non_floating_parameter_is_refused_naming_its_dtype(dtype):
    counter = nn.Parameter(torch.zeros(3, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=f"'counter' has dtype {dtype}.*floating-point or complex"):
        SCG([("weight", nn.Parameter(torch.zeros(2))), ("counter", counter)])


@pytest.mark.parametrize(
    "options, advice",
    [
        ({"lr": 1}, "no learning rate"),
        ({"line_search_fn": "strong_wolfe"}, "no line search"),
        ({"max_iter": 20}, "call step max_iter times"),
        ({"history_size": 100}, "history of secant pairs is memory=m"),
        ({"tolerance_grad": 1e-7}, "residual_norm"),
        ({"tolerance_change": 1e-9}, "trace.stalled"),
        ({"betas": (0.9, 0.999)}, "no Adam moments"),
        ({"eps": 1e-8}, "fixed ε"),
        ({"weight_decay": 1e-4}, "add the penalty to the loss"),
    ],
)
def test_options_of_lbfgs_and_adam_get_advice_instead_of_a_bare_type_error(options, advice):
    with pytest.raises(TypeError, match=advice) as raised:
        SCG([nn.Parameter(torch.zeros(1))], **options)
    assert "options are sigma, lambd, hvp, restart, memory and diagonal_scaling;" in str(raised.value)


def test_a_whole_lbfgs_line_is_refused_with_advice_for_every_option():
    options = {"lr": 1, "max_iter": 20, "history_size": 100, "line_search_fn": "strong_wolfe", "momentum": 0.9}
    with pytest.raises(TypeError) as raised:
        SCG([nn.Parameter(torch.zeros(1))], **options, not_an_option=3)
    message = str(raised.value)
    for name in options:
        assert f"\n  {name}: " in message
    assert "not_an_option: not an option of SCG" in message


def test_an_lr_scheduler_is_refused_with_the_reason():
    optimizer = SCG([nn.Parameter(torch.zeros(1))])
    with pytest.raises(KeyError, match="SCG has no learning rate"):
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    assert optimizer.param_groups[0].get("lr") is None and "lr" not in optimizer.param_groups[0]


def test_an_lr_scheduler_is_refused_after_load_state_dict_and_deepcopy():
    model, optimizer, closure = _mlp_setup()
    optimizer.step(closure)
    fresh = SCG(make_mlp(seed=5).parameters())
    fresh.load_state_dict(optimizer.state_dict())
    for candidate in (fresh, copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        with pytest.raises(KeyError, match="SCG has no learning rate"):
            torch.optim.lr_scheduler.ExponentialLR(candidate, gamma=0.9)


def test_param_groups_must_share_hyperparameters():
    with pytest.raises(ValueError, match="same 'lambd'"):
        SCG([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))], "lambd": 1e-6}])


def test_param_groups_optimize_like_one_group():
    single_model, grouped_model = make_mlp(), make_mlp()
    x, y = mlp_data()
    single = run_scg(list(single_model.parameters()), lambda: torch.mean((single_model(x) - y) ** 2), 10)
    layers = list(grouped_model.children())
    groups = [{"params": layers[0].parameters()}, {"params": layers[2].parameters()}]
    optimizer = SCG(groups)
    params = list(grouped_model.parameters())
    closure = closure_for(optimizer, params, lambda: torch.mean((grouped_model(x) - y) ** 2), "double-backward")
    grouped = []
    for _ in range(10):
        optimizer.step(closure)
        grouped.append(flat(params))
    assert_trajectories_equal(grouped, single, rtol=0)


def test_named_parameters_work_as_params():
    model = make_mlp()
    twin = make_mlp()
    x, y = mlp_data()
    by_name = SCG(model.named_parameters())
    closure = closure_for(by_name, list(model.parameters()), lambda: torch.mean((model(x) - y) ** 2), "double-backward")
    plain = run_scg(list(twin.parameters()), lambda: torch.mean((twin(x) - y) ** 2), 5)
    for _ in range(5):
        by_name.step(closure)
    assert torch.equal(flat(model.parameters()), plain[-1])
    assert by_name.state_dict()["param_groups"][0]["param_names"] == [name for name, _ in model.named_parameters()]


def test_parameter_without_grad_has_zero_gradient_and_stays_put():
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    unused = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = SCG([w, unused])
    closure = closure_for(optimizer, [w, unused], lambda: rosenbrock(w), "double-backward")
    alone = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    # The unused parameter only counts towards the default restart period N = 4.
    expected = run_scg([alone], lambda: rosenbrock(alone), 20, restart=4)
    for k in range(20):
        optimizer.step(closure)
        assert torch.equal(w.detach(), expected[k])
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_step_at_zero_gradient_leaves_weights_unchanged(mode):
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))  # the minimum of Rosenbrock
    optimizer = SCG([w], hvp=mode)
    closure = closure_for(optimizer, [w], lambda: rosenbrock(w), mode)
    for _ in range(3):
        loss = optimizer.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert float(loss) == 0.0


def test_underflowing_mu_is_treated_as_a_stationary_point():
    # On E = |w|² SCG converges so fast that μ = pᵀr underflows in float64 (μ² = 0) before r is exactly 0.
    w = nn.Parameter(torch.tensor([1.5, -0.5], dtype=torch.float64))
    optimizer = SCG([w])
    closure = closure_for(optimizer, [w], lambda: (w**2).sum(), "double-backward")
    for _ in range(40):
        optimizer.step(closure)
    assert torch.isfinite(w).all() and float((w.detach() ** 2).sum()) < 1e-150


def test_restart_starts_again_at_step_one_from_the_current_weights():
    a, b = spd_quadratic(5, seed=9)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = SCG([w])
    calls = []
    closure = closure_for(optimizer, [w], lambda: function(w), "double-backward", calls)
    for _ in range(2):
        optimizer.step(closure)
    state = optimizer.state_dict()
    twin = SCG([w])
    twin.load_state_dict(state)  # a loaded optimizer does not notice writes until the first step…
    with torch.no_grad():
        w.fill_(0.25)
    twin.restart()  # …so it is told
    fresh = nn.Parameter(torch.full((5,), 0.25, dtype=torch.float64))
    expected = run_scg([fresh], lambda: function(fresh), 1)
    twin_closure = closure_for(twin, [w], lambda: function(w), "double-backward")
    twin.step(twin_closure)
    assert torch.equal(w.detach(), expected[-1])


def test_closure_hvp_over_other_parameters_is_refused():
    model = make_mlp()
    x, y = mlp_data()
    params = list(model.parameters())
    optimizer = SCG(params[::-1])

    class Closure:
        def __init__(self):
            self.params = params

        def __call__(self):
            optimizer.zero_grad()
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            return loss

        def hvp(self, vectors):
            return [torch.zeros_like(v) for v in vectors]

    with pytest.raises(ValueError, match="params="):
        optimizer.step(Closure())


def test_grad_is_never_modified_in_place():
    model, optimizer, closure = _mlp_setup()
    produced = []

    def recording_closure():
        loss = closure()
        produced.append([(p.grad, p.grad.detach().clone()) for p in model.parameters()])
        return loss

    for _ in range(5):
        optimizer.step(recording_closure)
    for grads in produced:
        for grad, snapshot in grads:
            assert torch.equal(grad.detach(), snapshot)


def test_complex_parameters_are_optimized_as_real_and_imaginary_parts():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, dtype=torch.complex128, generator=generator)
    b = torch.randn(4, dtype=torch.complex128, generator=generator)

    def complex_loss(z):
        return torch.sum(torch.abs(a @ z - b) ** 2) + torch.sum(torch.abs(z) ** 4)

    z = nn.Parameter(torch.zeros(4, dtype=torch.complex128))
    complex_trajectory = run_scg([z], lambda: complex_loss(z), 15)

    x = nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    real_trajectory = run_scg([x], lambda: complex_loss(torch.view_as_complex(x)), 15)
    complex_as_real = [torch.view_as_real(t.view(torch.complex128)).reshape(-1) for t in complex_trajectory]
    # complex_trajectory holds complex values flattened; compare in the real view.
    complex_as_real = [torch.view_as_real(t).reshape(-1) for t in complex_trajectory]
    assert_trajectories_equal(complex_as_real, real_trajectory, rtol=1e-10)
    assert complex_loss(z.detach()) < complex_loss(torch.zeros(4, dtype=torch.complex128))


def test_non_contiguous_parameter_optimizes_like_a_contiguous_one():
    a, b = spd_quadratic(6, seed=7)
    function = quadratic_function(a, b)
    contiguous = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    strided = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64).t())
    assert not strided.is_contiguous()
    expected = run_scg([contiguous], lambda: function(contiguous.reshape(-1)), 8)
    actual = run_scg([strided], lambda: function(strided.reshape(-1)), 8)
    assert_trajectories_equal(actual, expected, rtol=1e-12)


def _small_cnn_run(memory_format: torch.memory_format, steps: int, **options):
    """A float64 CNN (3 input channels, so that channels_last really reorders its weights), its SCG and closure."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    model = model.to(memory_format=memory_format)
    images = torch.randn(24, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (24,))
    optimizer = SCG(model.parameters(), **options)
    create_graph = optimizer.uses_exact_curvature

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward(create_graph=create_graph)
        return loss

    trajectory = []
    for _ in range(steps):
        optimizer.step(closure)
        trajectory.append(flat(model.parameters()))
    return model, optimizer, closure, trajectory


@pytest.mark.parametrize(
    "options", [{}, {"hvp": "finite-difference"}, {"memory": 4}, {"memory": 4, "diagonal_scaling": True}]
)
def test_channels_last_parameters_take_the_steps_of_contiguous_ones(options):
    """A CNN laid out as ``torch.channels_last`` (the main job's) is the same w in another order in memory: SCG takes
    the same steps (the convolutions' sums round differently), keeps the weights' layout, and resumes bit for bit."""
    _, _, _, expected = _small_cnn_run(torch.contiguous_format, 12, **options)
    model, optimizer, closure, actual = _small_cnn_run(torch.channels_last, 12, **options)
    assert not model[0].weight.is_contiguous() and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_trajectories_equal(actual, expected, rtol=1e-8)
    assert float(closure()) < 0.5 * float(nn.functional.cross_entropy(torch.zeros(1, 3), torch.tensor([0])))

    paused_model, paused_optimizer, _, _ = _small_cnn_run(torch.channels_last, 6, **options)
    buffer = io.BytesIO()
    torch.save({"model": paused_model.state_dict(), "optimizer": paused_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed_optimizer, resumed_closure, _ = _small_cnn_run(torch.channels_last, 0, **options)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(6):
        resumed_optimizer.step(resumed_closure)
    assert torch.equal(flat(resumed_model.parameters()), actual[-1])

    # A state saved in the default layout (a checkpoint of the main job before it was channels_last) goes on there.
    contiguous_model, contiguous_optimizer, _, _ = _small_cnn_run(torch.contiguous_format, 6, **options)
    moved_model, moved_optimizer, moved_closure, _ = _small_cnn_run(torch.channels_last, 0, **options)
    moved_model.load_state_dict(contiguous_model.state_dict())
    moved_optimizer.load_state_dict(contiguous_optimizer.state_dict())
    for _ in range(6):
        moved_optimizer.step(moved_closure)
    assert_trajectories_equal([flat(moved_model.parameters())], [expected[-1]], rtol=1e-8)


def test_sparse_gradient_raises_type_error():
    embedding = nn.Embedding(5, 2, sparse=True).double()
    optimizer = SCG(embedding.parameters(), hvp="finite-difference")

    def closure():
        optimizer.zero_grad()
        loss = embedding(torch.tensor([0, 1])).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="sparse"):
        optimizer.step(closure)


def test_step_hooks_called_once_per_step():
    model, optimizer, closure = _mlp_setup()
    pre, post = [], []
    optimizer.register_step_pre_hook(lambda *args: pre.append(1))
    optimizer.register_step_post_hook(lambda *args: post.append(1))
    for _ in range(3):
        optimizer.step(closure)
    assert len(pre) == len(post) == 3


def test_zero_grad_and_repr():
    model, optimizer, closure = _mlp_setup()
    optimizer.step(closure)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    text = repr(optimizer)
    assert text.startswith("SCG (") and "lambd" in text and "sigma" in text


def test_weights_changed_between_steps_restart_from_the_new_point():
    a, b = spd_quadratic(5, seed=8)
    function = quadratic_function(a, b)
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = SCG([w])
    calls = []
    closure = closure_for(optimizer, [w], lambda: function(w), "double-backward", calls)
    optimizer.step(closure)
    with torch.no_grad():
        w.fill_(0.5)
    fresh_w = nn.Parameter(torch.full((5,), 0.5, dtype=torch.float64))
    expected = run_scg([fresh_w], lambda: function(fresh_w), 1)
    before = len(calls)
    optimizer.step(closure)
    assert len(calls) - before == 2  # re-evaluation at the new weights + the trial
    assert torch.equal(w.detach(), expected[-1])


# ---------------------------------------------------------------------------------------------------------------
# Memory and arithmetic of a step.


def _memory_owner(array: np.ndarray) -> int:
    """The address of the memory a NumPy array views: its torch tensor's storage, or the array that owns it."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    if isinstance(array, torch.Tensor):
        return array.untyped_storage().data_ptr()
    return array.__array_interface__["data"][0]


def _parameter_sized_buffers_during_steps(
    optimizer: SCG, w: torch.Tensor, closure, steps: int, before_step=None, only_in: str | None = None
):
    """The most tensors of w's size that SCG held at once, checked at every line SCG and its helpers executed.

    Held means referenced from a frame of ``moller_scg`` code or from ``optimizer.state``; w itself and every
    gradient the closure produced (all kept alive, so their memory is never reused) do not count. Temporaries
    that live within one line are not seen, so this counts buffers, not allocator traffic. With ``only_in``, the
    name of one of SCG's functions, only that function's own frame is looked at, at each of its lines. A NumPy
    array of n numbers counts as the tensor whose memory it views (the pairs' arithmetic on small CPU blocks,
    :mod:`moller_scg.pair_arithmetic`), or as a buffer of its own.
    """
    package = os.path.dirname(vec.__file__)
    n = w.numel()
    peak = 0

    def held(frame, returned) -> int:
        excluded = {w.untyped_storage().data_ptr()} | {g.untyped_storage().data_ptr() for g in closure.gradients}
        storages = set()

        def visit(value):
            if isinstance(value, torch.Tensor):
                if value.numel() == n:
                    storages.add(value.untyped_storage().data_ptr())
            elif isinstance(value, np.ndarray):
                if value.size == n:
                    storages.add(_memory_owner(value))
            elif isinstance(value, (list, tuple)):
                for item in value:
                    visit(item)

        visit(returned)
        if only_in is not None:
            visit(list(frame.f_locals.values()))
            return len(storages - excluded)
        for param_state in optimizer.state.values():
            visit(list(param_state.values()))
        while frame is not None:
            if frame.f_code.co_filename.startswith(package):
                visit(list(frame.f_locals.values()))
            frame = frame.f_back
        return len(storages - excluded)

    def trace_lines(frame, event, arg):
        nonlocal peak
        peak = max(peak, held(frame, arg if event == "return" else None))
        return trace_lines

    def trace_calls(frame, event, arg):
        if only_in is not None:
            return trace_lines if frame.f_code.co_name == only_in else None
        return trace_lines if frame.f_code.co_filename.startswith(package) else None

    previous_tracer = sys.gettrace()  # a coverage tool's, for example
    for k in range(steps):
        if before_step is not None:
            before_step(k)
        sys.settrace(trace_calls)
        try:
            optimizer.step(closure)
        finally:
            sys.settrace(previous_tracer)
    return peak


@pytest.mark.parametrize("mode", MODES)
def test_a_step_holds_at_most_four_parameter_sized_buffers(mode):
    # The accepted w, r and p, and one of s = E''p (step 2) or r₊ (step 7): never s and r₊ together, and the new
    # direction p₊ is formed in p's storage. Successes, failures, restarts and the p ⟂ r fallback all occur.
    w = nn.Parameter(torch.tensor([-1.2, 1.0] * 19, dtype=torch.float64))  # 19 Rosenbrock pairs: n = 38

    def closure():
        optimizer.zero_grad()
        x, y = w[0::2], w[1::2]
        loss = torch.sum(100 * (y - x**2) ** 2 + (1 - x) ** 2)
        loss.backward(create_graph=(mode == "double-backward"))
        closure.gradients.append(w.grad)
        return loss

    closure.gradients = []
    optimizer = SCG([w], hvp=mode, restart=4)
    successes = []

    def before_step(k):
        if k > 0:
            successes.append(optimizer.trace.success)
        if k == 6:  # p ⟂ r exactly: the step searches along r
            state = optimizer.state[w]
            state["direction"] = torch.zeros_like(w)
            state["direction"][:2] = torch.stack([state["residual"][1], -state["residual"][0]])

    peak = _parameter_sized_buffers_during_steps(optimizer, w, closure, 14, before_step)
    assert False in successes and optimizer.trace.k == 14
    assert 3 <= peak <= 4  # 6 before p was updated in place and s released early, 7 in the p ⟂ r fallback


@pytest.mark.parametrize("mode", MODES)
def test_direction_orthogonal_to_the_residual_falls_back_to_steepest_descent(mode):
    # μ = pᵀr = 0 exactly: the step searches along r, as if p were a copy of r after a success (λ̄ = 0).
    def setup():
        w = nn.Parameter(torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64))
        optimizer = SCG([w], hvp=mode)
        return w, optimizer, closure_for(optimizer, [w], lambda: rosenbrock(w), mode)

    w, optimizer, closure = setup()
    for _ in range(3):
        optimizer.step(closure)
    state = optimizer.state[w]
    r = state["residual"]
    state["direction"].zero_()[:2] = torch.stack([r[1], -r[0]])
    assert vec.dot([state["direction"]], [r]) == 0.0

    twin_w, twin, twin_closure = setup()
    with torch.no_grad():
        twin_w.copy_(w)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["direction"] = saved["state"][0]["residual"].clone()
    saved["scg"]["scalars"] |= {"success": True, "lambd_bar": 0.0}
    twin.load_state_dict(saved)
    for _ in range(6):
        optimizer.step(closure)
        twin.step(twin_closure)
        assert torch.equal(w, twin_w)
        for key in ("residual", "direction"):
            assert torch.equal(optimizer.state[w][key], twin.state[twin_w][key])
        assert optimizer.state[w]["direction"].data_ptr() != optimizer.state[w]["residual"].data_ptr()


def test_loaded_state_is_not_shared_with_the_state_dict_it_came_from():
    model, optimizer, closure = _mlp_setup()
    for _ in range(3):
        optimizer.step(closure)
    twin = SCG(model.parameters())
    twin.load_state_dict(optimizer.state_dict())
    snapshot = copy.deepcopy(twin.state_dict()["state"])
    optimizer.step(closure)  # updates its direction p in place
    for index, entries in twin.state_dict()["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, snapshot[index][key])


@pytest.mark.parametrize("mode", MODES)
def test_trace_reports_the_norms_and_mu_of_the_state_bit_for_bit(mode):
    # |r|, |p| and the next μ = pᵀr are formed once, at the end of the step before; they must be those of the
    # state, also after the state's p was changed in place between steps.
    w = nn.Parameter(torch.tensor([-1.2, 1.0, -0.5, 0.8, 0.3], dtype=torch.float64))
    optimizer = SCG([w], hvp=mode, restart=3)
    closure = closure_for(optimizer, [w], lambda: rosenbrock(w), mode)
    optimizer.step(closure)
    failures = 0
    for k in range(25):
        state = optimizer.state[w]
        if k == 10:
            state["direction"].mul_(0.5)
        mu = vec.dot([state["direction"]], [state["residual"]])
        optimizer.step(closure)
        trace = optimizer.trace
        failures += not trace.success
        assert trace.mu == mu
        assert trace.residual_norm == math.sqrt(vec.squared_norm([state["residual"]]))
        assert trace.direction_norm == math.sqrt(vec.squared_norm([state["direction"]]))
    assert failures > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.complex64])
def test_batched_inner_products_equal_separate_ones(dtype):
    generator = torch.Generator().manual_seed(0)
    xs, ys, zs = ([torch.randn(shape, generator=generator).to(dtype) for shape in [(5, 3), (7,), ()]] for _ in "xyz")
    pairs = [(xs, ys), (xs, xs), (zs, ys)]
    products = vec.dots(pairs)
    assert products == [vec.dot(a, b) for a, b in pairs]

    # The elementwise products are rounded to the tensors' dtype (float32 for float16), their sum is float64 (in
    # another order here).
    def reference(a, b):
        return math.fsum(
            float(v)
            for x, y in zip(a, b)
            for v in (vec.widened(vec.as_real(x)) * vec.widened(vec.as_real(y))).reshape(-1)
        )

    assert products == pytest.approx([reference(a, b) for a, b in pairs], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128])
def test_finite_difference_from_the_residual_is_finite_difference_hvp_bit_for_bit(dtype):
    # s = (E'(w + σₖp) + r)/σₖ, without forming −r, is curvature.finite_difference_hvp of E'(w + σₖp) and E'(w) = −r.
    generator = torch.Generator().manual_seed(1)
    shifted, residual = ([torch.randn(shape, generator=generator).to(dtype) for shape in [(50,), (4, 6)]] for _ in "ab")
    shifted[0][:3] = torch.tensor([0.0, -0.0, 1.0]).to(dtype)
    residual[0][:3] = torch.tensor([-0.0, 0.0, -1.0]).to(dtype)
    for sigma_k in (5e-5, 3.0, 1e-300):
        expected = finite_difference_hvp(shifted, vec.negated(residual), sigma_k)
        actual = step_arithmetic.finite_difference_from_residual(shifted, residual, sigma_k)
        for a, e in zip(actual, expected):
            assert torch.equal(vec.as_real(a).view(-1).view(torch.uint8), vec.as_real(e).view(-1).view(torch.uint8))


def test_an_overflowing_squared_norm_is_not_taken_for_a_non_finite_gradient():
    large = [torch.tensor([1e20, -1.0]), torch.tensor([2.0])]
    assert math.isinf(vec.squared_norm(large))  # (10²⁰)² overflows float32
    assert step_arithmetic.all_finite_given_squared_norm(large, vec.squared_norm(large))
    for bad in (math.inf, -math.inf, math.nan):
        vectors = [large[0], torch.tensor([bad])]
        assert not step_arithmetic.all_finite_given_squared_norm(vectors, vec.squared_norm(vectors))


def test_float16_products_are_formed_in_float32_so_a_gradient_beyond_256_has_a_finite_norm():
    half = [torch.tensor([300.0, -1.0], dtype=torch.float16), torch.tensor([2.0], dtype=torch.float16)]
    assert vec.squared_norm(half) == 300.0**2 + 1.0 + 4.0  # 300² overflows float16 itself
    assert vec.dot(half, half) == vec.dots([(half, half)])[0] == 90005.0


# ---------------------------------------------------------------------------------------------------------------
# Properties on random quadratics.


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=10_000),
    mode=st.sampled_from(MODES),
)
def test_random_spd_quadratics_match_reference_and_never_increase_the_loss(n, seed, mode):
    a, b = spd_quadratic(n, seed)
    function = quadratic_function(a, b)
    generator = torch.Generator().manual_seed(seed + 1)
    w1 = torch.randn(n, generator=generator, dtype=torch.float64)
    w = nn.Parameter(w1.clone())
    optimizer = SCG([w], hvp=mode)
    closure = closure_for(optimizer, [w], lambda: function(w), mode)
    losses, trajectory = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2 * n + 2):
            losses.append(float(optimizer.step(closure)))
            trajectory.append(flat([w]))
    expected = reference_scg(
        problem_from_function(function), w1, 2 * n + 2, finite_difference=(mode == "finite-difference")
    )
    assert_trajectories_equal(trajectory, expected, rtol=1e-8)
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    solution = torch.linalg.solve(a, b)
    assert float(function(w.detach()) - function(solution)) <= 1e-8 * max(1.0, abs(float(function(solution))))


# ---------------------------------------------------------------------------------------------------------------
# Rounding: the loss difference drowns before the slopes do; a stall is signalled.


def _offset_quadratic_run(dtype: torch.dtype, iterations: int) -> tuple[float, SCG]:
    """SCG on E(w) = 1 + ½ Σ sᵢ(wᵢ − cᵢ)² (a loss with a floor, as a noisy regression has), in ``dtype``.

    Returns the excess E(w) − 1 of the final weights, computed in float64, and the optimizer.
    """
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 0, 30, dtype=torch.float64)
    centre = torch.randn(30, generator=generator, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(30, dtype=dtype))
    s, c = scales.to(dtype), centre.to(dtype)
    optimizer = SCG([w])
    closure = closure_for(optimizer, [w], lambda: 1 + 0.5 * torch.sum(s * (w - c) ** 2), "double-backward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SCGStalledWarning)
        for _ in range(iterations):
            optimizer.step(closure)
    return float(0.5 * torch.sum(scales * (w.detach().double() - centre) ** 2)), optimizer


def test_float32_progress_goes_on_below_the_loss_resolution():
    # Without the slope estimate this run stalls with λ at 1e68 and an excess of 2.9e-7, about 2.4 float32 ulps of E.
    excess, optimizer = _offset_quadratic_run(torch.float32, 300)
    assert excess < 1e-12
    assert optimizer.trace.lambd < 1.0


def test_float64_trajectory_is_bit_identical_where_the_loss_difference_is_resolved(monkeypatch):
    model, optimizer, closure = _mlp_setup()
    trajectory = []
    for _ in range(40):
        optimizer.step(closure)
        trajectory.append(flat(model.parameters()))
    monkeypatch.setattr(step_arithmetic, "loss_decrease", lambda loss, trial_loss, *args, **kwargs: loss - trial_loss)
    paper_model, paper_optimizer, paper_closure = _mlp_setup()
    for expected in trajectory:
        paper_optimizer.step(paper_closure)
        assert torch.equal(flat(paper_model.parameters()), expected)


def test_rounding_level_decrease_is_estimated_from_the_slopes():
    # On E = 1 + ½(w − 1)², from w = 1 − 1e-9 a full step decreases E by 5e-19, far below float64's ulp of 1.
    loss, trial_loss, alpha, mu, trial_dot = 1.0, 1.0, 1.0, 1e-18, 0.0
    eps = torch.finfo(torch.float64).eps
    assert step_arithmetic.loss_decrease(loss, trial_loss, alpha, mu, trial_dot, eps, unchanged=False) == 5e-19
    assert step_arithmetic.loss_decrease(loss, trial_loss, alpha, mu, trial_dot, eps, unchanged=True) == 0.0
    resolved = 1.0 - 4 * eps * 1.1  # a decrease of just over UNRESOLVED_DECREASE_ULPS ulps is a measurement
    assert step_arithmetic.loss_decrease(loss, resolved, alpha, mu, trial_dot, eps, unchanged=False) == loss - resolved
    increase = 1.0 + eps  # a measured increase stands, so an accepted step never raises the reported loss
    assert step_arithmetic.loss_decrease(loss, increase, alpha, mu, trial_dot, eps, unchanged=False) == loss - increase


def test_steps_3_and_4_scale_delta_by_lambda_and_make_it_positive():
    # Step 3 alone: δ = 2 + (0.5 − 0.25)·4 = 3, λ and λ̄ unchanged.
    assert step_arithmetic.scaled_curvature(2.0, 0.5, 0.25, 4.0) == (3.0, 0.5, 0.25)
    # Step 4: δ = −3 + (0.5 − 0)·4 = −1 ≤ 0, so λ̄ = 2(0.5 + 1/4) = 1.5, δ = 1 + 0.5·4 = 3 and λ = λ̄.
    assert step_arithmetic.scaled_curvature(-3.0, 0.5, 0.0, 4.0) == (3.0, 1.5, 1.5)
    # δ = 0 after step 3 counts as not positive (Møller's δ ≤ 0).
    assert step_arithmetic.scaled_curvature(-2.0, 0.5, 0.0, 4.0) == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("step_hook", [False, True], ids=["bare-step", "behind-torchs-step-wrapper"])
def test_stalled_flag_and_a_single_warning_once_steps_change_nothing(step_hook):
    # float32 least squares, condition number 1e4: the loss's rounding error is ~100 ulps here (the residuals cancel),
    # more than UNRESOLVED_DECREASE_ULPS, so trials get rejected, λ climbs and αp drops below the weights' resolution.
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(200, 20, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator, dtype=torch.float64))
    a = left @ torch.diag(torch.logspace(0, 2, 20, dtype=torch.float64)) @ right.T * math.sqrt(200)
    y = a @ torch.randn(20, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(200, generator=generator)
    a, y = a.float(), y.float()
    w = nn.Parameter(torch.zeros(20))
    optimizer = SCG([w])
    if step_hook:  # torch.optim's step wrapper then runs (moller_scg.step_wrapper): two more frames above the warning
        optimizer.register_step_pre_hook(lambda *args: None)
    closure = closure_for(optimizer, [w], lambda: torch.mean((a @ w - y) ** 2), "double-backward")
    flags = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(450):
            optimizer.step(closure)
            flags.append(optimizer.trace.stalled)
    stalled_warnings = [w for w in caught if issubclass(w.category, SCGStalledWarning)]
    assert True in flags[100:] and not any(flags[:100])
    first = flags.index(True)
    assert all(flags[first:]), "a stall lasts"
    assert optimizer.trace.success and optimizer.trace.comparison == 0.0  # "successful" no-op steps
    assert len(stalled_warnings) == 1 and f"iteration {first + 1}" in str(stalled_warnings[0].message)
    assert "optimizer.trace.stalled" in str(stalled_warnings[0].message)
    assert stalled_warnings[0].filename == __file__  # the line that called step, not torch's decorator


def test_stalled_when_lambda_reaches_its_bound():
    trace = SCGTrace(1, 1.0, False, LAMBDA_MAX, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 2, 1)
    assert trace.stalled and not dataclasses.replace(trace, lambd=1.0).stalled
    assert "stalled" not in dataclasses.asdict(trace)  # fit's History rows and the state_dict keep their fields
