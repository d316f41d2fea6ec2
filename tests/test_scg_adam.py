"""SCGAdam, SCGAMSGrad and SCGRMSProp against NumPy float64 transcriptions of the direction as Sato, Izumi & Iiduka
(2024) state it and as their public code computes it (SCGRMSProp: of this library's own construction, documented in
its docstring), their reduction to torch.optim's Adam, AMSGrad and RMSprop, and their torch.optim conventions.

The NumPy side of the minibatch problem and the transcriptions live in ``reference_adam.py``; the torch helpers
here are shared with ``test_coba.py``.
"""

from __future__ import annotations

import copy
import doctest
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_adam import batch, flat, reference_scg_adaptive, regression_data
from torch import nn

from moller_scg import scg_adam
from moller_scg.coba import CoBA
from moller_scg.scg_adam import SCHEDULE_PLACEHOLDER, SCGAdam, SCGAMSGrad, SCGRMSProp, diminishing_lr

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# The minibatch problem (``reference_adam.regression_data``) in torch.


def torch_params(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    _, _, start = regression_data()
    return [nn.Parameter(torch.tensor(value, dtype=dtype)) for value in start]


def torch_loss(params: list[torch.Tensor], n: int) -> torch.Tensor:
    x, y, _ = regression_data()
    weight, bias = params
    xb = torch.tensor(x[batch(n)], dtype=weight.dtype)
    yb = torch.tensor(y[batch(n)], dtype=weight.dtype)
    return torch.mean((xb @ weight.T + bias - yb) ** 2)


def run(
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    steps: int,
    *,
    dtype: torch.dtype = torch.float64,
    schedule_lr: bool = False,
    params: list[nn.Parameter] | None = None,
    first_step: int = 1,
) -> list[np.ndarray]:
    """The parameters after each of ``steps`` steps of the optimizer on the minibatch problem."""
    params = torch_params(dtype) if params is None else params
    optimizer = make_optimizer(params)
    scheduler = diminishing_lr(optimizer) if schedule_lr else None
    trajectory = []
    for n in range(first_step, first_step + steps):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(flat(params))
    return trajectory


def assert_trajectories_close(actual, expected, rtol: float = 1e-10) -> None:
    assert len(actual) == len(expected)
    for n, (a, e) in enumerate(zip(actual, expected), start=1):
        assert np.all(np.isfinite(a)), f"step {n}: not finite"
        error = float(np.max(np.abs(a - e))) / max(float(np.max(np.abs(e))), 1e-300)
        assert error <= rtol, f"step {n}: relative difference {error:.3g} > {rtol:g}"


def assert_trajectories_equal(actual, expected) -> None:
    for n, (a, e) in enumerate(zip(actual, expected), start=1):
        assert np.array_equal(a, e), f"step {n}: max difference {np.max(np.abs(a - e)):.3g}"


def logistic_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    truth = torch.tensor([1.5, -2.0, 0.5, 1.0, -1.0], dtype=torch.float64)
    noise = 0.5 * torch.randn(200, generator=generator, dtype=torch.float64)
    y = (x @ truth + noise > 0).to(torch.float64)
    return x, y


def logistic_losses(make_optimizer, steps: int = 100) -> tuple[float, float]:
    """Full-batch logistic regression from zero weights: the loss before and after ``steps`` steps."""
    x, y = logistic_problem()
    weight = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    bias = nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = make_optimizer([weight, bias])

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(steps):
        optimizer.step(closure)
    return first, float(closure().detach())


OPTIMIZERS = {"adam": SCGAdam, "amsgrad": SCGAMSGrad, "rmsprop": SCGRMSProp}


def make(kind: str, **options):
    return lambda params: OPTIMIZERS[kind](params, **options)


# ---------------------------------------------------------------------------------------------------------------
# The trajectory equals the transcription of the paper (default) or of the authors' code.

STEPS = 25
FORMS = ["paper", "authors-code"]


@pytest.mark.parametrize(
    "kind, options",
    [
        ("adam", {}),
        ("adam", {"lr": 1e-2, "gamma": 1.0, "delta": 1e-2}),
        ("adam", {"lr": 1e-2, "gamma": 0.3, "delta": 0.5, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
        ("amsgrad", {"lr": 1e-2, "gamma": 1.0, "delta": 1e-1}),
        ("amsgrad", {"lr": 1e-2, "gamma": 1.0, "delta": 1e-3, "bias_correction": True, "weight_decay": 0.05}),
        ("rmsprop", {"lr": 1e-2, "gamma": 1.0, "delta": 1e-1}),
        ("rmsprop", {"lr": 1e-2, "gamma": 0.5, "delta": 0.3, "alpha": 0.9, "weight_decay": 0.1}),
    ],
)
def test_constant_schedules_match_the_paper_by_default(kind, options):
    assert_trajectories_close(run(make(kind, **options), STEPS), reference_scg_adaptive(kind, STEPS, **options))


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("direction_form", FORMS)
def test_each_direction_form_matches_its_own_transcription(kind, direction_form):
    options = {"lr": 1e-2, "gamma": 0.5, "delta": 0.5, "direction_form": direction_form}
    assert_trajectories_close(run(make(kind, **options), STEPS), reference_scg_adaptive(kind, STEPS, **options))


def test_the_two_direction_forms_differ_in_the_sign_of_the_previous_direction():
    # From step 2 on they differ by 2δₙdₙ₋₁ in the direction; with δ = 0 they are the same method bit for bit.
    paper = run(make("adam", lr=1e-2, delta=0.5), 3)
    code = run(make("adam", lr=1e-2, delta=0.5, direction_form="authors-code"), 3)
    assert np.array_equal(paper[0], code[0]) and not np.allclose(paper[1], code[1], rtol=1e-6, atol=0)
    assert_trajectories_equal(
        run(make("adam", lr=1e-2, delta=0.0), STEPS),
        run(make("adam", lr=1e-2, delta=0.0, direction_form="authors-code"), STEPS),
    )


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", [lambda n: 0.5**n, lambda n: 1.0 / n], ids=["half-power-n", "one-over-n"])
def test_diminishing_schedules_with_diminishing_lr_match_reference(kind, schedule):
    options = {"lr": 5e-2, "gamma": schedule, "delta": schedule}
    actual = run(make(kind, **options), STEPS, schedule_lr=True)
    assert_trajectories_close(actual, reference_scg_adaptive(kind, STEPS, diminishing=True, **options))


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    gamma=st.floats(0.0, 2.0),
    delta=st.floats(0.0, 1.0),
    lr=st.floats(1e-4, 0.1),
    weight_decay=st.sampled_from([0.0, 0.1]),
    direction_form=st.sampled_from(FORMS),
)
def test_random_hyperparameters_match_reference(kind, gamma, delta, lr, weight_decay, direction_form):
    options = {"lr": lr, "gamma": gamma, "delta": delta, "weight_decay": weight_decay, "direction_form": direction_form}
    assert_trajectories_close(run(make(kind, **options), 8), reference_scg_adaptive(kind, 8, **options))


def test_first_direction_is_the_negative_gradient_whatever_gamma():
    # d₁ = −g₁: the first step of SCGAdam is Adam's, even with γ = 5.
    assert_trajectories_equal(
        run(make("adam", lr=1e-2, gamma=5.0, delta=0.7), 1), run(lambda p: torch.optim.Adam(p, lr=1e-2), 1)
    )


def test_diminishing_lr_gives_lr_over_root_n_at_step_n():
    w = nn.Parameter(torch.zeros(1))
    optimizer = SCGAdam([w], lr=0.5)
    scheduler = diminishing_lr(optimizer)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 / math.sqrt(n) for n in (1, 2, 3, 4)], rel=1e-15)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh = diminishing_lr(SCGAdam([nn.Parameter(torch.zeros(1))], lr=0.5))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.get_last_lr() == scheduler.get_last_lr()


# ---------------------------------------------------------------------------------------------------------------
# γ = δ = 0 is the method the variant is built from.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "ours, torchs",
    [
        (
            make("adam", lr=1e-2, gamma=0.0, delta=0.0, weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
        ),
        (
            make("amsgrad", lr=1e-2, gamma=0.0, delta=0.0, bias_correction=True),
            lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        ),
        (
            make("rmsprop", lr=1e-2, gamma=0.0, delta=0.0, alpha=0.9),
            lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9),
        ),
    ],
    ids=["Adam", "AMSGrad-bias-corrected", "RMSprop"],
)
def test_zero_gamma_and_delta_reproduce_torch_bit_for_bit(ours, torchs, dtype):
    assert_trajectories_equal(run(ours, STEPS, dtype=dtype), run(torchs, STEPS, dtype=dtype))


def test_default_amsgrad_has_no_bias_correction_unlike_torch():
    ours = run(make("amsgrad", lr=1e-2, gamma=0.0, delta=0.0), STEPS)
    assert_trajectories_close(ours, reference_scg_adaptive("amsgrad", STEPS, lr=1e-2, gamma=0.0, delta=0.0))
    torchs = run(lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True), STEPS)
    assert not np.allclose(ours[0], torchs[0], rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# state_dict


def _schedule(n: int) -> float:
    return 0.5**n


ROUND_TRIP = {
    "SCGAdam": make("adam", lr=1e-2, gamma=_schedule, delta=0.1),
    "SCGAMSGrad": make("amsgrad", lr=1e-2, gamma=1.0, delta=lambda n: 1.0 / n),
    "SCGRMSProp": make("rmsprop", lr=1e-2, gamma=_schedule, delta=_schedule),
}


def save_and_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def state_dict_round_trip(make_optimizer, steps_before: int = 4, steps_after: int = 4):
    """The trajectory of an uninterrupted run, and of one saved after ``steps_before`` and loaded into a fresh
    optimizer (with weights_only=True) that goes on; the saved optimizer state; the fresh optimizer."""
    whole = run(make_optimizer, steps_before + steps_after)
    params = torch_params()
    optimizer = make_optimizer(params)
    for n in range(1, steps_before + 1):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
    saved = save_and_load({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()})

    fresh_params = [nn.Parameter(value.clone()) for value in saved["params"]]
    fresh_optimizer = make_optimizer(fresh_params)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    continued = [flat(fresh_params)]
    for n in range(steps_before + 1, steps_before + steps_after + 1):
        fresh_optimizer.zero_grad()
        torch_loss(fresh_params, n).backward()
        fresh_optimizer.step()
        continued.append(flat(fresh_params))
    return whole[steps_before - 1 :], continued, saved["optimizer"], fresh_optimizer


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_state_dict_round_trip_with_weights_only_continues_bit_identically(name):
    whole, continued, saved, fresh = state_dict_round_trip(ROUND_TRIP[name])
    assert_trajectories_equal(continued, whole)
    # Callables are saved as a placeholder and come back from the receiving optimizer's construction.
    group = saved["param_groups"][0]
    assert SCHEDULE_PLACEHOLDER in (group["gamma"], group["delta"])
    assert all(callable(fresh.param_groups[0][key]) for key in ("gamma", "delta") if group[key] == SCHEDULE_PLACEHOLDER)


def test_step_count_stays_an_exact_int_when_loaded_into_float32_parameters():
    params = torch_params(torch.float32)
    optimizer = SCGAMSGrad(params, lr=1e-2)
    for n in range(1, 4):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
    fresh = SCGAMSGrad(torch_params(torch.float32), lr=1e-2)
    fresh.load_state_dict(save_and_load(optimizer.state_dict()))
    for state in fresh.state.values():
        assert type(state["step"]) is int and state["step"] == 3
        assert all(state[key].dtype == torch.float32 for key in state if key != "step")


def test_state_dict_groups_hold_plain_floats():
    optimizer = SCGAdam(
        torch_params(), lr=np.float64(1e-2), betas=[np.float32(0.5), 0.9], gamma=1, delta=np.float64(0.1)
    )
    group = save_and_load(optimizer.state_dict())["param_groups"][0]
    assert group["betas"] == (0.5, 0.9) and type(group["betas"][0]) is float
    assert all(type(group[key]) is float for key in ("lr", "eps", "weight_decay", "gamma", "delta"))


def test_loading_a_saved_schedule_needs_the_schedule_again():
    _, _, saved, _ = state_dict_round_trip(ROUND_TRIP["SCGAdam"], steps_after=0)
    without_schedule = SCGAdam(torch_params(), lr=1e-2, gamma=0.5)
    with pytest.raises(ValueError, match="schedule for 'gamma'.*gamma=0.5"):
        without_schedule.load_state_dict(saved)
    assert without_schedule.param_groups[0]["gamma"] == 0.5 and not without_schedule.state


def test_a_state_saved_before_direction_form_existed_continues_in_the_authors_code_form():
    def step(optimizer, params, n):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()

    params = torch_params()
    old = SCGAdam(params, lr=1e-2, delta=0.5, direction_form="authors-code")
    for n in range(1, 5):
        step(old, params, n)
    saved = save_and_load(old.state_dict())
    for group in saved["param_groups"]:
        del group["direction_form"]  # as SCGAdam.state_dict() wrote it before the option existed
    optimizer = SCGAdam(params, lr=1e-2, delta=0.5)  # the default form is now the paper's
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["direction_form"] == "authors-code"
    for n in range(5, 9):
        step(optimizer, params, n)
    uninterrupted = run(make("adam", lr=1e-2, delta=0.5, direction_form="authors-code"), 8)
    assert_trajectories_equal([flat(params)], uninterrupted[-1:])


def test_load_state_dict_refuses_a_foreign_state():
    params = torch_params()
    with pytest.raises(ValueError, match="not a SCGAdam state_dict.*'delta', 'gamma'"):
        SCGAdam(params).load_state_dict(torch.optim.Adam(params).state_dict())
    with pytest.raises(ValueError, match="'bias_correction'"):
        SCGAMSGrad(params).load_state_dict(SCGAdam(params).state_dict())


def test_load_state_dict_refuses_another_variants_memory_though_it_has_every_hyperparameter():
    """SCGAMSGrad's groups hold every key of SCGAdam's; its max_exp_avg_sq tells the two apart."""
    params = torch_params()
    amsgrad = SCGAMSGrad(params, lr=1e-2)
    amsgrad.zero_grad()
    torch_loss(params, 1).backward()
    amsgrad.step()
    adam = SCGAdam(params, lr=1e-2)
    with pytest.raises(ValueError, match="not a SCGAdam state_dict.*holds 'max_exp_avg_sq'"):
        adam.load_state_dict(amsgrad.state_dict())
    assert not adam.state


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_is_the_step_and_the_fields_of_the_two_rules_typed_states(kind):
    params = torch_params()
    optimizer = OPTIMIZERS[kind](params, lr=1e-2)
    optimizer.zero_grad()
    torch_loss(params, 1).backward()
    optimizer.step()
    direction_rule, moment_rule = optimizer._rules(optimizer.param_groups[0])
    expected = {"step", *direction_rule.State._fields, *moment_rule.State._fields}
    assert {"adam": {"exp_avg", "exp_avg_sq"}, "amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}.get(
        kind, {"square_avg"}
    ) | {"step", "direction"} == expected
    assert all(set(optimizer.state[p]) == expected for p in params)


def test_deepcopied_optimizer_continues_identically():
    params = torch_params()
    optimizer = SCGAdam(params, lr=1e-2, gamma=_schedule)
    for n in range(1, 4):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
    twin_params, twin = copy.deepcopy((params, optimizer))
    for n in range(4, 7):
        for ps, opt in ((params, optimizer), (twin_params, twin)):
            opt.zero_grad()
            torch_loss(ps, n).backward()
            opt.step()
    assert_trajectories_equal([flat(twin_params)], [flat(params)])


# ---------------------------------------------------------------------------------------------------------------
# torch.optim conventions


def test_closure_loss_is_returned_and_no_closure_returns_none():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = SCGRMSProp([w])

    def closure():
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert float(optimizer.step(closure).detach()) == 5.0
    assert optimizer.step() is None


def test_parameter_groups_take_their_own_hyperparameters():
    weight, bias = torch_params()
    groups = [{"params": [weight], "gamma": 1.0, "lr": 1e-2}, {"params": [bias], "delta": _schedule}]
    optimizer = SCGAdam(groups, lr=5e-2)
    alone_weight, alone_bias = torch_params()
    for_weight = SCGAdam([alone_weight], gamma=1.0, lr=1e-2)
    for_bias = SCGAdam([alone_bias], delta=_schedule, lr=5e-2)
    for n in range(1, 6):
        for opt in (optimizer, for_weight, for_bias):
            opt.zero_grad()
        torch_loss([weight, bias], n).backward()
        torch_loss([alone_weight, alone_bias], n).backward()
        for opt in (optimizer, for_weight, for_bias):
            opt.step()
    assert torch.equal(weight, alone_weight) and torch.equal(bias, alone_bias)


def test_parameter_without_grad_is_skipped_and_keeps_no_state():
    params = torch_params()
    unused = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = SCGAdam([*params, unused], lr=1e-2, gamma=1.0)
    trajectory = []
    for n in range(1, 6):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
        trajectory.append(flat(params))
    assert_trajectories_equal(trajectory, run(make("adam", lr=1e-2, gamma=1.0), 5))
    assert unused.grad is None and not optimizer.state[unused]
    assert torch.equal(unused.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_complex_parameters_are_optimized_as_real_and_imaginary_parts(kind):
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, dtype=torch.complex128, generator=generator)
    b = torch.randn(4, dtype=torch.complex128, generator=generator)

    def loss_of(z):
        return torch.sum(torch.abs(a @ z - b) ** 2)

    def trajectory(param, as_complex):
        optimizer = OPTIMIZERS[kind]([param], lr=1e-2, gamma=1.0, delta=0.1, weight_decay=0.1)
        points = []
        for _ in range(10):
            optimizer.zero_grad()
            loss_of(as_complex(param)).backward()
            optimizer.step()
            points.append(torch.view_as_real(as_complex(param.detach())).numpy().ravel().copy())
        return points, optimizer

    z = nn.Parameter(torch.zeros(4, dtype=torch.complex128))
    x = nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    complex_points, optimizer = trajectory(z, lambda t: t)
    real_points, _ = trajectory(x, torch.view_as_complex)
    assert_trajectories_close(complex_points, real_points, rtol=1e-12)
    assert optimizer.state[z]["direction"].dtype == torch.complex128
    assert loss_of(z.detach()) < loss_of(torch.zeros(4, dtype=torch.complex128))


def test_sparse_gradient_raises_type_error_before_any_update():
    dense = nn.Parameter(torch.ones(3, dtype=torch.float64))
    embedding = nn.Embedding(5, 2, sparse=True).double()
    optimizer = SCGAdam([dense, *embedding.parameters()])
    (dense.sum() + embedding(torch.tensor([0, 1])).pow(2).sum()).backward()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
    assert torch.equal(dense.detach(), torch.ones(3, dtype=torch.float64)) and not optimizer.state


@pytest.mark.parametrize(
    "cls, options, match",
    [
        (SCGAdam, {"lr": -1e-3}, r"learning rate \(lr\) value: -0.001"),
        (SCGAdam, {"lr": float("nan")}, "lr"),
        (SCGAdam, {"betas": (0.9, 1.0)}, r"betas value: \(0.9, 1.0\)"),
        (SCGAdam, {"betas": (0.9,)}, "betas"),
        (SCGAdam, {"eps": -1.0}, r"eps\) value: -1.0"),
        (SCGAdam, {"weight_decay": -0.1}, "weight_decay value: -0.1"),
        (SCGAdam, {"gamma": -0.5}, r"gamma \(γ\) value: -0.5"),
        (SCGAdam, {"delta": math.inf}, r"delta \(δ\) value: inf"),
        (SCGAdam, {"gamma": "0.1"}, "gamma"),
        (SCGAMSGrad, {"bias_correction": 1}, "bias_correction value: 1"),
        (SCGRMSProp, {"alpha": 1.0}, r"alpha \(ρ\) value: 1.0"),
        (SCGRMSProp, {"delta": True}, "delta"),
        (SCGAMSGrad, {"direction_form": "code"}, "direction_form value: 'code'; choose one of 'paper', 'authors-code'"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_value(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(1))], **options)
    with pytest.raises(ValueError, match=match):
        cls([{"params": [nn.Parameter(torch.zeros(1))], **options}])


def test_bad_schedule_value_raises_naming_step_and_value():
    w = nn.Parameter(torch.ones(1))
    optimizer = SCGAdam([w], delta=lambda n: -1.0 if n == 3 else 0.1)
    for _ in range(2):
        w.grad = torch.ones(1)
        optimizer.step()
    with pytest.raises(ValueError, match=r"'delta' schedule returned -1.0 at step n = 3"):
        optimizer.step()


@pytest.mark.parametrize("kind", ["adam", "coba"])
def test_a_schedule_that_raises_leaves_the_parameter_state_as_it_was(kind):
    """The step count is not advanced by a failed step: the step after it is still step n = 3."""
    failing = {"now": False}

    def schedule(n):
        return float("nan") if failing["now"] else 0.1 * n

    def optimizer_for(w):
        if kind == "coba":
            return CoBA([w], lr=0.1, M=schedule)
        return SCGAdam([w], lr=0.1, gamma=schedule)

    w, reference = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer, uninterrupted = optimizer_for(w), optimizer_for(reference)
    gradients = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25])]
    for gradient in gradients[:2]:
        w.grad, reference.grad = gradient.double(), gradient.double()
        optimizer.step()
        uninterrupted.step()
    before = {key: value.clone() if torch.is_tensor(value) else value for key, value in optimizer.state[w].items()}
    failing["now"] = True
    w.grad = gradients[2].double()
    with pytest.raises(ValueError, match="schedule returned nan at step n = 3"):
        optimizer.step()
    assert optimizer.state[w]["step"] == 2
    assert all(torch.equal(optimizer.state[w][key], value) for key, value in before.items() if key != "step")
    failing["now"] = False
    reference.grad = gradients[2].double()
    optimizer.step()
    uninterrupted.step()
    assert optimizer.state[w]["step"] == 3 and torch.equal(w, reference)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_logistic_regression_loss_decreases(kind):
    first, last = logistic_losses(make(kind, lr=0.05, gamma=1.0, delta=0.1))
    assert last < 0.5 * first


def test_module_docstring_examples_run():
    result = doctest.testmod(scg_adam, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_docs_variants_snippets_run():
    text = (ROOT / "docs" / "variants.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/variants.md", "exec"), {})  # noqa: S102 - the docs' own code
