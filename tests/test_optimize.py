"""moller_scg/optimize.py — minimize(fun, x0): SCG on functions of tensors and pytrees, its stopping rules, counts
and input checks."""

from __future__ import annotations

import gc
import math
import sys
import warnings
import weakref

import numpy
import pytest
import torch
from problems import rosenbrock

import moller_scg
import moller_scg.optimize
from moller_scg import OptimizeResult, minimize
from moller_scg.optimize import (
    DEFAULT_FTOL,
    STATUS_CALLBACK,
    STATUS_GRADIENT,
    STATUS_MAX_ITER,
    STATUS_NON_FINITE,
    STATUS_STALLED,
)

MODES = ["double-backward", "finite-difference"]


def test_moller_scg_minimize_is_the_function_and_its_module_is_moller_scg_optimize():
    assert moller_scg.minimize is moller_scg.optimize.minimize and callable(moller_scg.minimize)
    assert moller_scg.OptimizeResult is moller_scg.optimize.OptimizeResult
    assert minimize.__module__ == "moller_scg.optimize" and OptimizeResult.__module__ == "moller_scg.optimize"
    assert "moller_scg.minimize" not in sys.modules  # no module of that name competes with the function


class CountingFunction:
    """fun, counting its calls: an independent check of nfev."""

    def __init__(self, fun):
        self.fun, self.calls = fun, 0

    def __call__(self, x):
        self.calls += 1
        return self.fun(x)


@pytest.mark.parametrize("hvp", MODES)
def test_rosenbrock_reaches_the_minimum_to_1e_10_in_float64(hvp):
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = minimize(rosenbrock, x0, hvp=hvp, tol=1e-10)
    assert result.success and result.status == STATUS_GRADIENT
    assert torch.allclose(result.x, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-10)
    assert result.fun < 1e-20
    assert torch.linalg.vector_norm(result.jac) <= 1e-10
    # jac is E'(x) at the returned x (not at a trial point): compare with autograd there.
    x = result.x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(rosenbrock(x), x)
    torch.testing.assert_close(result.jac, gradient, rtol=0, atol=1e-14)


def test_exponential_decay_fit_recovers_amplitude_and_rate():
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(0.0, 4.0, 50, dtype=torch.float64)
    amplitude, rate = 2.5, 1.3
    y = amplitude * torch.exp(-rate * t) + 1e-3 * torch.randn(50, generator=generator, dtype=torch.float64)

    def squared_residual(params):
        return torch.sum((params["amplitude"] * torch.exp(-params["rate"] * t) - y) ** 2)

    x0 = {"amplitude": torch.tensor(1.0, dtype=torch.float64), "rate": torch.tensor(0.5, dtype=torch.float64)}
    result = minimize(squared_residual, x0, tol=1e-9)
    assert result.success
    assert abs(float(result.x["amplitude"]) - amplitude) < 5e-3
    assert abs(float(result.x["rate"]) - rate) < 5e-3
    # Stopped at the least-squares estimate (the noise makes its loss > 0, so either rule may end the run).
    assert result.status in (0, 2)
    assert math.sqrt(sum(float(g) ** 2 for g in result.jac.values())) <= 1e-6


def test_pytree_x0_keeps_its_structure_device_and_dtypes():
    x0 = {
        "weights": [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float32)],
        "offset": (torch.tensor(0.0, dtype=torch.float64),),
    }
    target = torch.arange(6, dtype=torch.float64).reshape(2, 3)

    def fun(x):
        first, second = x["weights"]
        (offset,) = x["offset"]
        return ((first - target) ** 2).sum() + ((second.double() - 1) ** 2).sum() + (offset + 2) ** 2

    result = minimize(fun, x0, tol=1e-7)
    assert result.success
    assert isinstance(result.x, dict) and set(result.x) == {"weights", "offset"}
    assert isinstance(result.x["weights"], list) and isinstance(result.x["offset"], tuple)
    assert [t.dtype for t in result.x["weights"]] == [torch.float64, torch.float32]
    assert result.x["weights"][0].device == x0["weights"][0].device
    torch.testing.assert_close(result.x["weights"][0], target, rtol=0, atol=1e-7)
    torch.testing.assert_close(result.x["weights"][1], torch.ones(3), rtol=0, atol=1e-5)
    assert abs(float(result.x["offset"][0]) + 2) < 1e-7
    assert isinstance(result.jac, dict) and isinstance(result.jac["offset"], tuple)


@pytest.mark.parametrize("hvp", MODES)
def test_counts_match_the_scg_trace_and_the_calls_of_fun(hvp):
    fun = CountingFunction(rosenbrock)
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = minimize(fun, x0, hvp=hvp, max_iter=30)
    # The same run by hand: SCG on the same function, stepped as often.
    from moller_scg import SCG

    w = x0.clone().requires_grad_(True)
    optimizer = SCG([w], hvp=hvp)

    def closure():
        w.grad = None
        loss = rosenbrock(w)
        loss.backward(create_graph=hvp == "double-backward")
        return loss

    rejected = 0
    for _ in range(result.nit):
        optimizer.step(closure)
        rejected += not optimizer.trace.success
    trace = optimizer.trace
    assert result.status == STATUS_MAX_ITER and result.nit == 30 and not result.success
    # minimize's objective forms a trial's gradient only when its value does not reject it: the same steps, and
    # one gradient fewer than values per rejected trial (the closure computes both at every call).
    assert rejected > 0
    assert (result.nfev, result.njev, result.nhev) == (
        trace.closure_calls,
        trace.closure_calls - rejected,
        trace.hvp_calls,
    )
    assert fun.calls == result.nfev
    assert result.fun == trace.loss
    assert torch.equal(result.x, w.detach())
    # Exact curvature costs no closure call; a finite difference costs one per product.
    assert result.nfev == 1 + result.nit + (result.nhev if hvp == "finite-difference" else 0)


def test_x0_is_not_modified():
    x0 = {"a": torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)}
    before = x0["a"].detach().clone()
    result = minimize(lambda x: ((x["a"] - 1) ** 2).sum(), x0, tol=1e-10)
    assert torch.equal(x0["a"].detach(), before) and x0["a"].grad is None
    assert result.x["a"] is not x0["a"] and not result.x["a"].requires_grad


def test_non_finite_start_is_reported_and_x_stays_at_x0():
    x0 = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    result = minimize(lambda x: torch.log(x).sum(), x0)
    assert result.status == STATUS_NON_FINITE and not result.success
    assert "not finite" in result.message
    assert torch.equal(result.x, x0) and math.isnan(result.fun) and result.jac is None


def test_callback_gets_copies_and_can_stop_the_run():
    seen = []

    def callback(x):
        seen.append(x)
        x.add_(100.0)  # a copy: must not move the optimizer
        return len(seen) == 3

    result = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), callback=callback)
    assert result.status == STATUS_CALLBACK and result.nit == 3 and len(seen) == 3
    assert float(result.x.abs().max()) < 10


def test_loss_change_rule_stops_on_a_positive_minimum():
    # (x − 1)² + 1 has its minimum 1 > 0: the relative change falls below ftol while |E'| is still above tol = 0.
    result = minimize(lambda x: ((x - 1) ** 4).sum() + 1, torch.tensor([3.0], dtype=torch.float64), tol=0.0)
    assert result.success and result.status == 2 and "ftol" in result.message
    assert result.nit < 1000
    assert DEFAULT_FTOL == pytest.approx(2.220446049250313e-09)


def test_ftol_zero_turns_the_loss_change_rule_off_and_a_stalled_run_stops_by_itself():
    # The same problem as above: with ftol = 0, an accepted step that leaves the loss unchanged in float64 (as
    # happens near its positive minimum) no longer stops the run by the loss-change rule; SCG's stall does, without
    # its warning (whose advice is for a user's own step loop) and without spending the iterations left.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = minimize(
            lambda x: ((x - 1) ** 4).sum() + 1,
            torch.tensor([3.0], dtype=torch.float64),
            tol=0.0,
            ftol=0.0,
            max_iter=300,
        )
    assert result.status == STATUS_STALLED and not result.success and "stalled" in result.message
    assert result.nit < 300 and result.fun == pytest.approx(1.0)


def test_a_float32_run_that_stalls_before_tol_is_not_a_success():
    x0 = torch.zeros(6, dtype=torch.float32)
    result = minimize(
        lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(), x0, ftol=0.0, max_iter=2000
    )
    assert result.status == STATUS_STALLED and result.nit < 2000 and result.fun < 1e-6


def test_a_failure_at_x0_still_reports_its_finite_loss():
    # sqrt at 0: E(x0) = 0 is finite, E'(x0) is not.
    result = minimize(lambda x: torch.sqrt(x).sum(), torch.zeros(1, dtype=torch.float64))
    assert result.status == STATUS_NON_FINITE and result.fun == 0.0 and torch.isinf(result.jac).all()


def test_minimize_leaves_nothing_of_its_run_alive():
    """A gradient that holds its graph holds its parameter too: minimize lets go of both when it returns."""
    made = []
    original = moller_scg.optimize.FunctionObjective

    class Spy(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self.params[0]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moller_scg.optimize, "FunctionObjective", Spy)
        for method, hvp in (("scg", "double-backward"), ("scg", "finite-difference"), ("lbfgs", "double-backward")):
            minimize(
                lambda x: ((x - 1.0) ** 2).sum() + 1e-3 * (x**4).sum(),
                torch.zeros(4, dtype=torch.float64),
                method=method,
                hvp=hvp,
                max_iter=3,
            )
    gc.collect()
    assert len(made) == 3 and all(ref() is None for ref in made)


@pytest.mark.parametrize("answer", [True, 1, torch.tensor(True), numpy.True_])
def test_a_callback_stops_on_any_true_value_after_the_last_iteration_too(answer):
    seen = []

    def callback(x):
        seen.append(x)
        return answer if len(seen) == 2 else None

    result = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), callback=callback)
    assert result.status == STATUS_CALLBACK and result.nit == 2
    converged = []
    result = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), callback=converged.append)
    assert result.success and len(converged) == result.nit and torch.equal(converged[-1], result.x)


def test_a_callback_answer_that_is_neither_true_nor_false_is_named():
    with pytest.raises(TypeError, match="neither true nor false"):
        minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), callback=lambda x: torch.ones(2))


def test_lbfgs_from_a_non_finite_x0_is_not_a_success():
    result = minimize(lambda x: torch.log(x).sum(), torch.tensor([-1.0], dtype=torch.float64), method="lbfgs")
    assert result.status == STATUS_NON_FINITE and not result.success and "x0" in result.message


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_iter": 5}, r"options\['max_iter'\] is minimize's max_iter="),
        ({"tolerance_grad": 0.0}, r"options\['tolerance_grad'\] is minimize's tol="),
        ({"tolerance_change": 0.0}, r"options\['tolerance_change'\] is minimize's ftol="),
        ({"bogus": 1}, r"unknown LBFGS options \['bogus'\]: method='lbfgs' takes history_size"),
        ({"maximize": True}, r"options\['maximize'\] is refused: minimize minimizes"),
    ],
)
def test_lbfgs_options_that_minimize_sets_or_lbfgs_lacks_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), method="lbfgs", options=options)


def test_lbfgs_method_for_comparison():
    result = minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), method="lbfgs", tol=1e-10, ftol=0.0)
    assert isinstance(result, OptimizeResult)
    assert torch.allclose(result.x, torch.ones(2, dtype=torch.float64), atol=1e-8)
    assert result.nhev == 0 and result.nfev >= result.nit


def test_complex_x0():
    target = torch.tensor([1 + 2j, -1j], dtype=torch.complex128)
    result = minimize(lambda z: (z - target).abs().pow(2).sum(), torch.zeros(2, dtype=torch.complex128), tol=1e-10)
    assert result.success
    torch.testing.assert_close(result.x, target, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the value and the fix


def test_non_scalar_fun_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"fun must return a scalar loss .* shape \(3,\).*\.sum\(\)"):
        minimize(lambda x: x**2, torch.ones(3, dtype=torch.float64))


def test_fun_that_does_not_depend_on_x_is_named():
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        minimize(lambda x: x.detach().sum(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("x0", "match"),
    [
        ([1.0, 2.0], r"x0\[0\] is a builtins.float, not a torch.Tensor"),
        ({"a": torch.ones(2), "b": "text"}, r"x0\['b'\] is a builtins.str"),
        (torch.ones(2, dtype=torch.int64), r"x0 has dtype torch.int64.*\.double\(\)"),
        (None, r"x0 is a builtins.NoneType, not a torch.Tensor"),
        ({}, "x0 holds no tensor"),
    ],
)
def test_bad_x0_is_named(x0, match):
    with pytest.raises((TypeError, ValueError), match=match):
        minimize(lambda x: torch.tensor(0.0), x0)


def test_numpy_x0_is_a_type_error():
    numpy = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"numpy.ndarray, not a torch.Tensor.*torch.as_tensor"):
        minimize(lambda x: (x**2).sum(), numpy.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "bfgs"}, ValueError, r"Invalid method value: 'bfgs'; choose one of 'scg', 'lbfgs'"),
        ({"hvp": "exact"}, ValueError, r"Invalid hvp value: 'exact'"),
        ({"max_iter": 0}, ValueError, r"Invalid max_iter value: 0"),
        ({"tol": -1.0}, ValueError, r"Invalid tol value: -1.0"),
        ({"ftol": math.nan}, ValueError, r"Invalid ftol value: nan"),
        ({"callback": 3}, TypeError, r"callback must be callable"),
        ({"options": {"lr": 0.1}}, ValueError, r"unknown SCG options \['lr'\]"),
        ({"method": "lbfgs", "callback": print}, ValueError, r"callback is supported with method='scg' only"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), **kwargs)


def test_fun_not_callable():
    with pytest.raises(TypeError, match="fun must be callable"):
        minimize("rosenbrock", torch.ones(2))
