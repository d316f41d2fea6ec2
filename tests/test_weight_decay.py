"""Weight decay in the full-batch objective: E(w) = L(w) + (ν/2)|w|², once per pass, in every evaluation."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from problems import regression_problem
from torch import nn

from moller_scg import SCG, GradientAccumulator, fit
from moller_scg.checkpoint import load_checkpoint
from moller_scg.weight_decay import squared_norm, validate_weight_decay

NU = 0.3


def classification_problem(seed: int = 0):
    """A 4-5-3 tanh network (float64) and 23 samples with class-index targets, one of them ignored (-100)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(23, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=generator)
    y[3] = -100
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, (x, y)


def penalized_derivatives(model, loss_fn, data, vectors):
    """E, E' and E''v of loss_fn on all the data at once plus (ν/2)|w|², by plain autograd."""
    params = list(model.parameters())
    energy = loss_fn(model(data[0]), data[1]) + 0.5 * NU * sum((p * p).sum() for p in params)
    gradient = torch.autograd.grad(energy, params, create_graph=True)
    product = torch.autograd.grad(sum((g * v).sum() for g, v in zip(gradient, vectors)), params)
    return energy.detach(), [g.detach() for g in gradient], list(product)


LOSSES = {
    "class-weighted cross-entropy with an ignored target": (
        classification_problem,
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    ),
    "cross-entropy": (classification_problem, nn.CrossEntropyLoss),
    "mean squared error": (regression_problem, nn.MSELoss),
}


@pytest.mark.parametrize("hvp_method", ["double-backward", "forward-over-reverse"])
@pytest.mark.parametrize("batch_size", [1, 5, 23])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_every_evaluation_is_the_penalized_full_batch_objective(loss_name, batch_size, hvp_method):
    make_problem, make_loss = LOSSES[loss_name]
    model, data = make_problem()
    loss_fn = make_loss()
    vectors = [torch.randn_like(p) for p in model.parameters()]
    energy, gradient, product = penalized_derivatives(model, loss_fn, data, vectors)

    accumulator = GradientAccumulator(
        model, loss_fn, data, batch_size=batch_size, hvp_method=hvp_method, weight_decay=NU
    )
    assert float(accumulator()) == pytest.approx(float(energy), rel=1e-13)
    for p, g in zip(model.parameters(), gradient):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    for got, want in zip(accumulator.hvp(vectors), product):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert float(accumulator.loss()) == pytest.approx(float(energy), rel=1e-13)
    value, gradient_later = accumulator.value_then_gradient()
    assert float(value) == pytest.approx(float(energy), rel=1e-13)
    for got, want in zip(gradient_later(), gradient):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_penalty_is_what_separates_the_objective_from_the_loss_alone():
    model, data = regression_problem()
    plain = float(GradientAccumulator(model, nn.MSELoss(), data).loss())
    penalized = float(GradientAccumulator(model, nn.MSELoss(), data, weight_decay=NU).loss())
    weights = [p.detach() for p in model.parameters()]
    assert penalized - plain == pytest.approx(0.5 * NU * float(squared_norm(weights)), rel=1e-12)
    assert penalized - plain > 0.1  # the check above compares something


def test_subsampled_curvature_adds_nu_v_once():
    model, data = regression_problem(n=40)
    vectors = [torch.randn_like(p) for p in model.parameters()]
    without = GradientAccumulator(model, nn.MSELoss(), data, batch_size=7, curvature_fraction=0.25)
    with_decay = GradientAccumulator(model, nn.MSELoss(), data, batch_size=7, curvature_fraction=0.25, weight_decay=NU)
    for got, plain, v in zip(with_decay.hvp(vectors), without.hvp(vectors), vectors):
        torch.testing.assert_close(got, plain + NU * v, rtol=1e-12, atol=1e-14)


def test_complex_weights_count_their_real_and_imaginary_parts():
    z = torch.tensor([3 + 4j, 1 - 2j], dtype=torch.complex128)
    assert float(squared_norm([z, torch.tensor([2.0], dtype=torch.float64)])) == pytest.approx(25 + 5 + 4)


def test_a_summed_loss_is_refused_with_the_reason():
    model, data = regression_problem()
    with pytest.raises(ValueError, match="reduction='sum'.*use reduction='mean'"):
        GradientAccumulator(model, nn.MSELoss(reduction="sum"), data, weight_decay=NU)
    GradientAccumulator(model, nn.MSELoss(reduction="sum"), data, weight_decay=0.0)  # off: any loss


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-0.1, ValueError, "Invalid weight_decay value: -0.1"),
        (float("nan"), ValueError, "Invalid weight_decay value: nan"),
        (float("inf"), ValueError, "Invalid weight_decay value: inf"),
        (True, TypeError, "weight_decay must be a real number"),
        ("0.1", TypeError, "weight_decay must be a real number"),
        (torch.tensor(0.1), TypeError, "weight_decay must be a real number"),
    ],
)
def test_a_bad_weight_decay_is_refused_by_name(value, error, message):
    with pytest.raises(error, match=message):
        validate_weight_decay(value)
    model, data = regression_problem()
    with pytest.raises(error, match=message):
        fit(model, nn.MSELoss(), data, max_iter=1, progress=False, weight_decay=value)


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.int64(0), 0, 0.25])
def test_numpy_and_python_real_numbers_are_weight_decays(value):
    assert validate_weight_decay(value) == float(value) and type(validate_weight_decay(value)) is float


def test_fit_trains_on_the_penalized_objective_and_validates_on_the_loss_alone():
    model, data = regression_problem()
    validation = (data[0][:10] + 0.1, data[1][:10])
    history = fit(model, nn.MSELoss(), data, val_data=validation, max_iter=25, progress=False, weight_decay=0.05)
    weights = [p.detach() for p in model.parameters()]
    with torch.no_grad():
        data_loss = float(nn.functional.mse_loss(model(data[0]), data[1]))
        validation_loss = float(nn.functional.mse_loss(model(validation[0]), validation[1]))
    assert history["loss"][-1] == pytest.approx(data_loss + 0.025 * float(squared_norm(weights)), rel=1e-12)
    assert history["val_loss"][-1] == pytest.approx(validation_loss, rel=1e-12)


def test_weight_decay_shrinks_the_weights_scg_ends_at():
    model, data = regression_problem()
    twin = copy.deepcopy(model)
    fit(model, nn.MSELoss(), data, max_iter=60, progress=False)
    fit(twin, nn.MSELoss(), data, max_iter=60, progress=False, weight_decay=0.05)
    norm = float(squared_norm([p.detach() for p in model.parameters()]))
    assert float(squared_norm([p.detach() for p in twin.parameters()])) < 0.8 * norm


def test_a_resumed_run_with_weight_decay_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    model, data = regression_problem()
    twin = copy.deepcopy(model)
    path = tmp_path / "run.pt"
    whole = fit(model, nn.MSELoss(), data, max_iter=12, progress=False, weight_decay=NU)
    fit(twin, nn.MSELoss(), data, max_iter=5, progress=False, weight_decay=NU, checkpoint=path)
    assert load_checkpoint(path)["extra"]["weight_decay"] == NU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same objective: nothing to warn about
        resumed = fit(
            twin, nn.MSELoss(), data, max_iter=12, progress=False, weight_decay=NU, checkpoint=path, resume=True
        )
    assert resumed["loss"] == whole["loss"]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_resume_with_another_weight_decay_warns_and_recomputes_the_loss(tmp_path):
    model, data = regression_problem()
    path = tmp_path / "run.pt"
    fit(model, nn.MSELoss(), data, max_iter=5, progress=False, checkpoint=path)
    with pytest.warns(UserWarning, match=r"weight_decay=0.3 where the run that wrote it had 0.0: another objective"):
        resumed = fit(
            model, nn.MSELoss(), data, max_iter=8, progress=False, weight_decay=NU, checkpoint=path, resume=True
        )
    weights = [p.detach() for p in model.parameters()]
    with torch.no_grad():
        data_loss = float(nn.functional.mse_loss(model(data[0]), data[1]))
    assert resumed["loss"][-1] == pytest.approx(data_loss + 0.5 * NU * float(squared_norm(weights)), rel=1e-12)
    assert resumed["success"][5], "the first trial was rejected: SCG compared it with the E of the other objective"


def test_scg_with_exact_curvature_follows_the_penalized_objective_of_a_plain_closure():
    """SCG on the penalized accumulator takes the steps it takes on a closure that evaluates the loss plus (ν/2)|w|²
    on all the data at once (curvature by double-backward through that closure): the penalty's νv is in the HVP."""
    model, data = regression_problem()
    twin = copy.deepcopy(model)
    accumulator = GradientAccumulator(model, nn.MSELoss(), data, batch_size=7, weight_decay=NU)
    streamed = SCG(model.parameters())
    twin_params = list(twin.parameters())

    def closure():
        twin.zero_grad()
        energy = nn.functional.mse_loss(twin(data[0]), data[1]) + 0.5 * NU * sum((p * p).sum() for p in twin_params)
        energy.backward(create_graph=True)
        return energy

    reference = SCG(twin.parameters())
    for _ in range(12):
        assert float(streamed.step(accumulator)) == pytest.approx(float(reference.step(closure)), rel=1e-10)
    assert streamed.trace.hvp_calls == reference.trace.hvp_calls > 0
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_float32_model_with_class_weights_gets_float32_derivatives_of_the_penalized_objective():
    """The class weights' sums D_b are float64, so each batch's D_b · P is too; the derivatives stay float32."""
    model64, data = classification_problem()
    model32 = copy.deepcopy(model64).float()
    weight = torch.tensor([1.0, 2.0, 0.5])
    vectors = [torch.randn_like(p) for p in model64.parameters()]
    loss64 = nn.CrossEntropyLoss(weight=weight.double())
    energy, gradient, product = penalized_derivatives(model64, loss64, data, vectors)
    loss32 = nn.CrossEntropyLoss(weight=weight)
    accumulator = GradientAccumulator(model32, loss32, (data[0].float(), data[1]), batch_size=5, weight_decay=NU)
    assert float(accumulator()) == pytest.approx(float(energy), rel=1e-5)
    for p, g in zip(model32.parameters(), gradient):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g.float(), rtol=1e-4, atol=1e-5)
    for got, want in zip(accumulator.hvp([v.float() for v in vectors]), product):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_a_loss_that_depends_on_the_batch_is_still_caught_with_a_large_penalty():
    """The additivity check looks at the loss alone: a large (ν/2)|w|² in every batch must not hide a loss whose
    full-batch value would depend on the batch size."""
    model, data = regression_problem()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)

    class MeanPlusBatchConstant(nn.Module):
        reduction = "mean"

        def forward(self, outputs, targets):
            return nn.functional.mse_loss(outputs, targets) + 1.0  # a per-call term in a mean: additive, fine

    class SumCalledMean(nn.Module):
        reduction = "mean"

        def forward(self, outputs, targets):
            return nn.functional.mse_loss(outputs, targets, reduction="sum")  # a sum that claims to be a mean

    GradientAccumulator(model, MeanPlusBatchConstant(), data, batch_size=8, weight_decay=1.0)()
    with pytest.raises(ValueError, match="behaves like reduction='sum'"):
        GradientAccumulator(model, SumCalledMean(), data, batch_size=8, weight_decay=1.0)()
