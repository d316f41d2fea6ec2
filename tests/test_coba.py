"""CoBA against a NumPy float64 transcription of Kobayashi & Iiduka (2020) with the choices documented in
docs/variants.md (ε in β's denominators, Hager–Zhang's truncation, the second moment on g² by default), its
reduction to torch.optim.Adam, and its torch.optim conventions. The transcription (``reference_coba``) and the
minibatch problem come from ``reference_adam.py``, the run helpers from ``test_scg_adam.py``."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_adam import ETA, flat, reference_beta, reference_coba, regression_data
from test_scg_adam import (
    STEPS,
    assert_trajectories_close,
    assert_trajectories_equal,
    logistic_losses,
    run,
    save_and_load,
    state_dict_round_trip,
    torch_loss,
    torch_params,
)
from torch import nn

from moller_scg import coba
from moller_scg.coba import CG_RULES, CoBA, beta_hager_zhang
from moller_scg.scg_adam import SCHEDULE_PLACEHOLDER, SCGAMSGrad

RULES = sorted(CG_RULES)
FORMS = {
    "adam": {"amsgrad": False},
    "amsgrad": {"amsgrad": True},
    "amsgrad-bias-corrected": {"amsgrad": True, "bias_correction": True},
}


def make(**options):
    return lambda params: CoBA(params, **options)


# ---------------------------------------------------------------------------------------------------------------
# The trajectory equals the transcription.


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("cg_rule", RULES)
def test_every_rule_and_form_matches_reference(cg_rule, form):
    # M = 0.5 and a = 1 make the conjugate term large enough that a wrong β shows in the weights.
    options = {"cg_rule": cg_rule, "lr": 1e-2, "M": 0.5, "a": 1.0, **FORMS[form]}
    assert_trajectories_close(run(make(**options), STEPS), reference_coba(STEPS, **options))


@pytest.mark.parametrize("cg_rule", RULES)
def test_defaults_match_reference(cg_rule):
    assert_trajectories_close(run(make(cg_rule=cg_rule), STEPS), reference_coba(STEPS, cg_rule=cg_rule))


def test_default_is_the_papers_amsgrad_form_with_one_global_beta():
    # The reference's form written out, not taken from the defaults of either side.
    paper = reference_coba(
        STEPS, lr=1e-2, M=0.5, a=1.0, amsgrad=True, bias_correction=False, beta_scope="global", second_moment="gradient"
    )
    assert_trajectories_close(run(make(lr=1e-2, M=0.5, a=1.0), STEPS), paper)


@pytest.mark.parametrize("beta_scope", ["global", "per-tensor"])
@pytest.mark.parametrize("second_moment", ["gradient", "direction"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_beta_scope_and_second_moment_match_reference(beta_scope, second_moment, form):
    options = {"cg_rule": "PRP", "lr": 1e-2, "M": 0.5, "a": 1.0, "beta_scope": beta_scope, **FORMS[form]}
    options["second_moment"] = second_moment
    assert_trajectories_close(run(make(**options), STEPS), reference_coba(STEPS, **options))


def test_global_and_per_tensor_beta_differ_and_agree_on_a_single_tensor():
    options = {"cg_rule": "HS", "lr": 1e-2, "M": 0.5, "a": 1.0}
    two_tensors = [run(make(beta_scope=scope, **options), 5) for scope in ("global", "per-tensor")]
    # trajectory[k] is x after step k + 1; β first enters at step 2.
    assert np.array_equal(two_tensors[0][0], two_tensors[1][0])
    assert not np.allclose(two_tensors[0][1], two_tensors[1][1], rtol=1e-6, atol=0)

    def weight_only():  # the bias gets no gradient, so the optimizer sees one tensor
        weight, bias = torch_params()
        return [weight, bias.requires_grad_(False)]

    one_tensor = [run(make(beta_scope=scope, **options), 5, params=weight_only()) for scope in ("global", "per-tensor")]
    assert_trajectories_equal(one_tensor[0], one_tensor[1])


def test_a_state_saved_before_beta_scope_existed_continues_per_tensor():
    old_options = {"cg_rule": "HS", "lr": 1e-2, "M": 0.5, "a": 1.0, "beta_scope": "per-tensor", "amsgrad": True}
    params = torch_params()
    old = CoBA(params, **old_options)
    for n in range(1, 5):
        old.zero_grad()
        torch_loss(params, n).backward()
        old.step()
    saved = save_and_load(old.state_dict())
    for group in saved["param_groups"]:
        del group["beta_scope"], group["second_moment"]  # as CoBA.state_dict() wrote it before these options
    optimizer = CoBA(params, cg_rule="HS", lr=1e-2, M=0.5, a=1.0)
    optimizer.load_state_dict(saved)
    for n in range(5, 9):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
    assert_trajectories_equal([flat(params)], run(make(**old_options), 8)[-1:])


def test_schedule_weight_decay_and_other_hyperparameters_match_reference():
    options = {
        "cg_rule": "HZ",
        "lr": 2e-2,
        "M": lambda n: 0.9**n,
        "a": 0.5,
        "hz_lambda": 1.0,
        "weight_decay": 0.1,
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "amsgrad": True,
    }
    assert_trajectories_close(run(make(**options), STEPS), reference_coba(STEPS, **options))


@settings(max_examples=15, deadline=None)
@given(
    cg_rule=st.sampled_from(RULES),
    form=st.sampled_from(sorted(FORMS)),
    M=st.floats(0.0, 1.0),
    a=st.floats(0.0, 2.0),
    lr=st.floats(1e-4, 0.05),
)
def test_random_hyperparameters_match_reference(cg_rule, form, M, a, lr):  # noqa: N803 - the paper's symbol
    options = {"cg_rule": cg_rule, "M": M, "a": a, "lr": lr, **FORMS[form]}
    assert_trajectories_close(run(make(**options), 8), reference_coba(8, **options))


@pytest.mark.parametrize(
    "previous_norm, hz_lambda, truncated",
    [(1.0, 2.0, False), (1.0, 50.0, True), (1e-3, 50.0, False), (1e-3, 500.0, True)],
)
def test_hager_zhang_truncation_binds_only_below_eta(previous_norm, hz_lambda, truncated):
    # y = gₙ − gₙ₋₁ = (0, 5, 0) and d ≈ (0, 1, 0): βᴴˢ = 25/5 = 5, so βᴴᶻ = 5 − λ·25·5/25 = 5 − 5λ, while
    # ηₙ = −1/(|d| min(0.01, |gₙ₋₁|)) is about −100 for |gₙ₋₁| = 1 and −1000 for |gₙ₋₁| = 1e-3.
    g_prev = np.array([previous_norm, 0.0, 0.0])
    g = g_prev + np.array([0.0, 5.0, 0.0])
    d = np.array([0.0, 1.0, 1e-6])
    eta = -1.0 / (math.sqrt(1.0 + 1e-12) * min(ETA, previous_norm))
    expected = eta if truncated else 5.0 - 5.0 * hz_lambda
    actual = float(beta_hager_zhang(torch.tensor(g), torch.tensor(g_prev), torch.tensor(d), hz_lambda))
    assert actual == pytest.approx(expected, rel=1e-7)  # ε = 1e-8 in dᵀy moves it by ~1e-9
    assert actual == pytest.approx(reference_beta("HZ", g, g_prev, d, hz_lambda), rel=1e-12)


def test_beta_is_one_scalar_per_tensor_whatever_its_shape():
    # Per tensor, not per row: a (3, 4) weight moves exactly as the same 12 numbers in one flat tensor would.
    def trajectory(shape):
        _, _, start = regression_data()
        weight = nn.Parameter(torch.tensor(start[0]).reshape(shape))
        optimizer = CoBA([weight], lr=1e-2, M=0.5, a=1.0, cg_rule="PRP")
        points = []
        for n in range(1, 11):
            optimizer.zero_grad()
            torch_loss([weight.reshape(3, 4), torch.zeros(3, dtype=torch.float64)], n).backward()
            optimizer.step()
            points.append(flat([weight]))
        return points

    assert_trajectories_close(trajectory((3, 4)), trajectory((12,)), rtol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# M = 0 is Adam / AMSGrad.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cg_rule", RULES)
def test_zero_m_is_torch_adam_bit_for_bit(cg_rule, dtype):
    ours = run(make(cg_rule=cg_rule, M=0.0, lr=1e-2, weight_decay=0.1, amsgrad=False), STEPS, dtype=dtype)
    assert_trajectories_equal(ours, run(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1), STEPS, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_m_amsgrad_with_bias_correction_is_torch_amsgrad_bit_for_bit(dtype):
    ours = run(make(M=0.0, lr=1e-2, amsgrad=True, bias_correction=True), STEPS, dtype=dtype)
    assert_trajectories_equal(ours, run(lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True), STEPS, dtype=dtype))


def test_zero_m_amsgrad_form_is_scgamsgrad_with_zero_gamma_and_delta():
    # Both are AMSGrad without bias correction, as the papers state it.
    ours = run(make(M=0.0, lr=1e-2, amsgrad=True), STEPS)
    assert_trajectories_equal(ours, run(lambda p: SCGAMSGrad(p, lr=1e-2, gamma=0.0, delta=0.0), STEPS))


# ---------------------------------------------------------------------------------------------------------------
# state_dict and conventions


def _fading(n: int) -> float:
    return 0.5 / n


@pytest.mark.parametrize("form", sorted(FORMS))
def test_state_dict_round_trip_with_weights_only_continues_bit_identically(form):
    whole, continued, saved, fresh = state_dict_round_trip(make(cg_rule="HZ", lr=1e-2, M=_fading, **FORMS[form]))
    assert_trajectories_equal(continued, whole)
    group = saved["param_groups"][0]
    assert group["M"] == SCHEDULE_PLACEHOLDER and fresh.param_groups[0]["M"] is _fading
    assert group["bias_correction"] is FORMS[form].get("bias_correction", not FORMS[form]["amsgrad"])


def test_state_is_kept_in_the_parameter_dtype_and_the_step_as_an_exact_int():
    params = torch_params(torch.float32)
    optimizer = CoBA(params, amsgrad=True)
    for n in range(1, 4):
        optimizer.zero_grad()
        torch_loss(params, n).backward()
        optimizer.step()
    fresh = CoBA(torch_params(torch.float32), amsgrad=True)
    fresh.load_state_dict(save_and_load(optimizer.state_dict()))
    for state in fresh.state.values():
        assert type(state["step"]) is int and state["step"] == 3
        assert sorted(key for key in state if key != "step") == [
            "direction",
            "exp_avg",
            "exp_avg_sq",
            "max_exp_avg_sq",
            "previous_grad",
        ]
        assert all(state[key].dtype == torch.float32 for key in state if key != "step")


def test_loading_a_saved_m_schedule_needs_the_schedule_again():
    _, _, saved, _ = state_dict_round_trip(make(M=_fading), steps_after=0)
    with pytest.raises(ValueError, match="schedule for 'M'"):
        CoBA(torch_params()).load_state_dict(saved)


def test_bias_correction_follows_the_form_per_group():
    weight, bias = torch_params()
    optimizer = CoBA([{"params": [weight]}, {"params": [bias], "amsgrad": False}])
    assert [group["bias_correction"] for group in optimizer.param_groups] == [False, True]
    assert optimizer.defaults["bias_correction"] is None


def test_complex_parameters_are_optimized_as_real_and_imaginary_parts():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, dtype=torch.complex128, generator=generator)
    b = torch.randn(4, dtype=torch.complex128, generator=generator)

    def trajectory(param, as_complex):
        optimizer = CoBA([param], lr=1e-2, M=0.5, a=1.0, cg_rule="HZ")
        points = []
        for _ in range(10):
            optimizer.zero_grad()
            torch.sum(torch.abs(a @ as_complex(param) - b) ** 2).backward()
            optimizer.step()
            points.append(torch.view_as_real(as_complex(param.detach())).numpy().ravel().copy())
        return points

    z = nn.Parameter(torch.zeros(4, dtype=torch.complex128))
    x = nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    assert_trajectories_close(trajectory(z, lambda t: t), trajectory(x, torch.view_as_complex), rtol=1e-12)


def test_sparse_gradient_raises_type_error():
    embedding = nn.Embedding(5, 2, sparse=True).double()
    optimizer = CoBA(embedding.named_parameters())
    embedding(torch.tensor([0, 1])).pow(2).sum().backward()
    with pytest.raises(TypeError, match="parameter 'weight' has one"):
        optimizer.step()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"cg_rule": "hs"}, "cg_rule value: 'hs'; choose one of 'HS', 'FR', 'PRP', 'DY', 'HZ'"),
        ({"cg_rule": ["HZ"]}, r"cg_rule value: \['HZ'\]; choose one of"),
        ({"M": -1e-3}, "M value: -0.001"),
        ({"a": -1.0}, r"a \(the exponent in M/nᵃ\) value: -1.0"),
        ({"hz_lambda": 0.25}, r"hz_lambda \(λ\) value: 0.25"),
        ({"amsgrad": "yes"}, "amsgrad value: 'yes'"),
        ({"bias_correction": 0}, "bias_correction value: 0"),
        ({"beta_scope": "tensor"}, "beta_scope value: 'tensor'; choose one of 'global', 'per-tensor'"),
        ({"second_moment": "d"}, "second_moment value: 'd'; choose one of 'gradient', 'direction'"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        CoBA([nn.Parameter(torch.zeros(1))], **options)


@pytest.mark.parametrize("cg_rule, form", [(rule, "amsgrad") for rule in RULES] + [("HS", "adam")])
def test_logistic_regression_loss_decreases(cg_rule, form):
    first, last = logistic_losses(make(cg_rule=cg_rule, lr=0.05, M=0.5, a=1.0, **FORMS[form]))
    assert last < 0.5 * first


def test_module_docstring_examples_run():
    result = doctest.testmod(coba, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cg_rule", RULES)
def test_float16_gradients_above_256_keep_beta_and_the_weights_finite(cg_rule):
    """Their squares pass float16's 65504: the inner products multiply in float64, as the reference does."""
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    wide = nn.Parameter(w.detach().double())
    optimizer, reference = CoBA([w], lr=1e-3, cg_rule=cg_rule), CoBA([wide], lr=1e-3, cg_rule=cg_rule)
    for gradient in ([300.0, -10.0], [310.0, -12.0], [290.0, -9.0]):
        w.grad = torch.tensor(gradient, dtype=torch.float16)
        wide.grad = w.grad.double()
        optimizer.step()
        reference.step()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.double(), wide.detach(), rtol=0, atol=2e-3)


def test_a_state_saved_with_amsgrad_loads_into_a_coba_built_without_it_and_goes_on_as_saved():
    """The saved settings replace the group's on loading: the state's max_exp_avg_sq is then what the rules keep."""
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    saved_by = CoBA([w], lr=1e-2)  # the default, amsgrad=True
    w.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    saved_by.step()
    loading = CoBA([nn.Parameter(w.detach().clone())], lr=1e-2, amsgrad=False)
    loading.load_state_dict(saved_by.state_dict())
    assert loading.param_groups[0]["amsgrad"] is True
